"""Tests of model.midi: bad files through both loaders (load_midi, load_notes), limits, fuzzing.

The fast render itself, and load_notes reading what load_midi reads, are in test_fastrender.py;
rendering (model.synth) is in test_synth.py.
"""

from __future__ import annotations

import io
import struct
import time

import pretty_midi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import midi as M
from model.errors import MidiError
from model.fastrender import NoteTable, demo_piece

# --- building files in code --------------------------------------------------------------------

def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.append(0x80 | (n & 0x7F))
    return bytes(reversed(out))


def _smf(tracks: list[bytes], *, fmt: int = 1, division: int = 96,
         ntrks: int | None = None) -> bytes:
    n = len(tracks) if ntrks is None else ntrks
    head = b"MThd" + struct.pack(">IHHH", 6, fmt, n, division)
    return head + b"".join(b"MTrk" + struct.pack(">I", len(t)) + t for t in tracks)


def _tempo(us_per_beat: int) -> bytes:
    return b"\x00\xff\x51\x03" + us_per_beat.to_bytes(3, "big")


def _note(delta_off: int = 96, pitch: int = 60) -> bytes:
    return b"\x00\x90" + bytes([pitch, 100]) + _vlq(delta_off) + b"\x80" + bytes([pitch, 0])


EOT = b"\x00\xff\x2f\x00"
VALID = _smf([_tempo(500_000) + _note() + EOT])


def _pm_bytes(pm: pretty_midi.PrettyMIDI) -> bytes:
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


# --- load_midi and load_notes -------------------------------------------------------------------

LOADERS = {"load_midi": M.load_midi, "load_notes": M.load_notes}


def _n_notes(loaded: pretty_midi.PrettyMIDI | NoteTable) -> int:
    if isinstance(loaded, NoteTable):
        return loaded.n_notes
    return sum(len(i.notes) for i in loaded.instruments)


def _end_s(loaded: pretty_midi.PrettyMIDI | NoteTable) -> float:
    return loaded.end_s if isinstance(loaded, NoteTable) else loaded.get_end_time()


def test_valid_file_from_bytes_and_path(tmp_path) -> None:
    pm = M.load_midi(VALID)
    (note,) = pm.instruments[0].notes
    assert (note.pitch, note.start, note.end) == (60, 0.0, 0.5)
    table = M.load_notes(VALID)
    assert (table.pitch.tolist(), table.onset_s.tolist(), table.offset_s.tolist(),
            table.end_s) == ([60], [0.0], [0.5], 0.5)
    demo = demo_piece(8.0)
    path = tmp_path / "demo.mid"
    demo.write(str(path))
    for load in LOADERS.values():
        for source in (path, str(path), _pm_bytes(demo)):
            assert _n_notes(load(source)) == _n_notes(demo)


BAD_FILES = {
    "empty": (b"", "not_midi"),
    "text": (b"hello, this is not a MIDI file at all", "not_midi"),
    "wav": (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40), "not_midi"),
    "bad_format": (VALID[:8] + b"\x00\x07" + VALID[10:], "not_midi"),
    "cut_in_track": (VALID[:-3], "truncated"),
    "missing_tracks": (_smf([_tempo(500_000) + _note() + EOT], ntrks=3), "truncated"),
    "cut_in_event": (_smf([b"\x00\x90\x3c"]), "truncated"),
    "no_tracks": (_smf([], ntrks=0), "no_notes"),
    "only_tempo": (_smf([_tempo(500_000) + EOT]), "no_notes"),
    "zero_velocity_only": (_smf([b"\x00\x90\x3c\x00" + EOT]), "no_notes"),
    "tempo_zero": (_smf([_tempo(0) + _note() + EOT]), "bad_tempo"),
    "tempo_60M_bpm": (_smf([_tempo(1) + _note() + EOT]), "bad_tempo"),
    "tempo_3.6_bpm": (_smf([_tempo(0xFFFFFF) + _note() + EOT]), "bad_tempo"),
    "hours_long_note": (_smf([_tempo(500_000) + _note(9_000_000) + EOT]), "too_long"),
    "huge_tick": (_smf([_note(0x0FFFFFFF) + EOT]), "too_long"),
    # 9 maximal delta-times: past 2**31 ticks, where symusic's int32 ticks turn negative
    "tick_overflow": (_smf([b"".join(_vlq(0x0FFFFFFF) + b"\xff\x01\x00" for _ in range(9))
                            + _note() + EOT]), "too_long"),
    "5000_tracks": (_smf([_note()] + [EOT] * 4999), "too_many_tracks"),
    "65535_tracks_declared": (_smf([_note() + EOT], ntrks=65535), "too_many_tracks"),
    "too_large": (VALID + bytes(M.MAX_BYTES), "too_large"),
    "alien_chunk": (VALID[:14] + b"XFIH\x00\x00\x00\x00", "corrupt"),
    "running_status_first": (_smf([b"\x00\x3c\x64" + EOT]), "corrupt"),
    "zero_division": (_smf([_note() + EOT], division=0), "corrupt"),
    "smpte_division": (_smf([_note() + EOT], division=0xE728), "unsupported"),
    "key_signature_32_sharps": (_smf([b"\x00\xff\x59\x02\x20\x00" + _note() + EOT]), "corrupt"),
    "time_signature_0_4": (_smf([b"\x00\xff\x58\x04\x00\x02\x18\x08" + _note() + EOT]),
                           "corrupt"),
    # symusic would read on past these (into the next event, or stale memory): left to mido
    "tempo_event_of_2_bytes": (_smf([b"\x00\xff\x51\x02\x07\xa1" + _note() + EOT]), "corrupt"),
    "tempo_event_of_0_bytes_last": (_smf([_note() + b"\x00\xff\x51\x00"]), "corrupt"),
}
ODD_META = {"tempo_event_of_2_bytes", "tempo_event_of_0_bytes_last"}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_midi_gives_a_typed_error_quickly(name: str, loader: str) -> None:
    data, reason = BAD_FILES[name]
    t0 = time.perf_counter()
    with pytest.raises(MidiError) as e:
        LOADERS[loader](data)
    assert e.value.reason == reason, str(e.value)
    assert time.perf_counter() - t0 < 3.0  # a sanity bound, not a benchmark


def test_symusic_only_sees_files_that_pass_the_header_checks(monkeypatch) -> None:
    seen: list[bytes] = []
    real = M._parse_symusic
    monkeypatch.setattr(M, "_parse_symusic", lambda smf: seen.append(smf) or real(smf))
    for name, (data, _) in sorted(BAD_FILES.items()):
        try:
            M._check_chunks(M._read_bounded(data, M.MAX_BYTES), M.MAX_TRACKS)
            header_ok = True
        except MidiError:
            header_ok = False
        seen.clear()
        with pytest.raises(MidiError):
            M.load_notes(data)
        assert bool(seen) == (header_ok and name not in ODD_META), name
        # what it sees: a canonical 6-byte header and the checked chunks, nothing after them
        assert all(s[:8] == b"MThd\x00\x00\x00\x06" and len(s) <= len(data) for s in seen)
    seen.clear()
    odd = b"MThd" + struct.pack(">IHHH", 8, 1, 1, 96) + b"\x00\x00" + VALID[14:] + b"junk"
    assert M.load_notes(odd).n_notes == 1 and seen == [VALID]


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_limits_are_parameters_and_paths_are_checked(tmp_path, loader: str) -> None:
    load = LOADERS[loader]
    with pytest.raises(MidiError) as e:
        load(VALID, max_bytes=10)
    assert e.value.reason == "too_large"
    with pytest.raises(MidiError) as e:
        load(_pm_bytes(demo_piece(30.0)), max_duration_s=20.0)
    assert e.value.reason == "too_long"
    with pytest.raises(MidiError) as e:
        load(_smf([_note(2000) + EOT]), max_ticks=1000)
    assert e.value.reason == "too_long"
    with pytest.raises(MidiError) as e:
        load(_smf([_tempo(500_000) + _note() + EOT]), bpm_range=(130.0, 200.0))
    assert e.value.reason == "bad_tempo"
    big = tmp_path / "big.mid"
    big.write_bytes(VALID + bytes(2000))
    with pytest.raises(MidiError) as e:
        load(big, max_bytes=1000)
    assert e.value.reason == "too_large"
    for missing in (tmp_path / "nope.mid", tmp_path):
        with pytest.raises(MidiError) as e:
            load(missing)
        assert e.value.reason == "unreadable"


def _mutate(seed: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(seed)
    for op, pos, byte in edits:
        i = pos % max(1, len(data))
        if op == "set" and data:
            data[i] = byte
        elif op == "insert":
            data.insert(i, byte)
        elif op == "delete" and data:
            del data[i]
        elif op == "cut":
            del data[i:]
    return bytes(data)


def _load_or_fail_typed(load, data: bytes) -> None:
    t0 = time.perf_counter()
    try:
        loaded = load(data)
    except MidiError:
        pass
    else:
        assert isinstance(loaded, (pretty_midi.PrettyMIDI, NoteTable))
        assert _n_notes(loaded) > 0 and _end_s(loaded) <= M.MAX_DURATION_S
    assert time.perf_counter() - t0 < 3.0


FUZZ_SEED = _pm_bytes(demo_piece(4.0))  # a conductor track and five instruments


def _tracks(smf: bytes) -> list[bytes]:
    pos, out = 14, []
    while pos < len(smf):
        length = struct.unpack(">I", smf[pos + 4:pos + 8])[0]
        out.append(smf[pos + 8:pos + 8 + length])
        pos += 8 + length
    return out


FUZZ_TRACKS = _tracks(FUZZ_SEED)
EDITS = st.lists(st.tuples(st.sampled_from(["set", "insert", "delete", "cut"]),
                           st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=EDITS)
def test_mutated_files_load_or_fail_typed(loader: str, edits: list[tuple[str, int, int]]) -> None:
    _load_or_fail_typed(LOADERS[loader], _mutate(FUZZ_SEED, edits))


@pytest.mark.parametrize("loader", sorted(LOADERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(track=st.integers(0, len(FUZZ_TRACKS) - 1), edits=EDITS)
def test_files_mutated_inside_a_track_load_or_fail_typed(loader: str, track: int,
                                                         edits: list[tuple[str, int, int]]) -> None:
    # Chunk lengths follow the edits, so that the bytes reach the event parser (mido or
    # symusic) instead of stopping at the chunk table.
    body = _mutate(FUZZ_TRACKS[track], edits)
    tracks = [body if k == track else t for k, t in enumerate(FUZZ_TRACKS)]
    _load_or_fail_typed(LOADERS[loader], _smf(tracks, division=FUZZ_SEED[12] << 8 | FUZZ_SEED[13]))
