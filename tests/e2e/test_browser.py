"""End to end in Debian's headless Chromium: the page, the whole stack (``midimatch serve`` with
its embedded worker on a small index built here) and a fake microphone fed from a WAV of one
collection piece.

Two kinds of test. Against the real stack: the microphone, a file and the demo must name the
right piece. With the websocket scripted in the browser (Playwright's ``route_web_socket``: the
page, its static files and ``/v1/pieces`` are the real server's, only ``/v1/stream`` answers what
the test says): every state a listener can meet (listening, a leading candidate, identified,
lost, the music changed, not in the collection, too short, an error), a file that is not audio,
and a run replaced by another. Each state is asserted by its text and its colour, and a
screenshot of it is saved under test-artifacts/ (git-ignored) for people to look at.
"""

from __future__ import annotations

import json
import os
import sys
import wave
from contextlib import contextmanager
from pathlib import Path

import pytest

from index.answers import IDENTIFIED, NOT_IN_COLLECTION, SILENT, TOO_SHORT, answer
from tests.e2e.conftest import TARGET, TITLES, running
from tests.redis_server import free_port

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason="Debian's chromium is not installed (apt-get install "
                                "chromium chromium-driver)")

# The colour of the answer's headline in each state (server/static/style.css): green is
# "identified" and nothing else.
COLOURS = {
    "starting": "rgb(91, 101, 112)",
    "listening": "rgb(91, 101, 112)",
    "short": "rgb(91, 101, 112)",
    "leading": "rgb(47, 111, 219)",
    "identified": "rgb(31, 138, 76)",
    "lost": "rgb(181, 71, 8)",
    "absent": "rgb(105, 65, 198)",
    "silent": "rgb(91, 101, 112)",
    "error": "rgb(180, 35, 24)",
}


@pytest.fixture(scope="module")
def server(collection):
    index, _ = collection
    port = free_port()
    with running([sys.executable, "-m", "server.cli", "serve", "--index", str(index), "--port",
                  str(port)], f"http://127.0.0.1:{port}/readyz"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def pieces(server, collection) -> dict[str, dict]:
    """title → {id, title, duration_s} of the collection, as the page reads them."""
    import urllib.request

    from server.demo import read_pieces

    out = {}
    for p in read_pieces(collection[0]):
        with urllib.request.urlopen(f"{server}/v1/pieces/{p.id}") as r:
            out[p.title] = json.load(r)
    return out


@contextmanager
def opened_page(server: str, wav: Path, *, scripted: bool = False):
    """The page at ``server`` in headless Chromium (1280 × 800) whose fake microphone plays
    ``wav``; with ``scripted``, ``page.sockets`` lists a :class:`Socket` per websocket the page
    opens, answered by the test instead of the server."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright "
                                   "(in the dev extras)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = browser(p, wav)
        try:
            page = b.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            sockets: list[Socket] = []
            if scripted:
                page.route_web_socket("**/v1/stream*", lambda ws: sockets.append(Socket(ws)))
            page.goto(server)
            page.sockets = sockets  # type: ignore[attr-defined]
            yield page
            assert not errors, errors  # no uncaught exception in the page's script
        finally:
            b.close()


def browser(playwright, wav: Path):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
        "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"])


class Socket:
    """One websocket of the page, answered by the test: ``ready`` on the page's ``start``, then
    whatever :meth:`result` sends."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.texts: list[dict] = []
        self.audio_bytes = 0
        self.n = 0
        ws.on_message(self._on_message)

    def _on_message(self, message) -> None:
        if isinstance(message, bytes):
            self.audio_bytes += len(message)
            return
        m = json.loads(message)
        self.texts.append(m)
        if m["type"] == "start":
            self.ws.send(json.dumps({"type": "ready", "v": 1, "session": "s" * 32,
                                     "resumed": False, "audio_s": 0.0, "audio_bytes": 0,
                                     "after": "0", "limits": {}}))

    def result(self, audio_s: float, matches: list[tuple[dict, float]],
               decision: tuple[dict, float, float] | None = None, final: bool = False,
               **extra) -> None:
        """Send a result: ``matches`` as (piece, confidence), ``decision`` as (piece,
        confidence, position_s). A final one carries the ``answer`` a worker gives (identified
        or not in the collection by its decision) unless ``extra`` says it or an error."""
        self.n += 1
        if final and "answer" not in extra and "error" not in extra:
            extra["answer"] = answer(NOT_IN_COLLECTION if decision is None else IDENTIFIED)
        m = {"type": "result", "v": 1, "session": "s" * 32, "result_id": f"1-{self.n}",
             "audio_s": audio_s, "lag_s": 0.0, "final": final,
             "matches": [{"id": p["id"], "title": p["title"], "confidence": c, "score": 5.0,
                          "position_s": 10.0} for p, c in matches],
             "decision": None if decision is None else {
                 "id": decision[0]["id"], "title": decision[0]["title"],
                 "confidence": decision[1], "position_s": decision[2]}, **extra}
        self.ws.send(json.dumps(m))
        if final:
            self.ws.close(code=1000)


def wait_sockets(page, n: int, timeout_ms: int = 20_000) -> list[Socket]:
    """Wait until the page has opened ``n`` websockets and sent ``start`` on the last."""
    for _ in range(timeout_ms // 50):
        if len(page.sockets) >= n and page.sockets[n - 1].texts:
            return page.sockets
        page.wait_for_timeout(50)
    raise AssertionError(f"the page opened {len(page.sockets)} websockets, not {n}")


def state(page) -> dict[str, str]:
    """What the answer area says, and in which colour."""
    return page.evaluate("""() => {
        const t = document.getElementById('decision-title');
        return {state: document.getElementById('answer').dataset.state,
                label: document.getElementById('state-label').textContent,
                title: t.textContent, colour: getComputedStyle(t).color,
                label_colour: getComputedStyle(document.getElementById('state-label')).color,
                detail: document.getElementById('decision-detail').textContent,
                since: document.getElementById('decided-after').textContent,
                progress: !document.getElementById('progress').hidden,
                status: document.getElementById('status').textContent,
                status_error: document.getElementById('status').classList.contains('error'),
                demo: document.getElementById('demo-info').hidden ? null
                      : document.getElementById('demo-info').textContent,
                ranking: document.getElementById('ranking-box').hidden ? null
                         : document.getElementById('ranking-box').innerText};
    }""")


def expect_state(page, name: str, shot: str | None = None, timeout_ms: int = 10_000,
                 **contains: str) -> dict[str, str]:
    """Wait for state ``name`` (and texts: field=substring), check its colour, screenshot."""
    try:
        page.wait_for_function(
            "([s, c]) => document.getElementById('answer').dataset.state === s && "
            "Object.entries(c).every(([k, v]) => (k === 'title' ? "
            "document.getElementById('decision-title') : document.getElementById(k))"
            ".textContent.includes(v))", arg=[name, {_ID[k]: v for k, v in contains.items()}],
            timeout=timeout_ms)
    except Exception as e:  # playwright's TimeoutError: say what the page shows instead
        if type(e).__name__ != "TimeoutError":
            raise
        raise AssertionError(f"no state {name!r} with {contains}; the page shows "
                             f"{state(page)}") from None
    s = state(page)
    if shot:
        page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
    assert s["colour"] == COLOURS[name] == s["label_colour"], s
    if name != "identified":  # nothing of a decision shows outside "identified"
        assert not s["progress"] and not s["since"] and "position" not in s["detail"], s
        assert s["colour"] != COLOURS["identified"]
    return s


_ID = {"title": "title", "detail": "decision-detail", "since": "decided-after",
       "status": "status", "label": "state-label", "demo": "demo-info"}


# ----------------------------------------------------------------------------- the real stack
def test_microphone_identifies_the_piece(server, collection):
    _, wav = collection
    with opened_page(server, wav) as page:
        page.click("#mic")
        s = expect_state(page, "listening", "e2e-1-listening", detail="a few seconds",
                         title="s of audio so far")
        assert s["title"].startswith("Listening… ") and s["since"] == ""
        s = expect_state(page, "identified", "e2e-3-identified-microphone", timeout_ms=120_000,
                         since="Identified after", detail=" of 0:40")  # once /v1/pieces answers
        assert s["title"] == TARGET, s
        assert "position" in s["detail"] and s["progress"]
        # captured at the service's own rate (half the Redis memory of 44.1/48 kHz)
        assert "streaming at 22050 Hz" in s["status"]
        page.click("#stop")  # the final answer comes after a stop; the page says done
        s = expect_state(page, "identified", "e2e-4-identified-final", status="done",
                         since="Final answer")
        assert s["title"] == TARGET and page.is_disabled("#stop")


def test_demo_hides_the_answer_until_the_service_gives_one(server, collection):
    _, wav = collection
    with opened_page(server, wav) as page:
        held = []  # the excerpt is held back until the page has shown that it is rendering
        page.route("**/v1/demo*", lambda route: held.append(route))
        page.click("#demo")
        s = expect_state(page, "starting", "e2e-demo-0-rendering",
                         title="Rendering a demo excerpt…", status="Rendering a demo excerpt…")
        assert s["demo"] is None and s["ranking"] is None
        page.wait_for_timeout(200)
        assert len(held) == 1
        held[0].continue_()
        page.wait_for_selector("#demo-info:not([hidden])", timeout=60_000)
        s = expect_state(page, "listening", "e2e-demo-1-before-the-answer")
        assert "Can the service tell" in s["demo"]
        assert not any(t in s["demo"] for t in TITLES), s["demo"]  # the answer is not given away
        s = expect_state(page, "identified", timeout_ms=120_000, demo="Right")
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "e2e-demo-2-revealed.png"), full_page=True)
        assert s["demo"].startswith(f"✓ Right: the demo is “{s['title']}” from "), s["demo"]
        # another run clears the demo's note
        page.set_input_files("#file", str(wav))
        s = expect_state(page, "listening", status="File query.wav")
        assert s["demo"] is None


def test_file_streaming_identifies_the_piece(server, collection):
    _, wav = collection
    with opened_page(server, wav) as page:
        page.set_input_files("#file", str(wav))
        s = expect_state(page, "identified", timeout_ms=120_000)
        assert s["title"] == TARGET, s
        assert s["status"].startswith("File query.wav")
        # the whole 20 s: the final answer, whichever it is, agrees with itself (expect_state)
        page.wait_for_function("() => document.getElementById('status').textContent"
                               ".includes('done')", timeout=60_000)
        s = state(page)
        page.screenshot(path=str(ARTIFACTS / "e2e-file-final.png"), full_page=True)
        expect_state(page, s["state"])
        assert s["state"] in ("identified", "lost"), s


# ---------------------------------------------------------------------- scripted: each state
def test_every_state_says_what_it_is(server, collection, pieces):
    """A file run whose results the test writes: listening → leading → identified → lost → the
    music changed → identified → the end without a confident match."""
    _, wav = collection
    a, c = pieces["alpha"], pieces[TARGET]
    with opened_page(server, wav, scripted=True) as page:
        page.set_input_files("#file", str(wav))
        (ws,) = wait_sockets(page, 1)
        expect_state(page, "listening", title="Listening…")
        ws.result(1.0, [(c, 0.2), (a, 0.1)])
        s = expect_state(page, "listening", "e2e-state-1-listening",
                         title="Listening… 1.0 s of audio so far", detail="a few seconds")
        assert "%" in s["ranking"]
        ws.result(4.0, [(c, 0.55), (a, 0.3)])
        s = expect_state(page, "leading", "e2e-state-2-leading", title=f"Maybe “{TARGET}”",
                         label="not sure yet", detail="Leading with 55 % after 4.0 s of audio")
        ws.result(6.0, [(c, 0.97), (a, 0.3)], (c, 0.97, 9.3))
        s = expect_state(page, "identified", "e2e-state-3-identified", title=TARGET,
                         detail="confidence 97 % · position 0:09 of 0:40",
                         since="Identified after 6.0 s of audio")
        assert s["progress"]
        assert "how clearly a piece stands out" in s["ranking"]  # what the percentage means
        ws.result(9.0, [(c, 0.59), (a, 0.41)])  # the decision lapses mid-stream
        s = expect_state(page, "lost", "e2e-state-4-lost", title="Not sure any more",
                         detail=f"“{TARGET}” was identified from 6.0 s to 9.0 s")
        assert "Leading now: “charlie” (59 %)" in s["detail"] and "97" not in s["detail"]
        assert "59 %" in s["ranking"]  # the headline and the ranking agree
        ws.result(12.0, [(a, 0.9), (c, 0.2)], (a, 0.9, 3.0))
        s = expect_state(page, "identified", "e2e-state-5-identified-again", title="alpha",
                         since="Identified after 12.0 s of audio")
        assert "lost at 9.0 s" in s["since"] and "position 0:03" in s["detail"]
        ws.result(14.0, [(c, 0.95), (a, 0.3)], (c, 0.95, 20.0))
        s = expect_state(page, "identified", "e2e-state-6-music-changed", title=TARGET,
                         since="the music changed: it was “alpha” before")
        ws.result(20.0, [(c, 0.6), (a, 0.5)], None, final=True)
        s = expect_state(page, "lost", "e2e-state-7-lost-at-the-end",
                         title="Not sure any more at the end", status="done (20.0 s of audio)")
        assert "until the end (20.0 s), where the service was no longer sure" in s["detail"]
        assert s["label"] == "Not in the collection"  # the final answer, in the service's words
        assert not s["status_error"]


def test_not_in_the_collection_and_too_short(server, collection, pieces):
    _, wav = collection
    a = pieces["alpha"]
    with opened_page(server, wav, scripted=True) as page:
        page.set_input_files("#file", str(wav))
        (ws,) = wait_sockets(page, 1)
        ws.result(6.0, [(a, 0.4)])
        ws.result(12.0, [(a, 0.35)], None, final=True)
        s = expect_state(page, "absent", "e2e-state-8-not-in-the-collection",
                         title="Best guess “alpha” (35 %): not confident",
                         detail="No piece of the collection matched confidently in 12.0 s")
        assert s["label"] == "Not in the collection"  # the words identify and stream use

        page.click("#mic")  # stopped after 2 s: too short to say "not in the collection"
        ws = wait_sockets(page, 2)[1]
        ws.result(1.0, [(a, 0.1)])
        ws.result(2.0, [(a, 0.1)], None, final=True, answer=None)  # a service without it
        expect_state(page, "short", "e2e-state-9-too-short", title="Too short to tell",
                     detail="Only 2.0 s of audio")

        page.click("#mic")  # the service's answer decides, whatever the length: too short...
        ws = wait_sockets(page, 3)[2]
        ws.result(1.5, [], None, final=True, answer=answer(TOO_SHORT))
        s = expect_state(page, "short", "e2e-state-9a-too-short-answer",
                         title="Too short to tell", detail="Only 1.5 s of audio")
        assert s["label"] == "Too short to identify: under 2 s of music"  # identify's words
        page.click("#mic")  # ...or not in the collection after 3 s of searched audio
        ws = wait_sockets(page, 4)[3]
        ws.result(3.0, [(a, 0.1)], None, final=True, answer=answer(NOT_IN_COLLECTION))
        s = expect_state(page, "absent", "e2e-state-9a-absent-answer",
                         title="Best guess “alpha” (10 %): not confident")
        assert s["label"] == "Not in the collection"

        page.click("#mic")  # silence: the service's answer, whatever the length
        ws = wait_sockets(page, 5)[4]
        ws.result(1.0, [])
        ws.result(3.0, [], None, final=True, answer=answer(SILENT))
        s = expect_state(page, "silent", "e2e-state-9b-silent", title="Too quiet to search",
                         detail="under −60 dBFS")
        assert s["label"] == "Silent: nothing to identify"  # identify's and stream's words

        page.click("#mic")  # the worker gave the stream up
        ws = wait_sockets(page, 6)[5]
        ws.result(1.0, [], None, final=True,
                  error={"code": "bad_request", "message": "the audio could not be used"})
        s = expect_state(page, "error", "e2e-state-10-error", title="No answer",
                         status="the audio could not be used")
        assert s["status_error"] and "error above" in s["detail"]


def test_demo_verdicts(server, collection, pieces):
    """The demo's note once the service answered: right, wrong, or no piece named."""
    _, wav = collection
    demos: list[dict] = []

    def record(route) -> None:  # the real excerpt, its headers kept to know the truth
        resp = route.fetch()
        demos.append(resp.headers)
        route.fulfill(response=resp)

    with opened_page(server, wav, scripted=True) as page:
        page.route("**/v1/demo*", record)
        page.click("#demo")
        (ws,) = wait_sockets(page, 1)
        truth = next(p for p in pieces.values() if p["id"] == demos[0]["x-demo-id"])
        other = next(p for p in pieces.values() if p["id"] != truth["id"])
        s = expect_state(page, "listening", demo="Can the service tell which?")
        assert truth["title"] not in s["demo"]
        ws.result(6.0, [(other, 0.9)], (other, 0.9, 4.0))
        s = expect_state(page, "identified", "e2e-demo-3-wrong", demo="✗ Wrong")
        assert (f"the demo is “{truth['title']}” from " in s["demo"]
                and f"the service named “{other['title']}”" in s["demo"])
        assert page.eval_on_selector("#demo-info", "e => getComputedStyle(e).color") \
            == COLOURS["error"]

        page.click("#demo")  # a demo the service never names: the truth at the end
        ws = wait_sockets(page, 2)[1]
        truth = next(p for p in pieces.values() if p["id"] == demos[1]["x-demo-id"])
        s = expect_state(page, "listening", demo="Can the service tell which?")
        ws.result(8.0, [(truth, 0.5)], None, final=True)
        s = expect_state(page, "absent", "e2e-demo-4-not-named",
                         demo=f"The demo is “{truth['title']}” from ")
        assert "the service named no piece" in s["demo"]


def test_a_file_that_is_not_audio_shows_its_error(server, collection, tmp_path):
    _, wav = collection
    readme = Path(__file__).resolve().parents[2] / "README.md"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    silent = tmp_path / "no-samples.wav"  # a WAV header and not one sample
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(22050)
    cases = ((readme, "Cannot decode README.md: it is not audio", "e2e-error-1-not-audio"),
             (empty, "empty.wav is empty (0 bytes)", "e2e-error-2-empty"),
             (silent, "no-samples.wav", "e2e-error-3-no-samples"))
    with opened_page(server, wav, scripted=True) as page:
        for f, message, shot in cases:
            page.set_input_files("#file", str(f))
            expect_state(page, "error", status=message)
            page.wait_for_timeout(1500)  # it stays: nothing later overwrites it
            s = expect_state(page, "error", shot, status="Nothing was streamed.",
                             title="This file cannot be streamed")
            assert s["status_error"] and message in s["status"], s
            assert "done" not in s["status"] and s["ranking"] is None, s
            assert "Choose an audio file" in s["detail"]
        assert page.sockets == []  # no session was opened for any of them


def test_a_new_file_replaces_the_running_stream(server, collection, pieces, tmp_path):
    _, wav = collection
    a, c = pieces["alpha"], pieces[TARGET]
    other = tmp_path / "other.wav"
    other.write_bytes(wav.read_bytes())
    with opened_page(server, wav, scripted=True) as page:
        page.set_input_files("#file", str(wav))
        (first,) = wait_sockets(page, 1)
        first.result(6.0, [(a, 0.95)], (a, 0.95, 10.0))
        expect_state(page, "identified", title="alpha")
        page.set_input_files("#file", str(other))
        second = wait_sockets(page, 2)[1]
        expect_state(page, "listening", status="File other.wav")
        page.wait_for_timeout(500)
        assert {"type": "stop", "v": 1} in first.texts  # the old stream was stopped cleanly
        audio_then = first.audio_bytes
        # the old stream's last results land after the new run started: never shown
        first.result(8.0, [(a, 0.99)], (a, 0.99, 12.0), final=True)
        second.result(1.0, [(c, 0.3)])
        s = expect_state(page, "listening", "e2e-replaced-run", title="1.0 s of audio so far")
        page.wait_for_timeout(800)
        s = expect_state(page, "listening", title="1.0 s of audio so far")
        assert "alpha" not in s["title"] + s["detail"] + s["since"] + (s["ranking"] or "")
        assert "File other.wav" in s["status"] and "done" not in s["status"]
        assert first.audio_bytes == audio_then and second.audio_bytes > 0


def test_layout_and_icon(server, collection):
    _, wav = collection
    with opened_page(server, wav) as page:
        page.screenshot(path=str(ARTIFACTS / "e2e-0-idle.png"), full_page=True)
        tops = page.evaluate("() => ['mic', 'demo', 'stop'].map((id) => "
                             "document.getElementById(id).getBoundingClientRect().top)"
                             ".concat(document.querySelector('label.file')"
                             ".getBoundingClientRect().top)")
        assert len(set(tops)) == 1, tops  # one row of controls at 1280 px: Stop does not wrap
        assert state(page)["title"] == "nothing yet"
        r = page.request.get(f"{server}/favicon.ico")
        assert r.status == 200 and r.headers["content-type"].startswith("image/svg+xml")
