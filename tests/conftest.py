"""Shared fixtures: small MIDI pieces built in code (no data files, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pretty_midi
import pytest


def make_piece(seed: int, duration_s: float = 20.0, *, program: int = 0,
               drums: bool = True) -> pretty_midi.PrettyMIDI:
    """A deterministic little piece: a melody, a bass line and optionally drums."""
    rng = np.random.default_rng(seed)
    pm = pretty_midi.PrettyMIDI(initial_tempo=120)
    lead = pretty_midi.Instrument(program=program, name="lead")
    bass = pretty_midi.Instrument(program=33, name="bass")
    t = 0.0
    root = 48 + int(rng.integers(0, 12))
    while t < duration_s:
        dur = float(rng.choice([0.25, 0.5, 0.5, 1.0]))
        pitch = root + 12 + int(rng.choice([0, 2, 4, 5, 7, 9, 11, 12]))
        lead.notes.append(pretty_midi.Note(int(rng.integers(60, 110)), pitch, t,
                                           min(t + dur, duration_s)))
        if rng.random() < 0.5:
            bass.notes.append(pretty_midi.Note(80, root - 12 + int(rng.choice([0, 5, 7])), t,
                                               min(t + dur, duration_s)))
        t += dur
    pm.instruments += [lead, bass]
    if drums:
        kit = pretty_midi.Instrument(program=0, is_drum=True, name="drums")
        for b in np.arange(0, duration_s, 0.5):
            kit.notes.append(pretty_midi.Note(100, 36 if int(b * 2) % 2 == 0 else 38,
                                              float(b), float(b) + 0.1))
        pm.instruments.append(kit)
    return pm


def one_note(pitch: int, start: float, end: float, program: int = 0, velocity: int = 100,
             drum: bool = False) -> pretty_midi.PrettyMIDI:
    """A piece of exactly one note (for checks of bins, envelopes and frame counts)."""
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program, is_drum=drum)
    inst.notes.append(pretty_midi.Note(velocity, pitch, start, end))
    pm.instruments.append(inst)
    return pm


@pytest.fixture
def midi_folder(tmp_path: Path) -> Path:
    """A folder of 5 valid pieces (one in a subfolder, one .midi) and 3 unusable files."""
    root = tmp_path / "collection"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        make_piece(i, duration_s=12 + 3 * i).write(str(root / f"piece{i}.mid"))
    make_piece(10, duration_s=15).write(str(root / "sub" / "other.midi"))
    (root / "notes.txt").write_text("not a midi file, ignored by suffix")
    (root / "fake.mid").write_bytes(b"this is not a MIDI file at all")
    good = (root / "piece0.mid").read_bytes()
    (root / "truncated.mid").write_bytes(good[: len(good) // 3])
    empty = pretty_midi.PrettyMIDI()
    empty.instruments.append(pretty_midi.Instrument(program=0))
    empty.write(str(root / "empty.mid"))
    return root


@pytest.fixture
def redis_server(tmp_path: Path):
    """A real, empty ``redis-server`` on a free port (tests/redis_server.py): ``.url``, ``.port``,
    ``.kill()`` (SIGKILL), ``.restart()`` (fresh empty server, same port); stopped at the end.
    Skips only when the ``redis-server`` binary is missing."""
    import shutil

    from tests.redis_server import REDIS_BINARY, RedisServer

    if shutil.which(REDIS_BINARY) is None:
        pytest.skip(f"{REDIS_BINARY} is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
