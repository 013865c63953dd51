"""domainclip index / search: contents of the index folder, search answers, kill-and-resume, --add, refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("faiss")

from domainclip.core.cli import main
from domainclip.core.index import (IndexOptions, ModelMismatchError, SearchIndex, build_index, choose_kind,
                                   plot_grid, read_manifest)
from domainclip.core.index.shards import read_shard

from .index_fixtures import DATA_OPTIONS, colour_data, png_bytes

REPO = Path(__file__).resolve().parents[2]
OPTIONS = dict(batch_size=4, shard_size=8, max_bad_fraction=0.2, progress=False)


def test_index_folder_holds_embeddings_metadata_bad_inputs_and_model_pin(colour_index, compact_encoder) -> None:
    manifest = read_manifest(colour_index)
    assert manifest.model["sha256"] == compact_encoder.fingerprint()["sha256"]
    assert manifest.model["preprocess"]["image_size"] == 128
    assert (manifest.count, manifest.bad, manifest.faiss["kind"]) == (20, 1, "flat")
    assert [s.num_shards for s in manifest.sources] == [3] and manifest.sources[0].total == 21
    bad = json.loads((colour_index / "bad_inputs.json").read_text())
    assert bad["bad"] == 1 and bad["items"][0]["path"].endswith("img/broken.jpg")
    assert "cannot read image" in bad["items"][0]["reason"]
    metadata = pq.read_table(colour_index / "metadata.parquet").to_pylist()
    assert [row["id"] for row in metadata] == list(range(20))
    assert metadata[0]["captions"] == ["a red square", "a square coloured red"] and metadata[0]["label"] == "red"
    assert all("broken" not in row["path"] for row in metadata)
    # the stored embeddings are the encoder's, and searching one returns its own image first
    first = read_shard(colour_index, 0)
    reference = compact_encoder.encode_batch(compact_encoder.prepare(Image.open(metadata[0]["path"])).unsqueeze(0))
    np.testing.assert_allclose(first.embeddings[0], reference[0], atol=1e-5)
    index = SearchIndex.open(colour_index, compact_encoder)
    hits = index.search_vectors(first.embeddings[3], top_k=3)[0]
    assert hits[0]["id"] == 3 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_text_and_image_search_rank_the_matching_colour_first(colour_index, compact_encoder, tmp_path) -> None:
    index = SearchIndex.open(colour_index, compact_encoder)
    for colour in ("red", "green", "blue"):
        hits = index.search_text(f"a {colour} square", top_k=5)
        assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5]
        assert [hit["label"] for hit in hits[:3]] == [colour] * 3, hits
        assert hits[0]["score"] >= hits[-1]["score"]
    query = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (20, 30, 230)).save(query)
    assert [hit["label"] for hit in index.search_image(query, top_k=3)] == ["blue"] * 3
    grid = plot_grid(index.search_text("a red square", top_k=4), tmp_path / "grid.png")
    assert Image.open(grid).size[0] > 200
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        index.search_text("red", top_k=0)


def test_search_cli_json(colour_index, capsys) -> None:
    assert main(["search", str(colour_index), "--text", "a green square", "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == {"text": "a green square"}
    assert [hit["label"] for hit in out["hits"]] == ["green", "green"]
    assert main(["search", str(colour_index), "--text", "a", "--image", "x.png"]) == 2
    assert "exactly one of --text or --image" in capsys.readouterr().err


def test_search_with_another_model_is_refused(colour_index, tmp_path) -> None:
    from domainclip.core.index import Encoder

    from .test_backbones import save_tiny_hf

    other = Encoder.load(str(save_tiny_hf(tmp_path / "tiny_clip", "clip")), device="cpu")
    with pytest.raises(ModelMismatchError, match="was built with model 'compact_base'.*not comparable"):
        SearchIndex.open(colour_index, other)
    with pytest.raises(ModelMismatchError, match="weights sha256"):
        build_index(other, str(tmp_path / "unused"), colour_index, IndexOptions(**OPTIONS), add=True)


def _run_index(data: Path, out: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("DOMAINCLIP_FAULT", None)
    if fault:
        env["DOMAINCLIP_FAULT"] = fault
    command = [sys.executable, "-m", "domainclip.core.cli", "index", "compact_base", str(data), "--out", str(out),
               "--label-key", "label", "--caption-separator", "|", "--batch-size", "4", "--shard-size", "8",
               "--max-bad-fraction", "0.1", "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_index_runs_resume_to_identical_files(tmp_path) -> None:
    data = colour_data(tmp_path / "data")
    straight = _run_index(data, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    killed = _run_index(data, tmp_path / "killed", fault="index_mid_shard:1")  # shard 1 half written
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "shards" / "shard-000001.json").exists()
    assert (tmp_path / "killed" / "shards" / "emb-000001.npy").exists()
    again = _run_index(data, tmp_path / "killed", fault="index_shard:2")  # resumed, killed after shard 2
    assert again.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "index.faiss").exists()
    resumed = _run_index(data, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["count"] == 20
    expected, got = _files(tmp_path / "straight"), _files(tmp_path / "killed")
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_add_extends_the_index_and_rerunning_without_add_is_refused(kind: str, compact_encoder, tmp_path) -> None:
    options = IndexOptions(**{**OPTIONS, "kind": kind})
    first = colour_data(tmp_path / "first", count=6)
    out = tmp_path / "index"
    build_index(compact_encoder, str(first), out, options, DATA_OPTIONS)
    extra = tmp_path / "extra" / "yellow"
    extra.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (230, 230, 10 + i)).save(extra / f"y{i}.png")
    with pytest.raises(FileExistsError, match="use --add"):
        build_index(compact_encoder, str(extra.parent), out, options)
    summary = build_index(compact_encoder, str(extra.parent), out, options, add=True)
    assert (summary["count"], summary["bad"]) == (9, 1)
    manifest = read_manifest(out)
    assert [(s.first_shard, s.num_shards, s.complete) for s in manifest.sources] == [(0, 1, True), (1, 1, True)]
    index = SearchIndex.open(out, compact_encoder)
    added = [row for row in index.rows if row["source"] == 1]
    assert [row["id"] for row in added] == [6, 7, 8] and {row["label"] for row in added} == {"yellow"}
    shard = read_shard(out, 1)
    assert index.search_vectors(shard.embeddings[2], top_k=1)[0][0]["id"] == 8
    # running the same --add again finds the source done and changes nothing
    again = build_index(compact_encoder, str(extra.parent), out, options, add=True)
    assert again["count"] == 9 and again["kind"] == kind


def test_rows_that_never_become_items_are_counted_and_listed(compact_encoder, tmp_path) -> None:
    data = colour_data(tmp_path / "data", count=6)
    rows = data.read_text().splitlines()
    data.write_text("\n".join([*rows[:3], ",no image here,red", *rows[3:]]) + "\n")  # a row without an image path
    summary = build_index(compact_encoder, str(data), tmp_path / "index",
                          IndexOptions(**{**OPTIONS, "max_bad_fraction": 0.5}), DATA_OPTIONS)
    assert (summary["count"], summary["bad"]) == (6, 2)  # the broken file and the row without a path
    report = json.loads((tmp_path / "index" / "bad_inputs.json").read_text())
    assert (report["total"], report["bad"]) == (8, 2) and len(report["items"]) == 2
    manifest = read_manifest(tmp_path / "index")
    assert manifest.bad == 2 and manifest.sources[0].total == 8 and len(manifest.sources[0].skipped) == 1


def test_each_source_records_its_precision_and_a_resume_keeps_it(compact_encoder, tmp_path) -> None:
    from domainclip.core.index.manifest import write_manifest

    data, out = colour_data(tmp_path / "data", count=4), tmp_path / "index"
    build_index(compact_encoder, str(data), out, IndexOptions(**OPTIONS), DATA_OPTIONS)
    manifest = read_manifest(out)
    assert manifest.sources[0].precision == compact_encoder.precision
    other = "bf16" if compact_encoder.precision != "bf16" else "fp32"
    manifest.sources[0].precision, manifest.sources[0].complete = other, False  # as if interrupted in another precision
    write_manifest(out, manifest)
    with pytest.raises(ValueError, match=rf"encoded .* in {other}; resume it with --precision {other}"):
        build_index(compact_encoder, str(data), out, IndexOptions(**OPTIONS), DATA_OPTIONS)


def test_resume_and_add_keep_the_indexs_shard_size_and_dtype(compact_encoder, tmp_path) -> None:
    out = tmp_path / "index"
    build_index(compact_encoder, str(colour_data(tmp_path / "a", count=4)), out,
                IndexOptions(**{**OPTIONS, "dtype": "float16"}), DATA_OPTIONS)
    plain = IndexOptions(batch_size=4, max_bad_fraction=0.2, progress=False)  # no shard size, no dtype: the index's
    summary = build_index(compact_encoder, str(colour_data(tmp_path / "b", count=4)), out, plain, DATA_OPTIONS, add=True)
    assert summary["count"] == 8 and read_shard(out, 1).embeddings.dtype == np.float16
    for given, message in (({"shard_size": 16}, "shards of 8 images; --shard-size 16 cannot change it"),
                           ({"dtype": "float32"}, "stores float16 embeddings; --dtype float32 cannot be added")):
        with pytest.raises(ValueError, match=message):
            build_index(compact_encoder, str(colour_data(tmp_path / "c", count=4)), out,
                        IndexOptions(**{**OPTIONS, **given}), DATA_OPTIONS, add=True)
    with pytest.raises(ValueError, match=r"shard_size \(8\) must be a multiple of batch_size \(3\)"):
        build_index(compact_encoder, str(colour_data(tmp_path / "d", count=4)), out, IndexOptions(batch_size=3),
                    DATA_OPTIONS, add=True)
    assert read_manifest(out).shard_size == 8


def test_add_keeps_the_index_kind_first_asked_for(compact_encoder, tmp_path) -> None:
    out = tmp_path / "index"
    build_index(compact_encoder, str(colour_data(tmp_path / "a", count=4)), out,
                IndexOptions(**{**OPTIONS, "kind": "hnsw"}), DATA_OPTIONS)
    for name in ("b", "c"):  # --add without --kind: the size alone would pick flat
        summary = build_index(compact_encoder, str(colour_data(tmp_path / name, count=4)), out, IndexOptions(**OPTIONS),
                              DATA_OPTIONS, add=True)
        assert summary["kind"] == "hnsw" and read_manifest(out).faiss["requested"] == "hnsw"


def test_a_recipe_model_loads_with_one_hash_and_an_absolute_source(colour_squares, tmp_path, monkeypatch) -> None:
    import yaml

    from domainclip.core.index import Encoder
    from domainclip.core.index.encoding import load_for_encoding

    from ..conftest import tiny_recipe

    recipe = tiny_recipe(colour_squares, tmp_path / "runs")
    recipe["method"] = {"name": "lora", "rank": 4, "alpha": 8}  # new random parameters at every build
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    first, second = (Encoder.load("lora.yaml", device="cpu").fingerprint() for _ in range(2))
    assert first["sha256"] == second["sha256"]
    assert first["source"] == str(tmp_path / "lora.yaml")  # an index reloads it from any directory
    assert load_for_encoding("compact_base").source == "compact_base"


def test_float16_hnsw_index_and_webdataset_input(compact_encoder, tmp_path) -> None:
    (tmp_path / "run#2").mkdir()
    tar_path = tmp_path / "run#2" / "shard-0000.tar"  # a '#' in the folder too: the member starts after '.tar#'
    with tarfile.open(tar_path, "w") as archive:
        for i, colour in enumerate([(220, 10, 10), (10, 220, 10), (10, 10, 220), (220, 10, 10)]):
            for name in (f"{i:04d}.png", f"{i:04d}.txt"):
                path = tmp_path / name
                if name.endswith(".png"):
                    Image.new("RGB", (32, 32), colour).save(path)
                else:
                    path.write_text(f"square {i}\n")
                archive.add(path, arcname=name)
    summary = build_index(compact_encoder, str(tar_path), tmp_path / "index",
                          IndexOptions(**{**OPTIONS, "dtype": "float16", "kind": "hnsw"}))
    assert (summary["count"], summary["kind"]) == (4, "hnsw")
    assert read_shard(tmp_path / "index", 0).embeddings.dtype == np.float16
    index = SearchIndex.open(tmp_path / "index", compact_encoder)
    assert index.rows[2]["path"].endswith("shard-0000.tar#0002.png") and index.rows[2]["captions"] == ["square 2"]
    hits = index.search_image(tmp_path / "0000.png", top_k=2)
    assert {hit["id"] for hit in hits} == {0, 3} and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert plot_grid(hits, tmp_path / "grid.png").is_file()  # thumbnails read from inside the tar


def test_index_kind_threshold_and_bad_options(compact_encoder, tmp_path) -> None:
    assert choose_kind(100_000) == "flat" and choose_kind(100_001) == "hnsw" and choose_kind(5, "hnsw") == "hnsw"
    with pytest.raises(ValueError, match="index kind 'hnws' is unknown; did you mean 'hnsw'"):
        choose_kind(5, "hnws")
    with pytest.raises(ValueError, match="multiple of batch_size"):
        build_index(compact_encoder, str(tmp_path), tmp_path / "i", IndexOptions(batch_size=3, shard_size=8))
    with pytest.raises(FileNotFoundError, match="holds no images"):
        build_index(compact_encoder, str(tmp_path), tmp_path / "i", IndexOptions(**OPTIONS))
    with pytest.raises(FileNotFoundError, match="not a domainclip index"):
        SearchIndex.open(tmp_path, compact_encoder)


def test_too_many_unreadable_images_stop_the_run(compact_encoder, tmp_path) -> None:
    from domainclip.core.data import TooManyBadInputsError

    data = colour_data(tmp_path / "data", count=6)
    with pytest.raises(TooManyBadInputsError, match=r"1 of 7 data items were bad .*\(--max-bad-fraction=0.05\)"):
        build_index(compact_encoder, str(data), tmp_path / "index", IndexOptions(**{**OPTIONS, "max_bad_fraction": 0.05}),
                    DATA_OPTIONS)


def test_a_second_index_process_on_the_same_folder_is_refused(compact_encoder, tmp_path) -> None:
    from domainclip.core.folder_lock import FolderBusyError, FolderLock

    data = colour_data(tmp_path / "data", count=6)
    out = tmp_path / "index"
    out.mkdir()
    holder = FolderLock(out / "index.lock", "index", "")
    holder.acquire()  # another open file description: flock treats it as another process
    try:
        with pytest.raises(FolderBusyError, match=rf"{out} is being written by another index process "
                                                  rf"\(pid {os.getpid()} on .*or index into another --out folder"):
            build_index(compact_encoder, str(data), out, IndexOptions(**OPTIONS), DATA_OPTIONS)
        assert [p.name for p in out.iterdir()] == ["index.lock"]  # nothing written beside the holder's lock
    finally:
        holder.release()
    summary = build_index(compact_encoder, str(data), out, IndexOptions(**OPTIONS), DATA_OPTIONS)
    assert summary["count"] == 6 and not (out / "index.lock").exists()
    # a refused --add on a folder that is no index leaves no empty folder behind
    with pytest.raises(FileNotFoundError, match="is not an index yet"):
        build_index(compact_encoder, str(data), tmp_path / "new", IndexOptions(**OPTIONS), DATA_OPTIONS, add=True)
    assert not (tmp_path / "new").exists()


def test_data_is_read_as_what_it_is_whatever_its_name_holds(compact_encoder, tmp_path) -> None:
    data = colour_data(tmp_path / "data", count=4)
    odd_name = data.with_name("photos.targets.csv")  # '.tar' inside a manifest's name
    odd_name.write_text(data.read_text())
    assert build_index(compact_encoder, str(odd_name), tmp_path / "a", IndexOptions(**OPTIONS),
                       DATA_OPTIONS)["count"] == 4
    # the same manifest named another way is the same source: resumed (here: done), not indexed twice
    again = build_index(compact_encoder, str(tmp_path / "data" / "img" / ".." / "photos.targets.csv"), tmp_path / "a",
                        IndexOptions(**OPTIONS), DATA_OPTIONS)
    assert again["count"] == 4 and len(read_manifest(tmp_path / "a").sources) == 1
    (tmp_path / "s-0000.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"compressed tar shards cannot be indexed .* to plain .tar shards"):
        build_index(compact_encoder, str(tmp_path / "s-0000.tar.gz"), tmp_path / "b", IndexOptions(**OPTIONS))
    with pytest.raises(KeyError, match=r"no column 'captoin' \(--caption-key\); columns: \['image', 'caption', 'label'\]"):
        build_index(compact_encoder, str(data), tmp_path / "c", IndexOptions(**OPTIONS), {"caption_key": "captoin"})


def test_a_file_name_that_is_not_utf8_is_listed_not_fatal(compact_encoder, tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in (b"red.png", b"caf\xe9.png"):
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(png_bytes((220, 20, 20)))
    summary = build_index(compact_encoder, str(folder), tmp_path / "index",
                          IndexOptions(**{**OPTIONS, "max_bad_fraction": 0.5}))
    assert (summary["count"], summary["bad"]) == (1, 1)
    report = json.loads((tmp_path / "index" / "bad_inputs.json").read_text())
    assert report["items"] == [{"path": str(folder / "caf\\xe9.png"),
                                "reason": "file name is not valid UTF-8; rename it"}]


def test_an_add_that_fails_leaves_the_index_before_it_searchable(compact_encoder, tmp_path, caplog) -> None:
    from domainclip.core.data import TooManyBadInputsError

    out = tmp_path / "index"
    build_index(compact_encoder, str(colour_data(tmp_path / "a", count=4)), out, IndexOptions(**OPTIONS), DATA_OPTIONS)
    no_images = tmp_path / "b.csv"
    no_images.write_text("image,note\n,first\n,second\n")  # a list of images in which no row names one
    with pytest.raises(TooManyBadInputsError, match="2 of 2 data items were bad"):  # no shards, still judged
        build_index(compact_encoder, str(no_images), out, IndexOptions(**OPTIONS), add=True)
    with caplog.at_level("WARNING", logger="domainclip.index"):
        index = SearchIndex.open(out, compact_encoder)
    assert len(index) == 4 and f"adding {no_images} did not finish; searching the 4 images" in caplog.text
    assert index.search_text("a red square", top_k=1)[0]["label"] == "red"
