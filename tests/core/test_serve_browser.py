"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Skipped with a reason where chromium or chromedriver is not installed (``.ci/run`` installs them).
"""
from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("selenium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def server_url(compact_encoder, colour_index):
    import uvicorn

    from domainclip.core.index import SearchIndex
    from domainclip.core.serve import ServeSettings, create_app

    app = create_app(compact_encoder, SearchIndex.open(colour_index, compact_encoder), ServeSettings(max_batch=4))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="domainclip-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait_for(driver, css: str, count: int, timeout: float = 30.0):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, css)) >= count
                                         or d.find_element(By.CSS_SELECTOR, ".error").text)
    return driver.find_elements(By.CSS_SELECTOR, css)


def test_page_classifies_an_uploaded_image_into_bars(browser, server_url, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(image)
    browser.get(server_url + "/")
    browser.find_element(By.ID, "image-file").send_keys(str(image))
    labels = browser.find_element(By.ID, "labels")
    labels.clear()
    labels.send_keys("red, green, blue")
    browser.find_element(By.ID, "classify-button").click()
    rows = _wait_for(browser, "#bars .bar-row", 3)
    assert browser.find_element(By.ID, "classify-error").text == ""
    assert [row.get_attribute("data-label") for row in rows][0] == "red"
    assert sorted(row.get_attribute("data-label") for row in rows) == ["blue", "green", "red"]
    scores = [float(row.get_attribute("data-score")) for row in rows]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1.0) < 1e-3
    widths = [row.find_element(By.CSS_SELECTOR, ".bar").size["width"] for row in rows]
    assert widths[0] > widths[-1] > -1  # the drawn bars follow the probabilities


def test_page_searches_the_index_into_a_grid_of_thumbnails(browser, server_url) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server_url + "/")
    browser.find_element(By.ID, "query").send_keys("a blue square")
    browser.find_element(By.ID, "search-button").click()
    hits = _wait_for(browser, "#grid .hit", 12)
    assert browser.find_element(By.ID, "search-error").text == ""
    assert len(hits) == 12
    for _ in range(50):  # thumbnails load asynchronously
        loaded = browser.execute_script(
            "return Array.from(document.querySelectorAll('#grid .hit img')).map(i => i.complete && i.naturalWidth)")
        if all(loaded):
            break
        time.sleep(0.1)
    assert loaded == [40] * 12  # every thumbnail decoded (the 40-pixel squares)
    captions = [hit.find_element(By.TAG_NAME, "figcaption").text for hit in hits[:3]]
    assert all(caption.startswith(f"#{i + 1} ") and caption.endswith("blue") for i, caption in enumerate(captions))
