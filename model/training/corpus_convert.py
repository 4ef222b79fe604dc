"""One music21 work → one MIDI file that the rest of midimatch can load.

music21's MIDI writer fails on, or writes files pretty_midi refuses for, a good share of the
corpus. The repairs live here: empty parts and unexpandable repeat marks are dropped, context
objects shared between measures are copied, and music21's 10,080 ticks per quarter are lowered
so long works pass pretty_midi's "corrupt file" guard. :func:`_finish_midi` then proves that
pretty_midi loads the file and returns the summary the manifest keeps (notes, duration, and a
fingerprint that lets :func:`model.training.corpus.corpus_midi_files` drop duplicate tunes).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

from model.errors import MidiError, MidimatchError

# music21 writes 10,080 ticks per quarter; long works then pass pretty_midi's 1e7 "corrupt file"
# guard and its tick→time table costs 8 bytes a tick. 960 keeps sub-millisecond timing.
TARGET_TICKS_PER_BEAT = 960
MAX_TICK = 4_000_000


def music21_to_midi_file(source: Path, number: int | None, out_path: Path) -> dict[str, Any]:
    """Parse one work with music21 and write it as a standard MIDI file.

    Parts without notes are dropped. Repeats are expanded, as a player would perform them
    (music21's MIDI writer does that); where music21 cannot expand them (inconsistent repeat
    marks: ``ExpanderException``) the repeat marks are dropped and the work is written as
    notated; ``repeats`` says which. A time/key signature or tempo object shared by two
    measures (common in the ABC books) makes music21's MIDI writer raise; such objects are
    copied first (``repaired`` counts them).

    Parameters
    ----------
    source : Path
        Score file.
    number : int or None
        ABC ``X:`` number, or None for the whole file (an opus yields its first score).
    out_path : Path
        Where to write the MIDI file.

    Returns
    -------
    dict
        ``{"repeats": "expanded" | "as_written", "repaired": int}``.

    Raises
    ------
    MidimatchError
        ``reason="parse_failed"`` or ``"midi_write_failed"``.
    """
    from music21 import converter, midi, repeat, stream

    try:
        parsed = converter.parse(source, number=number, forceSource=True)
    except Exception as e:
        raise MidimatchError(f"music21 cannot parse {source}: {e}", reason="parse_failed") from e
    score = parsed.scores[0] if isinstance(parsed, stream.Opus) else parsed
    if isinstance(score, stream.Score):
        # Empty parts (some ABC books declare voices they never use) make repeat expansion
        # fail for the whole score.
        for part in list(score.parts):
            if not part.recurse().notes:
                score.remove(part)
    repaired = _unshare_context_objects(score)
    repeats = "expanded"
    try:
        try:
            mf = midi.translate.streamToMidiFile(score)
        except repeat.ExpanderException:
            _strip_repeats(score)
            repeats = "as_written"
            mf = midi.translate.streamToMidiFile(score)
        mf.open(str(out_path), "wb")
        try:
            mf.write()
        finally:
            mf.close()
    except Exception as e:
        raise MidimatchError(
            f"music21 cannot write MIDI for {source}: {e}", reason="midi_write_failed"
        ) from e
    return {"repeats": repeats, "repaired": repaired}


def _finish_midi(path: Path) -> dict[str, Any]:
    """Rescale ticks if needed, then prove pretty_midi loads the file (as
    :func:`model.midi.to_pretty_midi` reads it: tempo and signatures of every track); return its
    summary."""
    import mido

    from model.midi import to_pretty_midi

    try:
        mid = mido.MidiFile(str(path))
    except Exception as e:
        raise MidiError(f"written MIDI is unreadable: {e}", reason="unloadable") from e
    old_tpq = mid.ticks_per_beat
    rescaled = _rescale_ticks(mid)
    if rescaled:
        mid.save(str(path))
    try:
        pm = to_pretty_midi(mido.MidiFile(str(path)))
    except Exception as e:
        raise MidiError(f"pretty_midi cannot load the MIDI: {e}", reason="unloadable") from e
    notes = [n for inst in pm.instruments if not inst.is_drum for n in inst.notes]
    if not notes:
        raise MidiError("the work has no pitched notes", reason="no_notes")
    notes.sort(key=lambda n: (n.start, n.pitch))
    return {
        "n_notes": len(notes),
        "duration_s": round(pm.get_end_time(), 3),
        "ticks_per_beat": mid.ticks_per_beat,
        "rescaled": rescaled,
        "source_ticks_per_beat": old_tpq,
        "fingerprint": hashlib.sha1(bytes(n.pitch for n in notes)).hexdigest()[:16],
    }


def _rescale_ticks(
    mid: Any, *, target: int = TARGET_TICKS_PER_BEAT, max_tick: int = MAX_TICK
) -> bool:
    """Lower ``mid.ticks_per_beat`` in place (to ``target``, less if the piece is very long).

    Absolute times are rounded, not deltas, so rounding error never accumulates.
    """
    old = mid.ticks_per_beat
    end = max((sum(m.time for m in track) for track in mid.tracks), default=0)
    new = min(old, target)
    if end * new / old > max_tick:
        new = max(1, int(max_tick * old // end))
    if new == old:
        return False
    for track in mid.tracks:
        abs_old = prev_new = 0
        for msg in track:
            abs_old += msg.time
            abs_new = (abs_old * new + old // 2) // old
            msg.time, prev_new = abs_new - prev_new, abs_new
    mid.ticks_per_beat = new
    return True


def _unshare_context_objects(score: Any) -> int:
    """Copy time/key signatures and tempo marks that sit in more than one place of the score."""
    seen: set[int] = set()
    shared = []
    classes = ("TimeSignature", "KeySignature", "MetronomeMark")
    for el in score.recurse().getElementsByClass(classes):
        if id(el) in seen:
            shared.append((el.activeSite, el))  # activeSite is only valid while iterating
        seen.add(id(el))
    for site, el in shared:
        site.replace(el, copy.deepcopy(el))
    return len(shared)


def _strip_repeats(score: Any) -> None:
    """Remove repeat barlines, repeat expressions and endings, which music21 cannot expand."""
    from music21 import bar, repeat, spanner

    for m in score.recurse().getElementsByClass("Measure"):
        for side in ("leftBarline", "rightBarline"):
            if isinstance(getattr(m, side), bar.Repeat):
                setattr(m, side, bar.Barline("regular"))
    classes = (repeat.RepeatExpression, spanner.RepeatBracket)
    marks = [(el.activeSite, el) for el in score.recurse().getElementsByClass(classes)]
    for site, el in marks:
        site.remove(el)
