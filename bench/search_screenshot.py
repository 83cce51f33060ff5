"""A screenshot of the search page on a run, for the README: the run is served on a free loopback
port, headless Chromium (Debian's ``chromium`` + ``chromium-driver``) types one sentence and the
page is saved once its images have loaded.

    python -m bench.search_screenshot --run runs/flickr8k/text2img_bert --split dev \\
        --coco-root ../shared/data/flickr8k --query "a dog runs through the snow" --out docs/search_flickr8k.jpg
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-default-apps", "--window-size=1280,900", "--force-device-scale-factor=1")


@contextmanager
def serve_in_thread(searcher):
    """The app over ``searcher``, served by uvicorn in a thread on a free loopback port; yields its URL."""
    import uvicorn

    from crossmodal.serve import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn does when it binds itself
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(searcher), log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        if not srv.started:
            raise RuntimeError("the search server did not start within 60 s")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def chromium_driver(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER):
    """A headless Chromium (selenium) with a throw-away profile, 1280x900, that never downloads."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    profile = tempfile.mkdtemp(prefix="crossmodal-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(d, url: str, query: str, k: int, out: Path) -> None:
    """Type ``query`` on the page at ``url`` (driver ``d``), wait for its ``k`` images, save a 1280x900
    screenshot (PNG, or JPEG when ``out`` ends in .jpg)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d.get(url + "/")
    wait = WebDriverWait(d, 60, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "run-info").text.strip())
    kbox = d.find_element(By.ID, "k")
    kbox.clear()
    kbox.send_keys(str(k))
    d.find_element(By.ID, "q").send_keys(query, Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == k)
    wait.until(lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#results .card img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".tmp.png")
    d.save_screenshot(str(png))  # Chromium writes PNG whatever the name
    if out.suffix.lower() in (".jpg", ".jpeg"):
        from PIL import Image

        Image.open(png).convert("RGB").save(out, quality=88, optimize=True)
        png.unlink()
    else:
        png.replace(out)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, action="append", help="a run folder (repeat for an ensemble)")
    p.add_argument("--split", required=True)
    p.add_argument("--coco-root", required=True)
    p.add_argument("--dataset", default="auto")
    p.add_argument("--query", required=True, help="the sentence typed into the page")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default="docs/search.png")
    p.add_argument("--chromium", default=CHROMIUM)
    p.add_argument("--chromedriver", default=CHROMEDRIVER)
    a = p.parse_args(argv)
    if not (Path(a.chromium).is_file() and Path(a.chromedriver).is_file()):
        raise SystemExit(f"headless Chromium not found ({a.chromium}, {a.chromedriver}): apt-get install chromium "
                         "chromium-driver")
    from crossmodal.searcher import Searcher

    searcher = Searcher.from_run(a.run, a.split, a.coco_root, dataset=a.dataset)
    with serve_in_thread(searcher) as url, chromium_driver(a.chromium, a.chromedriver) as d:
        screenshot(d, url, a.query, a.k, Path(a.out))
    print(f"wrote {a.out}")
    return Path(a.out)


if __name__ == "__main__":
    main()
