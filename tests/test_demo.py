"""tools/demo.py: the handlers (errors become a status line), and the page itself driven from a real
headless browser (Debian's chromium + chromidriver through selenium) against the quickstart's
--smoke checkpoint: an image and a caption generated through the page and read back."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_fixture import REPO, write_tiny_checkpoint


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    from ernie_vilg.demo import Handlers
    from ernie_vilg.pipeline import ErnieViLGPipeline

    pipe = ErnieViLGPipeline.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("demo")))
    return Handlers(pipe, reranker=None, max_candidates=4)


def test_text_to_image_handler_with_and_without_reranking(handlers) -> None:
    pytest.importorskip("gradio", reason="the demo extra is not installed")  # ernie_vilg.demo itself needs no gradio
    items, status = handlers.text_to_image("红色的圆", 3, 0, 1.0, 8, "none")
    assert len(items) == 3 and status.startswith("3 image(s)")
    assert all(isinstance(img, Image.Image) for img, _ in items)
    ranked, status = handlers.text_to_image("红色的圆", 3, 0, 1.0, 8, "likelihood")
    assert "best first by likelihood" in status and [l.split(":")[0] for _, l in ranked] == ["rank 0", "rank 1", "rank 2"]
    scores = [float(l.rsplit(" ", 1)[1]) for _, l in ranked]
    assert scores == sorted(scores, reverse=True)
    # the same three samples, reordered
    plain = {np.asarray(i).tobytes() for i, _ in items}
    assert {np.asarray(i).tobytes() for i, _ in ranked} == plain


@pytest.mark.parametrize("args, message", [
    (("", 1, 0, 1.0, 8, "none"), "Error: type a prompt first"),
    (("红", 9, 0, 1.0, 8, "none"), "Error: candidates must be in [1, 4]"),
    (("红", 1, 0, 1.0, 8, "reranker"), "Error: no reranker loaded"),
    (("红", 1, 0, 0.0, 8, "none"), "Error: cfg_scale must be > 0"),
])
def test_text_to_image_errors_are_a_status_line(handlers, args, message) -> None:
    items, status = handlers.text_to_image(*args)
    assert items == [] and status.startswith(message)


def test_caption_and_vqa_handlers(handlers) -> None:
    image = np.asarray(handlers.pipe("红色的圆")[0])
    caption, status = handlers.caption(image, "beam", 2)
    assert caption == handlers.pipe.caption(image, strategy="beam", beam_size=2) and status == "beam decoding"
    assert handlers.caption(None, "greedy", 1) == ("", "Error: upload an image first")
    answer, _ = handlers.answer(image, "什么颜色", "greedy")
    assert answer == handlers.pipe.answer(image, "什么颜色", "greedy")
    assert handlers.answer(image, " ", "greedy")[1] == "Error: type a question first"


def test_demo_tool_without_a_checkpoint_is_one_line(tmp_path) -> None:
    res = subprocess.run([sys.executable, str(REPO / "tools/demo.py"), "--ckpt", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


# ------------------------------------------------------------------------------ the real browser
def _browser_or_skip() -> tuple[str, str]:
    """Skip with the reason where the demo extra or the browser is missing; fail instead under
    .ci/run (ERNIE_VILG_REQUIRE_BROWSER=1), which installs both, so CI never skips it silently."""
    missing = pytest.fail if os.environ.get("ERNIE_VILG_REQUIRE_BROWSER") == "1" else pytest.skip
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as exc:
        missing(f"the demo extra is not installed ({exc.name}): pip install -c constraints.txt -e '.[cpu,demo]'")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        missing("no headless browser: apt-get install -y chromium chromium-driver (.ci/run does)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory) -> Path:
    """The quickstart's --smoke run (ERNIE_VILG_SMOKE_RUN reuses one already made)."""
    reuse = os.environ.get("ERNIE_VILG_SMOKE_RUN")
    if reuse and (Path(reuse) / "vilg").is_dir():
        return Path(reuse) / "vilg"
    out = tmp_path_factory.mktemp("smoke") / "qs"
    res = subprocess.run([sys.executable, str(REPO / "tools/quickstart.py"), "--smoke", "--out", str(out),
                          "--threads", "1"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return out / "vilg"


@pytest.mark.slow
@pytest.mark.browser
def test_demo_in_a_real_browser_generates_an_image_and_a_caption(smoke_ckpt, tmp_path) -> None:
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    log = (tmp_path / "demo.log").open("w")
    server = subprocess.Popen([sys.executable, str(REPO / "tools/demo.py"), "--ckpt", str(smoke_ckpt), "--port",
                               str(port), "--threads", "1"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    browser = None
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"demo did not come up:\n{(tmp_path / 'demo.log').read_text()[-3000:]}")
                time.sleep(1)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1600"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        wait = WebDriverWait(browser, 180)
        browser.get(url)

        # text -> image: an error first (the page says so and keeps working), then an image
        wait.until(EC.element_to_be_clickable((By.ID, "t2i-run"))).click()
        wait.until(lambda b: "Error: type a prompt first" in b.find_element(By.ID, "t2i-status").text)
        browser.find_element(By.CSS_SELECTOR, "#t2i-prompt textarea").send_keys("一个红色的圆形")
        browser.find_element(By.ID, "t2i-run").click()
        img = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#t2i-gallery img")))
        wait.until(lambda b: "image(s) for" in b.find_element(By.ID, "t2i-status").text)
        src = img.get_attribute("src")
        png = urllib.request.urlopen(src, timeout=30).read()  # the image as the page shows it
        generated = Image.open(io.BytesIO(png)).convert("RGB")
        size = json.loads((smoke_ckpt.parent / "metrics.json").read_text())["plan"]["image_size"] \
            if (smoke_ckpt.parent / "metrics.json").is_file() else generated.size[0]
        assert generated.size == (size, size)

        # image -> caption: upload that image, caption it, read the caption back
        path = tmp_path / "generated.png"
        generated.save(path)
        browser.find_element(By.ID, "tab-caption-button").click() if browser.find_elements(
            By.ID, "tab-caption-button") else browser.find_element(By.XPATH, "//button[contains(., 'Image → caption')]").click()
        browser.find_element(By.CSS_SELECTOR, "#cap-image input[type=file]").send_keys(str(path))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#cap-image img")))
        browser.find_element(By.ID, "cap-run").click()
        status = wait.until(lambda b: b.find_element(By.ID, "cap-status").text.strip())
        assert status == "greedy decoding", status
        caption = browser.find_element(By.CSS_SELECTOR, "#cap-output textarea").get_attribute("value")
        from ernie_vilg.pipeline import ErnieViLGPipeline

        expected = ErnieViLGPipeline.from_pretrained(smoke_ckpt).caption(np.asarray(generated), strategy="greedy")
        assert caption == expected
        assert server.poll() is None  # still serving after the error and both requests
    except Exception:
        if browser is not None:
            browser.save_screenshot(str(tmp_path / "page.png"))
        print((tmp_path / "demo.log").read_text()[-3000:], f"screenshot: {tmp_path / 'page.png'}")
        raise
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
