"""One answer everywhere: ``midimatch identify`` and ``midimatch stream`` (the client, through the
gateway, to an embedded worker with the real engine, on the same index) give the same answer kind
in the same words on the same audio, silent, out of the collection or too short; and that gateway's
``/readyz`` shows the calibration the worker decides with, with its provenance."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import soundfile as sf

from index.answers import ANSWERS, NOT_IN_COLLECTION, SILENT, TOO_SHORT, answer, answer_line
from index.build import BuildOptions, build_index
from model.training.render import render
from server.app import create_app
from server.cli import main
from server.client import StreamClient, print_message
from server.settings import Settings
from tests.conftest import make_piece
from worker.local_bus import InProcessBus
from worker.runner import run_embedded

RATE = 22050


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """An index of three pieces; a silent file and 12 s of a fourth piece, not indexed."""
    root = tmp_path_factory.mktemp("answers")
    songs = root / "songs"
    songs.mkdir()
    for i in range(3):
        make_piece(200 + i, duration_s=30.0, program=(0, 40, 73)[i], drums=False).write(
            str(songs / f"tune{i}.mid"))
    build_index(root / "idx", [songs], BuildOptions(workers=1, progress=False))
    outsider = render(make_piece(321, duration_s=30.0, program=0, drums=False), "sine",
                      sample_rate=RATE)
    sf.write(root / "outsider.wav", outsider[8 * RATE:20 * RATE], RATE)
    sf.write(root / "silent.wav", np.zeros(6 * RATE, np.float32), RATE)
    sf.write(root / "short.wav", outsider[8 * RATE:9 * RATE], RATE)  # music, under a query's 2 s
    return root


def identify(capsys, root, name: str, *flags: str) -> tuple[int, str]:
    code = main(["identify", "--index", str(root / "idx"), str(root / name), *flags])
    return code, capsys.readouterr().out


@pytest.mark.asyncio
async def test_identify_and_stream_give_the_same_answer(collection, capsys, aiohttp_client):
    said = {}
    for name in ("silent.wav", "outsider.wav", "short.wav"):
        code, out = identify(capsys, collection, name, "--json")
        assert code == 0  # an answer, not a failure
        said[name] = json.loads(out)
        _, text = identify(capsys, collection, name)
        said[name]["line"] = text.strip().split(": ", 1)[1]

    bus, ready = InProcessBus(), asyncio.Event()
    worker = asyncio.create_task(run_embedded(bus, collection / "idx", ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 120)
        client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
        url = str(client.make_url("/v1/stream"))
        finals = {}
        for name in said:
            finals[name] = await asyncio.wait_for(StreamClient(url, realtime=False).stream_file(
                collection / name, lambda m: print_message(m, False)), 120)
            finals[name]["line"] = capsys.readouterr().out.splitlines()[-1]
        readyz = await (await client.get("/readyz")).json()
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker

    for name, kind in (("silent.wav", SILENT), ("outsider.wav", NOT_IN_COLLECTION),
                       ("short.wav", TOO_SHORT)):
        offline, stream = said[name], finals[name]
        assert offline["answer"] == stream["answer"] == answer(kind), name
        assert offline["decision"] == kind
        # the same words: identify's line starts with them, the stream's final line ends with them
        assert offline["line"].startswith(answer_line(kind)), offline["line"]
        assert stream["line"].endswith(f"[final]  {ANSWERS[kind]}"), stream["line"]
    assert said["silent.wav"]["line"] == "silent: nothing to identify"

    # /readyz: the shipped calibration the embedded worker decides with, and where it came from
    (cal,) = readyz["calibrations"]
    assert cal["model_id"] == said["outsider.wav"]["model_id"] and cal["calibrated"]
    assert cal["provenance"]["queries"]["renderers"] == ["adplay-opl3", "timidity-freepats"]
    from index.calibration import load_calibration

    shipped = load_calibration(cal["model_id"])  # bench/time_to_identify.py --save-calibration
    assert cal["provenance"]["streams"]["n_out"] == shipped.provenance.streams.n_out > 0
    assert cal["evidence_threshold"] == shipped.evidence_threshold  # the live stream rule's
    assert "timidity-freepats" in cal["summary"] and readyz["warnings"] == []
