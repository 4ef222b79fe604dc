"""End to end in Debian's headless Chromium: the whole stack (``midimatch serve`` with its
embedded worker on a small index built here), the page, and a fake microphone fed from a WAV of
one collection piece. The page must name that piece. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.conftest import TARGET, running
from tests.redis_server import free_port

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason="Debian's chromium is not installed (apt-get install "
                                "chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(collection):
    index, _ = collection
    port = free_port()
    with running([sys.executable, "-m", "server.cli", "serve", "--index", str(index), "--port",
                  str(port)], f"http://127.0.0.1:{port}/readyz"):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def opened_page(server: str, wav: Path):
    """The page at ``server`` in headless Chromium whose fake microphone plays ``wav``."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright "
                                   "(in the dev extras)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = browser(p, wav)
        try:
            page = b.new_page()
            page.goto(server)
            yield page
        finally:
            b.close()


def browser(playwright, wav: Path):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
        "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"])


def wait_for_decision(page, timeout_ms: int = 120_000) -> str:
    page.wait_for_function("""() => {
        const t = document.getElementById('decision-title');
        return t && t.className !== 'none' && t.textContent.length > 0; }""", timeout=timeout_ms)
    return page.inner_text("#decision-title")


def test_microphone_identifies_the_piece(server, collection):
    _, wav = collection
    with opened_page(server, wav) as page:
        page.click("#mic")
        title = wait_for_decision(page)
        page.wait_for_function("() => document.getElementById('decided-after')"
                               ".textContent.startsWith('Decided after')")
        page.screenshot(path=str(ARTIFACTS / "e2e-microphone.png"), full_page=True)
        assert title == TARGET, page.inner_text("#ranking")
        assert "position" in page.inner_text("#decision-detail")
        assert page.is_visible("#progress")
        # captured at the service's own rate (half the Redis memory of 44.1/48 kHz)
        assert "streaming at 22050 Hz" in page.inner_text("#status")


def test_demo_button_plays_and_identifies(server, collection):
    _, wav = collection
    with opened_page(server, wav) as page:
        page.click("#demo")
        page.wait_for_selector("#demo-info:not([hidden])", timeout=60_000)
        info = page.inner_text("#demo-info")
        title = wait_for_decision(page)
        page.screenshot(path=str(ARTIFACTS / "e2e-demo.png"), full_page=True)
        assert f"“{title}”" in info, (info, page.inner_text("#ranking"))


def test_file_streaming_identifies_the_piece(server, collection):
    _, wav = collection
    with opened_page(server, wav) as page:
        page.set_input_files("#file", str(wav))
        title = wait_for_decision(page)
        page.screenshot(path=str(ARTIFACTS / "e2e-file.png"), full_page=True)
        assert title == TARGET, page.inner_text("#ranking")
        assert page.inner_text("#status").startswith("File query.wav")
