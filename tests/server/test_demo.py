"""The demo collection: reading an index's references, cutting and rendering an excerpt, and
the /v1/demo and /v1/pieces routes."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import pytest

from server.app import create_app
from server.demo import DemoCollection, DemoError, crop, read_pieces
from server.settings import Settings
from tests.conftest import make_piece
from worker.bus import InProcessBus


@pytest.fixture
def fake_index(tmp_path: Path) -> Path:
    """An index folder with only what the gateway reads (CURRENT and refs.jsonl)."""
    root, gen = tmp_path / "idx", tmp_path / "idx" / "gen-000001"
    gen.mkdir(parents=True)
    refs = []
    for k in range(2):
        path = tmp_path / f"song{k}.mid"
        make_piece(k, duration_s=12.0).write(str(path))
        refs.append({"path": str(path), "title": f"Song {k}", "duration_s": 12.0,
                     "sha256": f"{k:02d}" * 32})
    refs.append({"path": str(tmp_path / "gone.mid"), "duration_s": 3.0, "sha256": ""})
    (gen / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    (root / "CURRENT").write_text("gen-000001\n")
    return root


def wav_info(data: bytes) -> tuple[int, int, float]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnchannels(), w.getframerate(), w.getnframes() / w.getframerate()


def test_read_pieces_ids_and_titles(fake_index):
    pieces = read_pieces(fake_index)
    assert [p.id for p in pieces] == ["0" * 16, "01" * 8, "ref2"]  # as index.search names them
    assert [p.title for p in pieces] == ["Song 0", "Song 1", "gone"]
    with pytest.raises(DemoError):
        read_pieces(fake_index / "nope")


def test_crop_shifts_and_cuts_notes():
    pm = make_piece(3, duration_s=10.0, drums=False)
    cut = crop(pm, 4.0, 6.0)
    notes = [n for i in cut.instruments for n in i.notes]
    assert notes and min(n.start for n in notes) >= 0 and max(n.end for n in notes) <= 2.0 + 1e-9
    inside = sum(1 for i in pm.instruments for n in i.notes if n.end > 4.0 and n.start < 6.0)
    assert len(notes) == inside
    with pytest.raises(DemoError):
        crop(pm, 50.0, 60.0)


@pytest.mark.asyncio
async def test_excerpt_renders_the_requested_span(fake_index):
    demo = DemoCollection.from_index(fake_index, seed=1)
    ex = await demo.excerpt(demo.pieces[0], 4.0, start_s=2.0)
    channels, rate, seconds = wav_info(ex.wav)
    assert channels == 1 and rate == 22050
    assert 3.5 <= seconds <= 4.0 + 3.0  # a synthesiser adds the release tail
    assert ex.title == "Song 0" and ex.start_s == 2.0 and ex.renderer in ("fluidsynth", "sine")
    ex = await demo.random_excerpt(3.0)  # never the piece whose file is gone
    assert ex.title in ("Song 0", "Song 1")


@pytest.mark.asyncio
async def test_demo_and_piece_routes(aiohttp_client, fake_index):
    demo = DemoCollection.from_index(fake_index, seed=2)
    client = await aiohttp_client(create_app(Settings(demo_seconds=3.0), InProcessBus(),
                                             demo=demo))
    r = await client.get("/v1/demo")
    assert r.status == 200 and r.content_type == "audio/wav"
    assert r.headers["X-Demo-Title"] in ("Song 0", "Song 1")
    assert wav_info(await r.read())[1] == 22050
    r = await client.get(f"/v1/pieces/{'01' * 8}")
    assert (await r.json()) == {"id": "01" * 8, "title": "Song 1", "duration_s": 12.0}
    assert (await client.get("/v1/pieces/unknown")).status == 404
