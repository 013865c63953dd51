"""The web page served at ``/``: plain HTML and a little JavaScript, no build step.

Two panels: upload an image and type labels -> one bar per label with its probability
(``POST /classify``, multipart); type a query -> a grid of the index's best images
(``POST /search``, thumbnails from ``/thumbnail/{id}``). Element ids are stable: the browser
tests drive them.
"""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>domainclip</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; }
 section { border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin-bottom: 1.5em; }
 input[type=text] { width: 30em; }
 .bar-row { display: flex; align-items: center; margin: 0.3em 0; }
 .bar-label { width: 14em; }
 .bar-track { flex: 1; background: #eee; height: 1.2em; margin: 0 0.5em; }
 .bar { background: #3a7bd5; height: 100%; }
 #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 0.8em; }
 .hit img { width: 100%; height: auto; }
 .hit figcaption { font-size: 0.8em; }
 .error { color: #b00020; }
</style>
</head>
<body>
<h1>domainclip</h1>
<section>
 <h2>Classify an image</h2>
 <input type="file" id="image-file" accept="image/*">
 <p><label>Labels (comma-separated): <input type="text" id="labels" placeholder="healthy leaf, apple scab"></label></p>
 <button id="classify-button">Classify</button>
 <div id="bars"></div>
 <p id="classify-error" class="error"></p>
</section>
<section>
 <h2>Search the index</h2>
 <p><input type="text" id="query" placeholder="a flooded field"> <button id="search-button">Search</button></p>
 <div id="grid"></div>
 <p id="search-error" class="error"></p>
</section>
<script>
async function answer(response) {
  const body = await response.json();
  if (!response.ok) { throw new Error(body.error || response.statusText); }
  return body;
}
document.getElementById("classify-button").addEventListener("click", async () => {
  const bars = document.getElementById("bars"), error = document.getElementById("classify-error");
  bars.innerHTML = ""; error.textContent = "";
  const file = document.getElementById("image-file").files[0];
  if (!file) { error.textContent = "choose an image first"; return; }
  const form = new FormData();
  form.append("inputs", file);
  form.append("candidate_labels", document.getElementById("labels").value);
  try {
    const results = await answer(await fetch("/classify", {method: "POST", body: form}));
    for (const {label, score} of results) {
      const row = document.createElement("div");
      row.className = "bar-row"; row.dataset.label = label; row.dataset.score = score.toFixed(6);
      const name = document.createElement("span"); name.className = "bar-label"; name.textContent = label;
      const track = document.createElement("div"); track.className = "bar-track";
      const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = (100 * score).toFixed(1) + "%";
      track.appendChild(bar);
      const value = document.createElement("span"); value.className = "bar-value"; value.textContent = (100 * score).toFixed(1) + " %";
      row.append(name, track, value);
      bars.appendChild(row);
    }
  } catch (e) { error.textContent = e.message; }
});
document.getElementById("search-button").addEventListener("click", async () => {
  const grid = document.getElementById("grid"), error = document.getElementById("search-error");
  grid.innerHTML = ""; error.textContent = "";
  try {
    const body = await answer(await fetch("/search", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({text: document.getElementById("query").value, top_k: 12})}));
    for (const hit of body.hits) {
      const figure = document.createElement("figure"); figure.className = "hit"; figure.dataset.id = hit.id;
      const img = document.createElement("img"); img.src = hit.thumbnail; img.alt = hit.path;
      const caption = document.createElement("figcaption");
      caption.textContent = "#" + hit.rank + " " + hit.score.toFixed(3) + (hit.label ? " " + hit.label : "");
      figure.append(img, caption);
      grid.appendChild(figure);
    }
  } catch (e) { error.textContent = e.message; }
});
</script>
</body>
</html>
"""
