from __future__ import annotations

import pretty_midi
import pytest

from model.training.midi_writer import write_midi


def test_write_midi_matches_a_hand_built_file(tmp_path) -> None:
    pm = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=120.0)
    pm.time_signature_changes.append(pretty_midi.TimeSignature(3, 4, 0.0))
    pm.key_signature_changes.append(pretty_midi.KeySignature(21, 0.0))  # A minor
    pm.text_events.append(pretty_midi.Text("section:verse", 1.5))
    piano = pretty_midi.Instrument(0, name="piano")
    piano.notes = [pretty_midi.Note(100, 60, 0.0, 0.5), pretty_midi.Note(90, 60, 0.5, 2.0)]
    kit = pretty_midi.Instrument(0, is_drum=True, name="drums")
    kit.notes = [pretty_midi.Note(110, 36, 0.25, 0.3)]
    pm.instruments = [piano, kit]
    write_midi(pm, tmp_path / "x.mid")
    back = pretty_midi.PrettyMIDI(str(tmp_path / "x.mid"))
    assert back.get_tempo_changes()[1].tolist() == pytest.approx([120.0])
    assert (back.time_signature_changes[0].numerator, back.key_signature_changes[0].key_number) == (
        3,
        21,
    )
    assert [(e.text, e.time) for e in back.text_events] == [("section:verse", 1.5)]
    assert [(i.name, i.program, i.is_drum) for i in back.instruments] == [
        ("piano", 0, False),
        ("drums", 0, True),
    ]
    # Same pitch back to back: the note-off at 0.5 s must not end the note that starts there.
    assert [(n.pitch, n.velocity, n.start, n.end) for n in back.instruments[0].notes] == [
        (60, 100, 0.0, 0.5),
        (60, 90, 0.5, 2.0),
    ]
    assert [(n.pitch, n.start, n.end) for n in back.instruments[1].notes] == [(36, 0.25, 0.3)]
