"""MIDI files → a validated ``PrettyMIDI`` or :class:`~model.fastrender.NoteTable`.

One job: turn bytes from anywhere into a parsed piece or a typed
:class:`~model.errors.MidiError`, in time and memory bounded by the file size. pretty_midi
allocates arrays proportional to the largest tick and dies on a zero tempo, so the header, the
chunk table, the tempo map and the length are checked first, on the cheap.

* :func:`load_midi` reads with mido into a ``pretty_midi.PrettyMIDI`` (what the synthesised
  render of :mod:`model.synth` takes).
* :func:`load_notes` does the same checks but reads with symusic's C++ parser straight into the
  note arrays of the fast render (:mod:`model.fastrender`; ~8x quicker on most files; the index
  build reads so).
* :func:`to_pretty_midi` is the ``PrettyMIDI`` of an already parsed ``mido.MidiFile``, as
  :func:`load_midi` reads it, without the checks (for files we wrote ourselves).

Tempo, time and key signature events count in every track, as players have them (FluidSynth and
TiMidity both obey a tempo event wherever it is): pretty_midi reads them from track 0 alone, so
a type-1 file that keeps its tempo in track 1 (solfege's ``fanfare.midi``, 100 bpm) would be read
at 120 bpm. They are moved into track 0 at their absolute ticks first (:func:`to_pretty_midi`); a
file that has them only in track 0 is read exactly as pretty_midi reads it. Where two tempo events
fall on one tick, the one a player applies last holds: mido.merge_tracks, FluidSynth and TiMidity
(checked: TiMidity 2.14, FluidSynth 2.3) play the events of one tick in track order, so the last
in the highest-numbered track wins (in one track, the later one, as pretty_midi already has it).
Type 0 has one track: nothing moves. Type 2 (independent sequences) is read as type 1, all tracks
at once with one tempo map, which is what FluidSynth plays (TiMidity plays the tracks one after
another, each at its own tempo; pretty_midi and this loader never did).
"""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mido
import numpy as np
import pretty_midi

from model.errors import MidiError

if TYPE_CHECKING:
    from model.fastrender import NoteTable

__all__ = ["BPM_RANGE", "MAX_BYTES", "MAX_DURATION_S", "MAX_TICKS", "MAX_TRACKS", "load_midi",
           "load_notes", "to_pretty_midi"]

# mido parses ~0.5 MB of dense events a second here and holds ~300 bytes per event, so the
# byte limit is what bounds time and memory (2 MiB: ~4 s, ~250 MB worst case; a pop song is
# ~50 kB).
MAX_BYTES = 2 << 20
MAX_TRACKS = 512
MAX_DURATION_S = 3600.0
MAX_TICKS = 10_000_000  # pretty_midi's own MAX_TICK: its tick→time array is 8 bytes per tick
BPM_RANGE = (4.0, 1000.0)  # 3.58 bpm is the slowest a tempo event can say
# A tempo, time or key signature event (FF 51/58/59) whose length is not 3/4/2 bytes: symusic
# reads on past it (or from stale memory). The bytes can also occur by chance, in a delta-time
# or a text: that only costs a re-read by load_midi (no file of the cached corpus has them).
_ODD_META = re.compile(rb"\xff(?:\x51[^\x03]|\x58[^\x04]|\x59[^\x02])")
# Meta events that hold for the whole sequence, wherever they are: read as if in track 0.
_GLOBAL_META = frozenset({"set_tempo", "time_signature", "key_signature"})


def __getattr__(name: str) -> Any:
    # model.midi.NoteTable without importing numba (model.fastrender) until it is asked for:
    # the gateway's demo reads with load_midi and stays free of numba.
    if name == "NoteTable":
        from model.fastrender import NoteTable

        return NoteTable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_midi(source: str | Path | bytes, *, max_bytes: int = MAX_BYTES,
              max_tracks: int = MAX_TRACKS, max_duration_s: float = MAX_DURATION_S,
              max_ticks: int = MAX_TICKS,
              bpm_range: tuple[float, float] = BPM_RANGE) -> pretty_midi.PrettyMIDI:
    """Read and validate a Standard MIDI File.

    Parameters
    ----------
    source : str, Path or bytes
        A path, or the file's bytes.
    max_bytes, max_tracks : int
        Bounds on the file size and on the number of tracks.
    max_duration_s : float
        Longest allowed piece, seconds (to its last event).
    max_ticks : int
        Largest allowed absolute tick (bounds pretty_midi's tick→time table).
    bpm_range : (float, float)
        Allowed tempi in beats per minute, of every tempo event (in any track).

    Returns
    -------
    pretty_midi.PrettyMIDI

    Raises
    ------
    MidiError
        ``reason`` is one of ``too_large``, ``unreadable``, ``not_midi``, ``truncated``,
        ``corrupt``, ``unsupported`` (SMPTE time division), ``too_many_tracks``, ``bad_tempo``,
        ``too_long``, ``no_notes``.
    """
    data = _read_bounded(source, max_bytes)
    _check_chunks(data, max_tracks)
    try:
        # clip=True: data bytes > 127 occur in real files; pretty_midi's default would refuse.
        mf = mido.MidiFile(file=io.BytesIO(data), clip=True)
    except EOFError as e:
        raise MidiError("MIDI track ends in the middle of an event", reason="truncated") from e
    except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error,
            mido.KeySignatureError) as e:
        raise MidiError(f"malformed MIDI data: {e}", reason="corrupt") from e
    max_tick, tempos = 0, []
    for track in mf.tracks:
        tick = 0
        for msg in track:
            tick += msg.time
            if msg.type == "set_tempo":
                tempos.append((tick, msg.tempo))
        max_tick = max(max_tick, tick)
    tempos.sort(key=lambda e: e[0])  # stable: one tick's events stay in track order
    _check_timing(tempos, max_tick, mf.ticks_per_beat, max_duration_s, max_ticks, bpm_range)
    try:
        pm = to_pretty_midi(mf)
    except Exception as e:  # any failure inside pretty_midi is the file's fault here
        raise MidiError(f"pretty_midi cannot read the file: {e!r}", reason="corrupt") from e
    if not any(inst.notes for inst in pm.instruments):
        raise MidiError("the file has no notes", reason="no_notes")
    return pm


def to_pretty_midi(mf: mido.MidiFile) -> pretty_midi.PrettyMIDI:
    """pretty_midi's reading of a parsed file, its tempo and signatures taken from every track.

    The ``set_tempo``, ``time_signature`` and ``key_signature`` events of tracks 1, 2, ... are
    moved into track 0 at their absolute ticks (one tick's events in track order, so the last
    one a player applies is the last one pretty_midi sees and the one that holds), then
    ``pretty_midi.PrettyMIDI(mido_object=mf)`` reads it. A file with none outside track 0 goes
    to pretty_midi untouched. Like pretty_midi, this changes ``mf`` in place; it checks nothing
    (:func:`load_midi` does) and lets pretty_midi's exceptions through.
    """
    _global_meta_to_track0(mf)
    return pretty_midi.PrettyMIDI(mido_object=mf)


def _global_meta_to_track0(mf: mido.MidiFile) -> bool:
    """Move the tempo and signature events of tracks 1+ into track 0, in place (delta times
    kept right); whether any was moved."""
    moved: list[tuple[int, mido.MetaMessage]] = []  # (absolute tick, event), in track order
    for i in range(1, len(mf.tracks)):
        track = mf.tracks[i]
        if not any(msg.type in _GLOBAL_META for msg in track):
            continue
        kept, tick, last = mido.MidiTrack(), 0, 0
        for msg in track:
            tick += msg.time
            if msg.type in _GLOBAL_META:
                moved.append((tick, msg))
            else:
                kept.append(msg.copy(time=tick - last))
                last = tick
        if not kept:  # nothing but tempo (no end of track): pretty_midi refuses an empty track
            kept.append(mido.MetaMessage("end_of_track", time=tick))
        mf.tracks[i] = kept
    if not moved:
        return False
    events, tick = [], 0
    for msg in mf.tracks[0]:
        tick += msg.time
        if msg.type != "end_of_track":  # one end of track, put back after the last event
            events.append((tick, msg))
    # A stable sort on the tick alone: track 0's events of a tick first, then track 1's, ...,
    # each track's in file order; the order in which players apply them.
    events = sorted(events + moved, key=lambda e: e[0])
    end = max(tick, events[-1][0])
    track0, last = mido.MidiTrack(), 0
    for tick, msg in events:
        track0.append(msg.copy(time=tick - last))
        last = tick
    track0.append(mido.MetaMessage("end_of_track", time=end - last))
    mf.tracks[0] = track0
    return True


def load_notes(source: str | Path | bytes, *, max_bytes: int = MAX_BYTES,
               max_tracks: int = MAX_TRACKS, max_duration_s: float = MAX_DURATION_S,
               max_ticks: int = MAX_TICKS,
               bpm_range: tuple[float, float] = BPM_RANGE) -> NoteTable:
    """Read and validate a Standard MIDI File straight into the fast render's note arrays.

    Same parameters, checks and ``MidiError`` reasons as :func:`load_midi`, parsed by symusic
    (C++) with no ``PrettyMIDI`` built, and timed as :func:`load_midi` times it (the tempo
    events of every track, pretty_midi's float64 arithmetic): the table is
    ``NoteTable.from_pretty_midi(load_midi(source))`` up to note order, except on malformed
    files: symusic pairs a note-off with the oldest note of its pitch where pretty_midi ends
    them all, so a file with overlapping unisons is re-read by :func:`load_midi` (as is one with
    a tempo or signature event of the wrong length, and one with two different tempi on one
    tick, whose track order symusic's merged list does not keep); unseen are note-ons that
    symusic leaves unpaired behind an older one. The tick and duration limits count the last
    event symusic keeps, not a later end-of-track.

    Returns
    -------
    NoteTable
        ``end_s`` as ``PrettyMIDI.get_end_time()`` (text events FF 01 aside).
    """
    data = _read_bounded(source, max_bytes)
    spans = _check_chunks(data, max_tracks)

    def reread() -> NoteTable:
        from model.fastrender import NoteTable

        return NoteTable.from_pretty_midi(load_midi(
            data, max_bytes=max_bytes, max_tracks=max_tracks, max_duration_s=max_duration_s,
            max_ticks=max_ticks, bpm_range=bpm_range))

    if _ODD_META.search(data, spans[0][0], spans[-1][1]):
        return reread()
    # symusic sees only the chunks checked above, behind a canonical 6-byte header. Its tempo
    # and signature lists gather the events of every track, as load_midi reads them.
    head = b"MThd" + struct.pack(">I", 6)
    score = _parse_symusic(head + data[8:14] + data[spans[0][0]:spans[-1][1]])
    for k in score.key_signatures:  # mido refuses a key it cannot name
        if not (-7 <= k.key <= 7 and k.tonality in (0, 1)):
            raise MidiError(f"malformed MIDI data: key signature {k.key}, {k.tonality}",
                            reason="corrupt")
    if score.start() < 0:  # symusic counts ticks in int32
        raise MidiError("tick counts overflow: the file's events run past 2**31 ticks",
                        reason="too_long")
    t = score.tempos.numpy()
    order = np.lexsort((t["mspq"], t["time"]))
    tick, mspq = t["time"][order], t["mspq"][order]
    if np.any((tick[1:] == tick[:-1]) & (mspq[1:] != mspq[:-1])):
        # the one applied last holds (load_midi: track order); symusic's sort does not keep it
        return reread()
    tempos = list(zip(tick.tolist(), mspq.tolist(), strict=True))
    # score.end(): the last note-off, controller, bend, tempo, signature, lyric or marker
    _check_timing(tempos, score.end(), score.ticks_per_quarter, max_duration_s, max_ticks,
                  bpm_range)
    if any(ts.numerator <= 0 for ts in score.time_signatures):  # pretty_midi refuses these
        raise MidiError("pretty_midi cannot read the file: time signature numerator 0",
                        reason="corrupt")
    if _overlapping_unisons(score):  # where symusic's note pairing and pretty_midi's can part
        return reread()
    from model.fastrender import NoteTable

    table = NoteTable.from_score(score)
    if table.n_notes == 0:
        raise MidiError("the file has no notes", reason="no_notes")
    return table


def _parse_symusic(smf: bytes) -> Any:
    from symusic.core import ScoreTick  # C++; imported here so that the gateway never loads it

    try:
        # sanitize_data clamps data bytes > 127 to 127, as mido's clip=True does
        return ScoreTick.from_midi(smf, True)
    except Exception as e:  # any failure inside symusic is the file's fault here
        if "EOF" in str(e):
            raise MidiError(f"MIDI track ends in the middle of an event: {e}",
                            reason="truncated") from e
        raise MidiError(f"malformed MIDI data: {e}", reason="corrupt") from e


def _overlapping_unisons(score: Any) -> bool:
    """Whether a track sounds one pitch twice at once, or starts it twice on one tick.

    A note-off ends the oldest sounding note of its pitch in symusic, every one in pretty_midi
    (as a synthesiser's note-off does), so the two read such a track differently (music21 writes
    unisons of two voices on one channel: a quarter of its files have some). Two notes that
    start on one tick are flagged too: after a note-off on that tick pretty_midi drops both.
    """
    for t in score.tracks:
        notes = t.notes.numpy()
        pitch, on = notes["pitch"].astype(np.int64), notes["time"].astype(np.int64)
        order = np.lexsort((on, pitch))
        pitch, on, off = pitch[order], on[order], (on + notes["duration"])[order]
        if np.any((pitch[1:] == pitch[:-1]) & ((on[1:] < off[:-1]) | (on[1:] == on[:-1]))):
            return True
    return False


def _read_bounded(source: str | Path | bytes, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            size = os.stat(source).st_size
            if size > max_bytes:
                raise MidiError(f"{source} is {size} bytes, over the {max_bytes}-byte limit",
                                reason="too_large")
            with open(source, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise MidiError(f"cannot read {source}: {e}", reason="unreadable") from e
    if len(data) > max_bytes:
        raise MidiError(f"MIDI data is {len(data)} bytes, over the {max_bytes}-byte limit",
                        reason="too_large")
    return data


def _check_chunks(data: bytes, max_tracks: int) -> list[tuple[int, int]]:
    """Header and chunk table, without parsing events: O(number of tracks).

    Returns the ``(start, end)`` byte offsets of each track chunk, its 8-byte head included.
    """
    if len(data) < 14 or data[:4] != b"MThd":
        raise MidiError("not a Standard MIDI File (no MThd header)", reason="not_midi")
    hlen, fmt, ntrks, division = struct.unpack(">IHHH", data[4:14])
    if hlen < 6 or fmt > 2:
        raise MidiError(f"bad MThd header (length {hlen}, format {fmt})", reason="not_midi")
    if division & 0x8000:
        raise MidiError("SMPTE time division is not supported", reason="unsupported")
    if division == 0:
        raise MidiError("time division of 0 ticks per beat", reason="corrupt")
    if ntrks > max_tracks:
        raise MidiError(f"{ntrks} tracks, over the limit of {max_tracks}",
                        reason="too_many_tracks")
    if ntrks == 0:
        raise MidiError("the file has no tracks", reason="no_notes")
    pos, spans = 8 + hlen, []
    for i in range(ntrks):
        if pos + 8 > len(data):
            raise MidiError(f"file ends before track {i + 1} of {ntrks}", reason="truncated")
        name, length = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if name != b"MTrk":
            raise MidiError(f"chunk {name!r} where track {i + 1} should be", reason="corrupt")
        if pos + 8 + length > len(data):
            raise MidiError(f"track {i + 1} declares {length} bytes, the file ends first",
                            reason="truncated")
        spans.append((pos, pos + 8 + length))
        pos += 8 + length
    return spans


def _check_timing(tempos: list[tuple[int, int]], max_tick: int, ticks_per_beat: int,
                  max_duration_s: float, max_ticks: int, bpm_range: tuple[float, float]) -> None:
    """Tempo map and length as :func:`load_midi` will read them: the ``(tick, µs per beat)``
    tempo events of every track, in the order they apply (one tick's last holds), and the tick
    of the last event of any track."""
    for tick, tempo in tempos:
        bpm = 6e7 / tempo if tempo > 0 else float("inf")
        if not bpm_range[0] <= bpm <= bpm_range[1]:
            raise MidiError(f"tempo of {bpm:.4g} bpm at tick {tick} is outside "
                            f"{bpm_range[0]:g}..{bpm_range[1]:g} bpm", reason="bad_tempo")
    if max_tick + 1 > max_ticks:  # pretty_midi allocates max_tick + 1 entries
        raise MidiError(f"last event at tick {max_tick}, over the limit of {max_ticks}",
                        reason="too_long")
    seconds, last_tick, us_per_beat = 0.0, 0, 500_000  # 120 bpm until told otherwise
    for tick, tempo in sorted(tempos, key=lambda e: e[0]):
        seconds += (tick - last_tick) * us_per_beat / 1e6 / ticks_per_beat
        last_tick, us_per_beat = tick, tempo
    seconds += (max_tick - last_tick) * us_per_beat / 1e6 / ticks_per_beat
    if seconds > max_duration_s:
        raise MidiError(f"the piece lasts {seconds:.0f} s, over the limit of "
                        f"{max_duration_s:.0f} s", reason="too_long")
