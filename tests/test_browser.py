"""End-to-end test: `streamlit run app.py` driven by headless Chromium through every page.

Needs Debian's Chromium at /usr/bin/chromium (`.ci/run` installs it) and the Python
package playwright, which drives it without downloading a browser. Screenshots of
each page go to test-output/screenshots/.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core.demo import make_demo
from tests.conftest import COCO_MINI, PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = PROJECT_ROOT / "test-output" / "screenshots"
# Chromium flags for a sandboxed, offline machine: no background connections, no first-run UI.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason="Chromium not found; install Debian's chromium package (.ci/run does)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A dashboard on a free localhost port with its own demo dataset and runs folder."""
    root = tmp_path_factory.mktemp("browser")
    make_demo(root / "demo", train_rows=60, test_rows=10, image_size=48)
    port = _free_port()
    env = {**os.environ, "CORE_RUNS_DIR": str(root / "runs"), "CORE_DEMO_DIR": str(root / "demo"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    log = (root / "streamlit.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(url, process)
        yield {"url": url, "root": root}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def page(dashboard):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()
        browser.close()


def _open(page, dashboard, path: str) -> None:
    page.goto(f"{dashboard['url']}/{path}")
    page.wait_for_selector('[data-testid="stMainBlockContainer"]')
    _settle(page)


def _settle(page) -> None:
    # Streamlit shows a running indicator while the script runs; wait until it is gone.
    page.wait_for_timeout(500)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText.includes('Running')",
        timeout=120_000,
    )
    page.wait_for_timeout(500)


def _assert_no_exception(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, f"{name}: {exceptions.first.inner_text()}"


def test_browser_home_and_dataset(page, dashboard):
    _open(page, dashboard, "")
    page.get_by_text("Multi-label image classification with captions").wait_for()
    page.get_by_text("Demo data: generated images").wait_for()
    _assert_no_exception(page, "1-home")

    _open(page, dashboard, "dataset")
    page.get_by_text("circle").first.wait_for()
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 3")
    _assert_no_exception(page, "2-dataset")


def test_browser_train_run_appears_in_compare(page, dashboard):
    _open(page, dashboard, "train")
    epochs = page.get_by_label("Epochs", exact=True)
    epochs.fill("1")
    image_size = page.get_by_label("Image size (px)", exact=True)
    image_size.fill("32")
    page.get_by_label("Run name (optional)", exact=True).fill("browser-run")
    page.get_by_role("button", name="Queue run").click()
    page.get_by_text("Queued run browser-run").wait_for()

    # The fragment refreshes every 2 s; wait for the queued run to finish in its background process.
    page.get_by_text("Finished: Epoch 1/1").wait_for(timeout=300_000)
    _assert_no_exception(page, "3-train")

    _open(page, dashboard, "compare")
    page.get_by_text("browser-run").first.wait_for()
    page.get_by_text("Per-label F1").wait_for()
    # The tables draw on a canvas, so the metrics are checked in the plotly charts' SVG text.
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 4")
    chart_text = " ".join(page.locator(".js-plotly-plot").all_inner_texts())
    assert "circle" in chart_text
    assert "browser-run" in chart_text
    _assert_no_exception(page, "4-compare")


def test_browser_predict_uploaded_photo(page, dashboard):
    photo = next(iter(sorted((COCO_MINI / "data").glob("*.jpg"))), None) if COCO_MINI.exists() else None
    if photo is None:
        photo = dashboard["root"] / "demo" / "data" / "0.jpg"
    _open(page, dashboard, "predict")
    page.get_by_text("Run", exact=True).first.wait_for()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(photo))
    _settle(page)
    page.get_by_label("Caption", exact=True).fill("A red circle and a blue square.")
    page.get_by_label("Caption", exact=True).press("Enter")
    _settle(page)
    predicted = page.locator("p", has_text="Predicted labels:")
    predicted.wait_for()
    text = predicted.inner_text()
    assert any(name in text for name in ("circle", "square", "triangle", "cross", "star")), text
    _assert_no_exception(page, "5-predict")

    # An upload that is not an image gets a message in the page, which keeps working.
    fake = dashboard["root"] / "not-an-image.png"
    fake.write_text("plain text")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(fake))
    _settle(page)
    page.get_by_text("is not in a known image format").wait_for()
    _assert_no_exception(page, "6-predict-bad-upload")
