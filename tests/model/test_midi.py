"""Tests of model.midi: bad files through both loaders (load_midi, load_notes), limits, fuzzing.

The fast render itself, and load_notes reading what load_midi reads, are in test_fastrender.py;
rendering (model.synth) is in test_synth.py.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
from pathlib import Path

import mido
import numpy as np
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


# --- tempo and signatures in any track (players obey them wherever they are) -------------------

FANFARE = "/usr/share/solfege/exercises/standard/lesson-files/share/fanfare.midi"


def _notes(loaded: pretty_midi.PrettyMIDI | NoteTable) -> list[tuple[float, float, int]]:
    """Every note as (start, end, pitch), sorted: exact floats, to compare two readings."""
    if isinstance(loaded, NoteTable):
        return sorted(zip(loaded.onset_s.tolist(), loaded.offset_s.tolist(),
                          loaded.pitch.tolist(), strict=True))
    return sorted((n.start, n.end, n.pitch) for i in loaded.instruments for n in i.notes)


def _mido_file(tracks: list[list[mido.Message | mido.MetaMessage]], *, fmt: int = 1,
               tpb: int = 384) -> bytes:
    """A file of ``tracks`` (delta times), each closed by an end of track."""
    mf = mido.MidiFile(type=fmt, ticks_per_beat=tpb)
    mf.tracks = [mido.MidiTrack([*t, mido.MetaMessage("end_of_track", time=0)]) for t in tracks]
    buf = io.BytesIO()
    mf.save(file=buf)
    return buf.getvalue()


def _melody(n: int = 8, *, channel: int = 0, first: int = 60) -> list[mido.Message]:
    """``n`` quarter notes (384 ticks) one after the other."""
    out: list[mido.Message] = [mido.Message("program_change", channel=channel, program=0)]
    for k in range(n):
        out += [mido.Message("note_on", channel=channel, note=first + k, velocity=90, time=0),
                mido.Message("note_off", channel=channel, note=first + k, velocity=0, time=384)]
    return out


def _tempo_at(tick: int, us: int) -> mido.MetaMessage:
    return mido.MetaMessage("set_tempo", tempo=us, time=tick)


def _with_meta(events: list[tuple[int, mido.MetaMessage]], music: list[mido.Message]
               ) -> list[mido.Message | mido.MetaMessage]:
    """``music`` (delta times) with meta events inserted at absolute ticks (before the music's
    events of that tick)."""
    timed, tick = [], 0
    for msg in music:
        tick += msg.time
        timed.append((tick, 1, msg))
    timed += [(t, 0, m) for t, m in events]
    out, last = [], 0
    for t, _, m in sorted(timed, key=lambda e: (e[0], e[1])):
        out.append(m.copy(time=t - last))
        last = t
    return out


def _both(data: bytes) -> list[list[tuple[float, float, int]]]:
    return [_notes(M.load_midi(data)), _notes(M.load_notes(data))]


def test_a_tempo_only_in_track_1_is_obeyed_as_players_do() -> None:
    # solfege's fanfare.midi in small: a conductor track without tempo, 100 bpm in track 1
    name = mido.MetaMessage("track_name", name="Track 0")
    sig = mido.MetaMessage("time_signature", numerator=3, denominator=8)
    in_1 = _mido_file([[name], [sig, _tempo_at(0, 600_000), *_melody()]])
    in_0 = _mido_file([[name, sig, _tempo_at(0, 600_000)], _melody()])
    want = [(0.6 * k, 0.6 * (k + 1), 60 + k) for k in range(8)]
    for got in (*_both(in_1), *_both(in_0)):
        assert got == _both(in_0)[0]  # same music, same floats, whichever track and loader
        np.testing.assert_allclose(got, want, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pretty_midi's warning of tempo outside track 0: gone
        pm = M.load_midi(in_1)
    assert pm.get_end_time() == M.load_notes(in_1).end_s == pytest.approx(4.8)
    assert mido.MidiFile(file=io.BytesIO(in_1)).length == pytest.approx(4.8)  # mido's player
    # what pretty_midi alone reads: 120 bpm, 1.2x too fast (the bug this guards)
    with pytest.warns(RuntimeWarning, match="non-zero tracks"):
        assert pretty_midi.PrettyMIDI(io.BytesIO(in_1)).get_end_time() == pytest.approx(4.0)
    assert [(ts.numerator, ts.denominator, ts.time) for ts in pm.time_signature_changes] == [
        (3, 8, 0.0)]


def test_tempo_changes_spread_over_tracks_make_one_tempo_map() -> None:
    # 120 bpm in track 0, a change at beat 2 in track 1, another at beat 5 in track 2 (with a
    # key signature), and the music in tracks 1 and 2: as if all were in track 0
    changes = [(0, _tempo_at(0, 500_000)), (768, _tempo_at(0, 750_000)),
               (1920, _tempo_at(0, 400_000))]
    key = (1920, mido.MetaMessage("key_signature", key="Eb"))
    spread = _mido_file([[_tempo_at(0, 500_000)],
                         _with_meta([changes[1]], _melody(6)),
                         _with_meta([changes[2], key], _melody(6, channel=1, first=70))])
    merged = _mido_file([_with_meta([*changes, key], []), _melody(6),
                         _melody(6, channel=1, first=70)])
    assert _both(spread)[0] == _both(spread)[1] == _both(merged)[0] == _both(merged)[1]
    pm = M.load_midi(spread)
    np.testing.assert_allclose(pm.get_tempo_changes()[1], [120.0, 80.0, 150.0])
    assert len(pm.key_signature_changes) == 1
    # beats 0-1 at 0.5 s, 2-4 at 0.75 s, 5 at 0.4 s
    np.testing.assert_allclose([n for n in _both(spread)[0] if n[2] < 70], [
        (0.0, 0.5, 60), (0.5, 1.0, 61), (1.0, 1.75, 62), (1.75, 2.5, 63), (2.5, 3.25, 64),
        (3.25, 3.65, 65)], atol=1e-9)


def test_two_tempi_on_one_tick_the_last_track_wins() -> None:
    # TiMidity 2.14 and FluidSynth 2.3 both play such a file at track 1's tempo (checked by
    # rendering one): they apply one tick's events in track order, as mido.merge_tracks does
    for change_tick in (0, 768):
        clash = _mido_file([[_tempo_at(0, 500_000), _tempo_at(change_tick, 300_000)],
                            _with_meta([(change_tick, _tempo_at(0, 900_000))], _melody(4))])
        plain = _mido_file([[_tempo_at(0, 500_000), _tempo_at(change_tick, 900_000)],
                            _melody(4)])
        assert _both(clash)[0] == _both(clash)[1] == _both(plain)[0], change_tick


def test_files_with_their_tempo_in_track_0_read_exactly_as_pretty_midi_reads_them(
        tmp_path) -> None:
    from model.training.midi_writer import write_midi
    from model.training.songgen import generate_song
    from tests.conftest import make_piece

    song = tmp_path / "song.mid"
    write_midi(generate_song(3, duration_s=20.0), song)
    tempo_map = [_tempo_at(0, 500_000), _tempo_at(700, 350_000), _tempo_at(500, 812_345)]
    files = {"generated song (write_midi)": song.read_bytes(),
             "pretty_midi write": _pm_bytes(make_piece(2, duration_s=10.0)),
             "demo piece": _pm_bytes(demo_piece(6.0)),
             "tempo map in track 0": _mido_file([tempo_map, _melody(), _melody(channel=1)]),
             "format 0": _mido_file([_with_meta([(0, _tempo_at(0, 700_000)),
                                                 (900, _tempo_at(0, 450_000))], _melody())],
                                    fmt=0)}
    for name, data in files.items():
        mf = mido.MidiFile(file=io.BytesIO(data), clip=True)
        tracks = list(mf.tracks)
        assert M._global_meta_to_track0(mf) is False, name  # nothing moves...
        assert all(a is b for a, b in zip(mf.tracks, tracks, strict=True)), name
        plain = pretty_midi.PrettyMIDI(io.BytesIO(data))  # ...and the reading is pretty_midi's
        for loaded in (M.load_midi(data), M.load_notes(data)):
            assert _notes(loaded) == _notes(plain), name
            assert _end_s(loaded) == plain.get_end_time(), name


def test_a_track_of_nothing_but_a_tempo_event_is_obeyed() -> None:
    # no end of track either (mido and symusic read it); emptied, pretty_midi would refuse it
    data = _smf([_note() + _note(pitch=62) + EOT, _tempo(1_000_000)])
    for got in _both(data):
        np.testing.assert_allclose(got, [(0.0, 1.0, 60), (1.0, 2.0, 62)])


def test_a_format_2_file_is_read_as_format_1() -> None:
    # Format 2 tracks are independent sequences: TiMidity plays them one after another, each
    # at its own tempo, FluidSynth (and pretty_midi, and this loader) all at once. The tempo
    # events count wherever they are, as FluidSynth has them.
    tracks = [[mido.MetaMessage("track_name", name="a")], [_tempo_at(0, 600_000), *_melody(4)]]
    assert _both(_mido_file(tracks, fmt=2)) == _both(_mido_file(tracks, fmt=1))
    np.testing.assert_allclose(_both(_mido_file(tracks, fmt=2))[0][-1], (1.8, 2.4, 63))


def test_a_bad_tempo_outside_track_0_is_refused_as_in_track_0() -> None:
    for loader in LOADERS.values():
        with pytest.raises(MidiError) as e:
            loader(_smf([_note() + EOT, _tempo(1) + _note() + EOT]))
        assert e.value.reason == "bad_tempo"
        with pytest.raises(MidiError) as e:  # 1 bpm in track 1 from tick 0: hours long
            loader(_smf([_note(96 * 70) + EOT, _tempo(60_000_000 // 4) + EOT]),
                   max_duration_s=600.0)
        assert e.value.reason == "too_long"


@pytest.mark.skipif(not Path(FANFARE).is_file(),
                    reason="needs solfege's fanfare.midi: apt-get install solfege")
def test_solfege_fanfare_plays_at_its_100_bpm() -> None:
    # its tempo (and 3/8 time) are in track 1, track 0 holds only LilyPond's texts
    mf = mido.MidiFile(FANFARE)
    assert [m.type for m in mf.tracks[0] if m.type == "set_tempo"] == []
    assert [m.tempo for m in mf.tracks[1] if m.type == "set_tempo"] == [600_000]
    pm, table = M.load_midi(FANFARE), M.load_notes(FANFARE)
    np.testing.assert_allclose(pm.get_tempo_changes()[1], [100.0])
    assert _notes(pm) == _notes(table)
    assert pm.get_end_time() == table.end_s == pytest.approx(2.1)
    assert mf.length == pytest.approx(2.1)  # as mido's player times it
    # 1.2x what pretty_midi alone reads
    with pytest.warns(RuntimeWarning, match="non-zero tracks"):
        alone = pretty_midi.PrettyMIDI(FANFARE)
    assert alone.get_end_time() == pytest.approx(1.75)
    np.testing.assert_allclose([s for s, _, _ in _notes(pm)],
                               [1.2 * s for s, _, _ in _notes(alone)], atol=1e-9)
