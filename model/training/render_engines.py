"""Renderers that are not sample players: a real OPL3 FM chip emulation and Csound synthesis.

The sampled-GM renderers (FluidSynth with four soundfonts, TiMidity with GUS patches) all play
recordings of instruments; a model trained on them learnt what such recordings sound like and
read 83 % top-1 on a synthesiser it never heard. These two make sound another way, so that whole
families can be held out of training and reported on their own:

* ``adplay`` + libadplug's Nuked OPL3 emulator (FM synthesis, its own GM mapping, limited
  polyphony, no percussion), for MIDI files of type 0 only, an octave up (:func:`adplay_midi`);
* ``csound`` with the instruments of ``csound/synths.csd`` (FM, plucked string, subtractive,
  additive), one instrument for every channel and program.

Both return float32 mono at ``sample_rate`` in which sample ``i`` is time ``i / sample_rate`` of
the MIDI (checked by tests/model/training/test_render_engines.py), through
:func:`model.synth.run_bounded_render` (time and size bounds).
"""

from __future__ import annotations

import copy
import shutil
import struct
from pathlib import Path

import mido
import numpy as np
import pretty_midi

from model.errors import RenderError
from model.synth import run_bounded_render

CSD = Path(__file__).with_name("csound") / "synths.csd"
CSOUND_INSTRUMENTS = {1: "FM", 2: "plucked string", 3: "subtractive", 4: "additive"}
_WAV_HEADER_BYTES = 44  # adplay's disk writer: a canonical 44-byte WAV header, then PCM
# libadplug's MIDI player stops a few events before the end of the file (the last ~4 s of a
# piece went missing): this many inaudible notes after the end keep the music whole.
_ADPLAY_PAD_NOTES = 20
_ADPLAY_GRID_HZ = 256  # ticks per beat of the rewritten file, at 1 s per beat (see _adplay_file)
_ADPLAY_EMPTY_STEP = b"\x01\xff\x01\x00"  # one tick later, an empty text meta event


def _adplay_file(path: Path) -> None:
    """Rewrite the MIDI file at ``path`` for adplay, in place: type 0 (one merged track), on a
    uniform grid of ``1 / _ADPLAY_GRID_HZ`` s with an event at every step.

    adplay's disk writer (adplay-unix ``EmuPlayer::frame``) renders the wait before each MIDI
    event in blocks of 4 samples and carries the rounding over to the next wait, but in units of
    the *previous* wait's rate: when waits differ, time drifts (measured +1.2 ms per second of
    music on a sparse piece, 0.1 s late after 80 s). With every wait one grid step (an empty
    text meta event, which libadplug skips, fills each step without an event) that rate is
    constant, 256 Hz exactly in float, and the carry is exact: no drift (measured +0.5 ms at
    1 s and at 80 s). Event times are rounded to the grid (±2 ms). Tempo changes are applied
    here (the file keeps one tempo, 1 s per beat).
    """
    src = mido.MidiFile(str(path))
    tempo, t, events = 500_000, 0.0, []
    for msg in mido.merge_tracks(src.tracks):
        t += mido.tick2second(msg.time, src.ticks_per_beat, tempo)
        if msg.type == "set_tempo":
            tempo = msg.tempo
        elif msg.type not in ("end_of_track", "sysex"):  # libadplug skips General MIDI sysex
            events.append((round(t * _ADPLAY_GRID_HZ), bytes(msg.bytes())))
    body = bytearray(b"\x00\xff\x51\x03\x0f\x42\x40")  # set_tempo 1,000,000 us per beat
    now = 0
    for step, data in events:
        if step > now:
            body += _ADPLAY_EMPTY_STEP * (step - now - 1) + b"\x01"
            now = step
        else:
            body += b"\x00"
        body += data
    body += b"\x00\xff\x2f\x00"  # end of track
    path.write_bytes(b"MThd" + struct.pack(">IHHH", 6, 0, 1, _ADPLAY_GRID_HZ)
                     + b"MTrk" + struct.pack(">I", len(body)) + bytes(body))


def adplay_midi(pm: pretty_midi.PrettyMIDI) -> pretty_midi.PrettyMIDI:
    """What adplay is given for ``pm`` (a copy): its pitched instruments an octave up, and the
    inaudible padding notes adplay needs after the end.

    libadplug's MIDI player sounds every note an octave low (its bank and note shift; measured
    on 12 programs across the range: the fundamental at half the note's frequency) and has no
    percussion: channel 10 plays its keys as pitched notes of a melodic patch. So pitches are
    raised by 12 (those above 115 stay: they would leave the MIDI range) and drum tracks are left
    out, as for the Csound synths (:func:`csound_midi`).
    """
    out = csound_midi(pm)
    out.instruments = copy.deepcopy(out.instruments)
    for inst in out.instruments:
        for note in inst.notes:
            note.pitch += 12 if note.pitch + 12 <= 127 else 0
    end = pm.get_end_time()
    pad = pretty_midi.Instrument(0, name="adplay end padding")
    pad.notes = [pretty_midi.Note(1, 1, end + 0.5 * k, end + 0.5 * k + 0.1)
                 for k in range(1, _ADPLAY_PAD_NOTES + 1)]
    out.instruments.append(pad)
    return out


def render_adplay(pm: pretty_midi.PrettyMIDI, sample_rate: int, timeout_s: float,
                  n: int) -> np.ndarray:
    """``pm`` through adplay's Nuked OPL3 emulator; (n,) float32 mono at most."""
    exe = shutil.which("adplay")
    if exe is None:
        raise RenderError("adplay is not installed", reason="unavailable")

    def command(mid: Path, raw: Path) -> list[str]:
        _adplay_file(mid)  # type 0 only (its MIDI loader), on a grid (timing)
        return [exe, "-e", "nuked", "-O", "disk", "-d", str(raw), "-o", "--stereo", "--16bit",
                "-f", str(sample_rate), str(mid)]  # Nuked runs in stereo 16-bit only

    pcm, err = run_bounded_render("adplay", adplay_midi(pm), command,
                                  cap_bytes=_WAV_HEADER_BYTES + 4 * n, timeout_s=timeout_s,
                                  dtype="<i2")
    pcm = pcm[_WAV_HEADER_BYTES // 2:]
    pcm = pcm[: pcm.size // 2 * 2].reshape(-1, 2).mean(axis=1)
    if not pcm.size:
        raise RenderError(f"adplay wrote no audio: {err}", reason="failed")
    return (pcm / 32768.0).astype(np.float32)


def csound_midi(pm: pretty_midi.PrettyMIDI) -> pretty_midi.PrettyMIDI:
    """What the Csound instruments play of ``pm``: its pitched instruments (a copy without the
    drum tracks, which a pitched synth would play as notes)."""
    out = copy.copy(pm)
    out.instruments = [inst for inst in pm.instruments if not inst.is_drum]
    return out


def render_csound(pm: pretty_midi.PrettyMIDI, instrument: int, sample_rate: int,
                  timeout_s: float, n: int) -> np.ndarray:
    """``pm`` (see :func:`csound_midi`) played by instrument ``instrument`` of ``synths.csd``;
    (n,) float32 mono at most."""
    exe = shutil.which("csound")
    if exe is None:
        raise RenderError("csound is not installed", reason="unavailable")
    if instrument not in CSOUND_INSTRUMENTS:
        raise RenderError(f"no Csound instrument {instrument}", reason="unknown_renderer")

    def command(mid: Path, raw: Path) -> list[str]:
        # -h -f: headerless float32, readable when killed mid-write; -T: stop at the MIDI's end
        return [exe, "-d", "-m0", "-T", "-h", "-f", "-r", str(sample_rate), "--ksmps=32",
                "-o", str(raw), "-F", str(mid), f"--omacro:INSTR={instrument}", str(CSD)]

    pcm, err = run_bounded_render("csound", csound_midi(pm), command, cap_bytes=4 * n,
                                  timeout_s=timeout_s, dtype="<f4")
    if not pcm.size:
        raise RenderError(f"csound wrote no audio: {err}", reason="failed")
    return np.nan_to_num(pcm.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
