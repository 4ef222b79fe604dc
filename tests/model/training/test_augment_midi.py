"""MIDI-side augmentation: tempo, programs and transposition do what they claim."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import mido
import numpy as np
import pretty_midi
import pytest

from model.training import augment_midi as M
from model.training.augment import AugmentConfig, preset


def _piece() -> pretty_midi.PrettyMIDI:
    """Two tempi (120 then 90 bpm at beat 4), a melody with CCs and a bend, and drums."""
    mid = mido.MidiFile(ticks_per_beat=480)
    meta = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500_000, time=0),
                           mido.MetaMessage("key_signature", key="D", time=0),
                           mido.MetaMessage("set_tempo", tempo=666_667, time=1920)])
    lead = mido.MidiTrack([mido.Message("program_change", program=0, channel=0, time=0),
                           mido.Message("control_change", control=7, value=90, time=0)])
    drums = mido.MidiTrack()
    for pitch in (60, 64, 67, 72, 125, 2, 62, 65):  # extremes test transposition folding
        lead += [mido.Message("note_on", note=pitch, velocity=90, time=0),
                 mido.Message("pitchwheel", pitch=512, time=240),
                 mido.Message("note_off", note=pitch, velocity=0, time=240)]
    for _ in range(8):
        drums += [mido.Message("note_on", note=36, velocity=100, channel=9, time=0),
                  mido.Message("note_off", note=36, velocity=0, channel=9, time=480)]
    mid.tracks += [meta, lead, drums]
    buf = io.BytesIO()
    mid.save(file=buf)
    buf.seek(0)
    return pretty_midi.PrettyMIDI(buf)


def _notes(pm: pretty_midi.PrettyMIDI) -> list[list[tuple[int, float, float]]]:
    return [[(n.pitch, n.start, n.end) for n in inst.notes] for inst in pm.instruments]


@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_change_tempo_scales_every_time_and_the_tempo_map(factor):
    pm = _piece()
    before = _notes(pm)
    out = M.change_tempo(pm, factor)
    assert _notes(pm) == before  # input untouched
    assert out.get_end_time() == pytest.approx(pm.get_end_time() / factor)
    for a, b in zip(pm.instruments, out.instruments, strict=True):
        assert [n.pitch for n in a.notes] == [n.pitch for n in b.notes]
        assert np.allclose([n.start / factor for n in a.notes], [n.start for n in b.notes])
        assert np.allclose([c.time / factor for c in a.control_changes],
                           [c.time for c in b.control_changes])
        assert np.allclose([p.time / factor for p in a.pitch_bends],
                           [p.time for p in b.pitch_bends])
    t0, bpm0 = pm.get_tempo_changes()
    t1, bpm1 = out.get_tempo_changes()
    np.testing.assert_allclose(t1, t0 / factor)
    np.testing.assert_allclose(bpm1, bpm0 * factor)
    # A file written from the result plays with the new timing (what a synthesiser renders).
    buf = io.BytesIO()
    out.write(buf)
    buf.seek(0)
    back = pretty_midi.PrettyMIDI(buf)
    for a, b in zip(out.instruments, back.instruments, strict=True):
        np.testing.assert_allclose([n.start for n in a.notes], [n.start for n in b.notes],
                                   atol=2e-3)


def test_randomize_programs_changes_melodic_instruments_and_never_drums():
    pm = _piece()
    programs_before = [i.program for i in pm.instruments]
    for seed in range(10):
        out = M.randomize_programs(pm, np.random.default_rng(seed), p=1.0)
        for a, b in zip(pm.instruments, out.instruments, strict=True):
            if a.is_drum:
                assert (b.is_drum, b.program) == (True, a.program)
                assert [(n.pitch, n.start) for n in a.notes] == [(n.pitch, n.start)
                                                                 for n in b.notes]
            else:
                assert b.program != a.program and 0 <= b.program < 128
    assert [i.program for i in pm.instruments] == programs_before  # input untouched
    same = M.randomize_programs(pm, np.random.default_rng(3), p=1.0, same_family_p=1.0)
    other = M.randomize_programs(pm, np.random.default_rng(3), p=1.0, same_family_p=0.0)
    lead = [i for i in pm.instruments if not i.is_drum][0].program
    assert same.instruments[0].program // 8 == lead // 8
    assert other.instruments[0].program // 8 != lead // 8 and other.instruments[0].program < 112
    again = M.randomize_programs(pm, np.random.default_rng(3), p=1.0, same_family_p=0.0)
    assert [i.program for i in again.instruments] == [i.program for i in other.instruments]
    kept = M.randomize_programs(pm, np.random.default_rng(0), p=0.0)
    assert [i.program for i in kept.instruments] == [i.program for i in pm.instruments]


@pytest.mark.parametrize("semitones", [7, -7, 24])
def test_transpose_keeps_range_pitch_class_and_drums(semitones):
    pm = _piece()
    out = M.transpose(pm, semitones)
    for a, b in zip(pm.instruments, out.instruments, strict=True):
        pa, pb = np.array([n.pitch for n in a.notes]), np.array([n.pitch for n in b.notes])
        if a.is_drum:
            np.testing.assert_array_equal(pa, pb)
            continue
        assert pb.min() >= 0 and pb.max() <= 127
        np.testing.assert_array_equal((pa + semitones) % 12, pb % 12)
        inside = (pa + semitones >= 0) & (pa + semitones <= 127)
        np.testing.assert_array_equal(pb[inside], pa[inside] + semitones)
    assert out.key_signature_changes[0].key_number == (2 + semitones) % 12  # D major moved
    assert pm.instruments[0].notes[0].pitch == 60  # input untouched


def test_augment_midi_is_seeded_and_records_what_it_did():
    pm = _piece()
    cfg = replace(AugmentConfig(), p_tempo=1.0, p_programs=1.0, p_transpose=1.0)
    a, rec_a = M.augment_midi(pm, np.random.default_rng(5), cfg)
    b, rec_b = M.augment_midi(pm, np.random.default_rng(5), cfg)
    assert rec_a == rec_b and set(rec_a) == {"transpose", "programs", "tempo"}
    assert _notes(a) == _notes(b)
    assert a.get_end_time() == pytest.approx(pm.get_end_time() / rec_a["tempo"]["factor"])
    json.dumps(rec_a)
    c, rec_c = M.augment_midi(pm, np.random.default_rng(5), preset("clean"))
    assert rec_c == {} and c is not pm and _notes(c) == _notes(pm)


# --------------------------------------------------------------------------- validation


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="tempo factor"):
        M.change_tempo(_piece(), 0.0)
