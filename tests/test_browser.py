"""End to end in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by selenium against ``crossmodal.serve`` on a free loopback port (the driver and the
server are :mod:`bench.search_screenshot`'s, which also draws the README's screenshot).

Type a caption -> images appear, the true one framed; click it -> its captions, true ones
ticked; upload a photo -> its captions and images. Screenshots are checked not to be blank;
``CROSSMODAL_SCREENSHOT_DIR=docs`` also keeps the text-query one as ``docs/search.png``.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import search_screenshot
from tests.test_serve import build_serve_run

CHROMIUM = os.environ.get("CROSSMODAL_CHROMIUM", search_screenshot.CHROMIUM)
CHROMEDRIVER = os.environ.get("CROSSMODAL_CHROMEDRIVER", search_screenshot.CHROMEDRIVER)
INSTALL = "as root: apt-get update && apt-get install -y chromium chromium-driver (or run .ci/run)"


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"headless Chromium not found ({CHROMIUM}, {CHROMEDRIVER}); install it {INSTALL}")
    pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install -r requirements.txt")
    with search_screenshot.chromium_driver(CHROMIUM, CHROMEDRIVER) as driver:
        yield driver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app over the small generated run, served by uvicorn in a thread on a free loopback port."""
    from crossmodal.serve import Searcher

    paths = build_serve_run(tmp_path_factory.getbasetemp() / "serve_run")
    searcher = Searcher.from_run(paths["run"], "val", paths["root"])
    with search_screenshot.serve_in_thread(searcher) as url:
        yield url, searcher


def _wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _images_loaded(driver, css):
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", css)


def _not_blank(path: Path) -> None:
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert a.shape[0] >= 600 and a.shape[1] >= 1000, a.shape
    colours = len(np.unique(a.reshape(-1, 3).astype(np.uint8), axis=0))
    assert a.std() > 10 and colours > 200, (a.std(), colours)


def _pick_queries(searcher, k):
    """A caption whose true image is in its top k, and an image with a true caption in its top k."""
    g = searcher.gallery
    for row in range(len(g.cap_ids)):
        r = searcher.text_query(g.cap_text[row], k)
        hits = [i["image_id"] for i in r["images"] if i["true"]]
        if not hits:
            continue
        clickable = [i["image_id"] for i in r["images"] if any(c["true"] for c in searcher.image_query(
            i["image_id"], k)["captions"])]
        if clickable:
            return g.cap_text[row], hits, clickable[0]
    pytest.fail("no caption of the tiny run finds its image in the top k")


@pytest.mark.slow
def test_search_page_in_headless_chromium(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, searcher = server
    k = 8
    caption, true_ids, click_id = _pick_queries(searcher, k)
    d = browser
    d.get(base + "/")
    _wait(d, lambda d: "tiny" in d.find_element(By.ID, "run-info").text)
    info = d.find_element(By.ID, "run-info").text
    assert "split val: 16 images" in info and "R@1" in info

    # 1. a sentence -> a grid of images, the true one framed
    kbox = d.find_element(By.ID, "k")
    kbox.clear()
    kbox.send_keys(str(k))
    box = d.find_element(By.ID, "q")
    box.send_keys(caption, Keys.ENTER)
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == k)
    _wait(d, lambda d: _images_loaded(d, "#results .card img"))
    marked = [int(c.get_attribute("data-image-id")) for c in d.find_elements(By.CSS_SELECTOR, "#results .card.true")]
    assert marked and set(marked) <= set(true_ids) | {i for i in searcher.gallery.images_of_text.get(
        caption.casefold(), set())}
    assert "ms on the server" in d.find_element(By.ID, "status").text
    shot = tmp_path / "text_query.png"
    d.save_screenshot(str(shot))
    _not_blank(shot)
    keep = os.environ.get("CROSSMODAL_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "search.png")

    # 2. click an image -> its nearest captions (true ones ticked) and more like it
    d.find_element(By.CSS_SELECTOR, f'#results .card[data-image-id="{click_id}"]').click()
    _wait(d, lambda d: d.find_elements(By.ID, "query-image"))
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "ol.captions li")) == k)
    assert d.find_elements(By.CSS_SELECTOR, "ol.captions li.true")
    assert f"Image {click_id}" in d.find_element(By.ID, "query-image").text
    assert len(d.find_elements(By.CSS_SELECTOR, "#results .grid .card")) == k
    _wait(d, lambda d: _images_loaded(d, "#results img"))
    d.save_screenshot(str(tmp_path / "image_query.png"))
    _not_blank(tmp_path / "image_query.png")

    # 3. upload a photo from outside the dataset -> its captions and images
    photo = tmp_path / "photo.jpg"
    Image.open(searcher.image_path(int(searcher.gallery.img_ids[2]))).convert("RGB").rotate(90).save(photo)
    d.find_element(By.ID, "file").send_keys(str(photo))
    _wait(d, lambda d: d.find_elements(By.ID, "query-upload"))
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "ol.captions li")) == k)
    assert len(d.find_elements(By.CSS_SELECTOR, "#results .grid .card")) == k
    assert "photo.jpg" in d.find_element(By.ID, "query-upload").text
    _wait(d, lambda d: _images_loaded(d, "#results img"))
    d.save_screenshot(str(tmp_path / "upload.png"))
    _not_blank(tmp_path / "upload.png")

    # 4. a bad query gets a readable message, and the page keeps working
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is not a picture")
    d.find_element(By.ID, "file").send_keys(str(bad))
    _wait(d, lambda d: "not a JPEG or PNG" in d.find_element(By.ID, "status").text)
    box = d.find_element(By.ID, "q")
    box.clear()
    box.send_keys("a small red circle", Keys.ENTER)
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == k)


@pytest.mark.slow
def test_the_readme_screenshot_is_the_page_with_its_results(browser, server, tmp_path):
    """``bench.search_screenshot``: the page after a typed sentence, its k images loaded, as JPEG."""
    base, searcher = server
    out = tmp_path / "shot.jpg"
    search_screenshot.screenshot(browser, base, searcher.gallery.cap_text[0], 6, out)
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size[0] == 1280
    _not_blank(out)
    assert not list(tmp_path.glob("*.png"))  # the intermediate PNG is gone
