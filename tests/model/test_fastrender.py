"""Tests of model.fastrender: the note render, and NoteTable read by load_notes vs load_midi."""

from __future__ import annotations

import io
from pathlib import Path

import mido
import numpy as np
import pretty_midi
import pytest

from model import fastrender as R
from model import features as F
from model import midi as M
from model.errors import MidiError
from model.fastrender import NoteTable
from tests.conftest import make_piece, one_note

# --- the render ----------------------------------------------------------------------------------

def test_fast_render_single_note() -> None:
    pm = one_note(60, 1.0, 2.0, program=0)
    raw = R.midi_to_magnitude_fast(pm)
    frames = R.midi_to_frames_fast(pm)
    t = np.arange(frames.shape[0]) / F.FRAME_RATE
    sounding = (t >= 1.0) & (t < 2.0)
    assert frames.shape == (R.n_frames(pm), 48) == (1 + int(2.0 * 22050) // 1024, 48)
    assert (frames[sounding].argmax(axis=1) == 60 - F.MIDI_LO).all()
    assert not frames[~sounding].any()  # silent before the onset and after the note ends
    # Hand-computed: the octave partial sits alone at bin 36 with amplitude 1/2.
    t0 = int(np.argmax(sounding))
    assert raw[t0, 36] == pytest.approx((100 / 127) ** 2 * 0.5 * F.BIN_GAIN[36])
    assert raw[t0, 25] == pytest.approx((100 / 127) ** 2 * R.BLEED[1] * F.BIN_GAIN[25])
    # Piano fades at DECAY_DB_S[0] dB/s.
    d_db = 20 * np.log10(raw[t0, 24] / raw[t0 + 10, 24])
    assert d_db == pytest.approx(R.DECAY_DB_S[0] * 10 / F.FRAME_RATE)


def test_fast_render_programs_velocity_drums_and_range() -> None:
    organ = R.midi_to_magnitude_fast(one_note(48, 0.0, 2.0, program=19))
    assert np.allclose(organ[:40, 12], organ[0, 12])  # sustained family holds
    soft = R.midi_to_magnitude_fast(one_note(48, 0.0, 1.0, velocity=64))
    loud = R.midi_to_magnitude_fast(one_note(48, 0.0, 1.0, velocity=127))
    assert soft[0, 12] / loud[0, 12] == pytest.approx((64 / 127) ** 2)
    drum = R.midi_to_magnitude_fast(one_note(38, 1.0, 1.01, drum=True), n_total=60)
    hit = np.flatnonzero(drum.any(axis=1))
    assert hit.size == R.DRUM_FRAMES and (drum[hit[0]] == drum[hit[0], 0]).all()
    assert (np.diff(drum[hit, 0]) < 0).all()
    low = R.midi_to_frames_fast(one_note(30, 0.0, 1.0))  # fundamental below the bins
    assert (low[:10].argmax(axis=1) == 30 + 12 - F.MIDI_LO).all()
    for start in (0.20, 0.50):  # shorter than a hop; the second in the piece's last hop
        short = R.midi_to_frames_fast(one_note(70, start, start + 0.01))
        assert np.flatnonzero(short.any(axis=1)).tolist() == [
            min(round(start * F.FRAME_RATE), short.shape[0] - 1)]


def test_bleed_matches_the_cqt_of_a_tone() -> None:
    t = np.arange(22050) / 22050
    raw = F.audio_to_frames(np.sin(2 * np.pi * 261.63 * t).astype(np.float32), 22050,
                            log=False)[10]
    k = 60 - F.MIDI_LO
    assert raw[k + 1] / raw[k] == pytest.approx(R.BLEED[1], abs=0.05)
    assert raw[k - 1] / raw[k] == pytest.approx(R.BLEED[1], abs=0.05)
    assert raw[k + 2] / raw[k] == pytest.approx(R.BLEED[2], abs=0.01)


def _render_reference(t_on, t_off, pitch, amp, decay, drum, power) -> None:
    """Plain-Python twin of the numba kernel."""
    for i in range(len(t_on)):
        for t in range(t_on[i], t_off[i]):
            env = amp[i] * decay[i] ** (t - t_on[i])
            if drum[i]:
                power[t] += (env * R.DRUM_GAIN) ** 2
                continue
            for off, pa in zip(R.PARTIALS, R.PARTIAL_AMP, strict=True):
                c = pitch[i] - F.MIDI_LO + off
                if not 0 <= c < 48:
                    continue
                for d in range(-2, 3):
                    if 0 <= c + d < 48:
                        power[t, c + d] += (env * pa * R.BLEED[abs(d)] * F.BIN_GAIN[c + d]) ** 2


def test_fast_kernel_matches_plain_python() -> None:
    rng = np.random.default_rng(0)
    n, total = 60, 120
    t_on = rng.integers(0, total, n)
    t_off = np.minimum(total, t_on + rng.integers(1, 30, n))
    pitch = rng.integers(0, 128, n)
    amp, decay = rng.uniform(0.1, 1, n), rng.uniform(0.5, 1, n)
    drum = rng.random(n) < 0.2
    got, want = np.zeros((total, 48)), np.zeros((total, 48))
    R._render_notes(t_on, t_off, pitch, amp, decay, drum, F.MIDI_LO, R.PARTIALS, R.PARTIAL_AMP,
                    R.BLEED, F.BIN_GAIN, R.DRUM_GAIN, got)
    _render_reference(t_on, t_off, pitch, amp, decay, drum, want)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_note_table_from_pretty_midi_and_empty() -> None:
    pm = make_piece(3, duration_s=6.0)
    table = NoteTable.from_pretty_midi(pm)
    assert table.n_notes == sum(len(i.notes) for i in pm.instruments)
    assert table.end_s == pm.get_end_time() and R.n_frames(table) == R.n_frames(pm)
    kit = next(i for i in pm.instruments if i.is_drum)
    assert table.is_drum.sum() == len(kit.notes) and set(table.program) == {0, 33}
    np.testing.assert_array_equal(R.midi_to_frames_fast(table), R.midi_to_frames_fast(pm))
    empty = NoteTable.from_pretty_midi(pretty_midi.PrettyMIDI())
    assert empty.n_notes == 0 and empty.onset_s.dtype == np.float64
    assert R.midi_to_frames_fast(empty).shape == (1, 48)
    assert M.NoteTable is NoteTable


# --- load_notes reads what load_midi reads -------------------------------------------------------

def _sorted(t: NoteTable) -> list[np.ndarray]:
    order = np.lexsort((t.is_drum, t.program, t.velocity, t.pitch, t.offset_s, t.onset_s))
    return [a[order] for a in (t.onset_s, t.offset_s, t.pitch, t.velocity, t.program, t.is_drum)]


def _assert_same_reading(source: Path | bytes, *, exact: bool = True) -> NoteTable:
    pm = M.load_midi(source)
    fast = M.load_notes(source)
    want = R.midi_to_frames_fast(pm)
    got = R.midi_to_frames_fast(fast)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if exact:  # same notes to the last bit, and the same end
        ref = NoteTable.from_pretty_midi(pm)
        for a, b in zip(_sorted(fast), _sorted(ref), strict=True):
            np.testing.assert_array_equal(a, b)
        assert fast.end_s == ref.end_s
    return fast


def _mido_bytes(mf: mido.MidiFile) -> bytes:
    buf = io.BytesIO()
    mf.save(file=buf)
    return buf.getvalue()


def _tempo_map_piece(fmt: int) -> bytes:
    """Tempo changes (one repeated, one on a later track), program changes mid-track, drums,
    two channels on one track, note-offs as velocity-0 note-ons, and a controller, a pitch bend
    and a lyric after the last note (they set the end)."""
    conductor = [mido.MetaMessage("time_signature", numerator=3, denominator=4),
                 mido.MetaMessage("key_signature", key="Eb"),
                 mido.MetaMessage("set_tempo", tempo=500_000)]
    for tick, tempo in ((1000, 350_000), (700, 350_000), (900, 812_345), (1500, 620_000)):
        conductor.append(mido.MetaMessage("set_tempo", tempo=tempo, time=tick))
    music: list[mido.Message] = [mido.Message("program_change", channel=0, program=40),
                                 mido.Message("program_change", channel=2, program=19)]
    rng = np.random.default_rng(7)
    for k in range(80):
        ch = (0, 2, 9)[k % 3]
        pitch = int(rng.integers(36, 90))
        music.append(mido.Message("note_on", channel=ch, note=pitch, velocity=int(rng.integers(
            20, 128)), time=int(rng.integers(0, 90))))
        music.append(mido.Message("note_on", channel=ch, note=pitch, velocity=0,
                                  time=int(rng.integers(1, 200))))
        if k == 40:
            music.append(mido.Message("program_change", channel=0, program=0))
    music += [mido.Message("control_change", channel=0, control=64, value=0, time=300),
              mido.Message("pitchwheel", channel=0, pitch=500, time=100),
              mido.MetaMessage("lyrics", text="la", time=50)]
    late = [mido.MetaMessage("set_tempo", tempo=200_000, time=50),  # obeyed, as players do
            mido.Message("note_on", channel=1, note=64, velocity=90, time=10),
            mido.Message("note_off", channel=1, note=64, velocity=0, time=400)]
    tracks = [conductor, music, late]
    if fmt == 0:  # one track: absolute times merged
        merged = mido.merge_tracks([mido.MidiTrack(t) for t in tracks])
        tracks = [list(merged)]
    mf = mido.MidiFile(type=fmt, ticks_per_beat=384)
    mf.tracks = [mido.MidiTrack(t + [mido.MetaMessage("end_of_track", time=0)]) for t in tracks]
    return _mido_bytes(mf)


@pytest.mark.parametrize("name", ["tempo_map_fmt1", "tempo_map_fmt0", "demo", "make_piece",
                                  "one_drum_hit"])
def test_load_notes_reads_as_load_midi(name: str, tmp_path) -> None:
    if name.startswith("tempo_map"):
        data = _tempo_map_piece(int(name[-1]))
    elif name == "one_drum_hit":
        pm = one_note(38, 0.3, 0.35, drum=True)
        data = _pm_bytes(pm)
    else:
        pm = R.demo_piece(20.0, seed=3) if name == "demo" else make_piece(5, duration_s=15.0)
        data = _pm_bytes(pm)
    path = tmp_path / "piece.mid"
    path.write_bytes(data)
    table = _assert_same_reading(path)
    assert table.n_notes > 0 and table.end_s >= table.offset_s.max()
    if name.startswith("tempo_map"):  # the fixture does what it says
        pm = M.load_midi(path)
        # the repeat is dropped; the tempo on track 2 counts (format 0 has it in its one track)
        assert len(pm.get_tempo_changes()[0]) == 5
        assert table.end_s > table.offset_s.max()
        assert len({(p, d) for p, d in zip(table.program, table.is_drum, strict=True)}) == 4


def _pm_bytes(pm: pretty_midi.PrettyMIDI) -> bytes:
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


def _raw_smf(track: list[tuple[int, int, int, int]]) -> bytes:
    """One-track file from (delta, status, data1, data2) channel events, 96 ticks per beat."""
    body = b"".join(bytes([d, s, a, b]) for d, s, a, b in track) + b"\x00\xff\x2f\x00"
    return b"MThd" + (6).to_bytes(4, "big") + bytes([0, 0, 0, 1, 0, 96]) + b"MTrk" + len(
        body).to_bytes(4, "big") + body


def test_overlapping_unisons_are_read_as_pretty_midi_reads_them(monkeypatch) -> None:
    # Two voices sound C4 at once on one channel: pretty_midi's note-off ends both (as a
    # synthesiser's does); symusic's alone would end the older and hold the other to the next.
    data = _raw_smf([(0, 0x90, 60, 90), (48, 0x90, 60, 70), (48, 0x80, 60, 0),
                     (96, 0x80, 60, 0), (0, 0x90, 64, 80), (96, 0x80, 64, 0)])
    calls = []
    real = M.load_midi
    monkeypatch.setattr(M, "load_midi", lambda *a, **k: calls.append(1) or real(*a, **k))
    table = _assert_same_reading(data)
    assert len(calls) == 2  # once by the test, once as load_notes' re-read
    assert sorted(zip(table.onset_s, table.offset_s, strict=True)) == [
        (0.0, 0.5), (0.25, 0.5), (1.0, 1.5)]
    calls.clear()
    _assert_same_reading(_raw_smf([(0, 0x90, 60, 90), (48, 0x80, 60, 0), (0, 0x90, 60, 70),
                                   (48, 0x80, 60, 0)]))  # legato repeats are no overlap
    assert len(calls) == 1


def test_zero_length_notes_are_dropped_as_pretty_midi_drops_them(monkeypatch) -> None:
    calls = []
    real = M.load_midi
    monkeypatch.setattr(M, "load_midi", lambda *a, **k: calls.append(1) or real(*a, **k))
    alone = _raw_smf([(0, 0x90, 60, 90), (0, 0x80, 60, 0), (96, 0x90, 60, 70), (96, 0x80, 60, 0)])
    table = _assert_same_reading(alone)
    assert table.onset_s.tolist() == [0.5] and len(calls) == 1  # no re-read needed
    # With a partner on the same tick pretty_midi drops both: left to load_midi.
    _assert_same_reading(_raw_smf([(0, 0x90, 60, 90), (0, 0x90, 60, 80), (0, 0x80, 60, 0),
                                   (96, 0x80, 60, 0), (0, 0x90, 62, 70), (96, 0x80, 62, 0)]))
    assert len(calls) == 3
    only = _raw_smf([(0, 0x90, 60, 90), (0, 0x80, 60, 0)])
    for load in (M.load_midi, M.load_notes):
        with pytest.raises(MidiError) as e:
            load(only)
        assert e.value.reason == "no_notes"


def test_known_difference_unpaired_duplicate_note_on() -> None:
    # One tick, two note-ons of C4, one note-off: pretty_midi ends both; symusic pairs the off
    # with the first and drops the second, leaving nothing to see. Documented in load_notes;
    # this pins it so that a change in symusic shows up here.
    data = _raw_smf([(0, 0x90, 60, 90), (0, 0x90, 60, 70), (96, 0x80, 60, 0)])
    assert len(M.load_midi(data).instruments[0].notes) == 2
    table = M.load_notes(data)
    assert table.onset_s.tolist() == [0.0] and table.velocity.tolist() == [90]


@pytest.fixture(scope="module")
def corpus_sample(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real-world files of both kinds, made here (not read from a cache this machine may lack):
    generated songs and the first music21 works (Bach, Palestrina, folk tunes...) converted."""
    from model.training.corpus_convert import music21_to_midi_file
    from model.training.corpus_works import list_corpus_works
    from model.training.midi_writer import write_midi
    from model.training.songgen import generate_song

    root = tmp_path_factory.mktemp("corpus")
    files = []
    for seed in range(4):
        write_midi(generate_song(seed, duration_s=40.0), root / f"song_{seed}.mid")
        files.append(root / f"song_{seed}.mid")
    quick = ("bach", "airdsAirs", "palestrina", "essenFolksong")  # short works: seconds to parse
    for collection in quick:
        work = next(w for w in list_corpus_works() if w.collection == collection)
        out = root / f"{work.name}.mid"
        try:
            music21_to_midi_file(work.path, work.number, out)
            M.load_midi(out)
        except Exception:  # about 7 % of the corpus does not convert; those are not this test's
            continue
        files.append(out)
    assert len(files) >= 6
    return files


def test_load_notes_reads_real_world_files_as_load_midi(corpus_sample: list[Path]) -> None:
    for path in corpus_sample:
        _assert_same_reading(path, exact=False)

