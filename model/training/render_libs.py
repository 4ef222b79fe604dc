"""Renderers that are C libraries without a usable player: libWildMidi and Android's Sonivox EAS.

* ``wildmidi``: libWildMidi plays GUS patches (here freepats) with its own engine, not
  TiMidity's. Its command-line player needs a terminal (it segfaults without one; ``script -qc``
  would leave its children behind when killed), so the library is called instead.
* ``sonivox``: libsonivox, the Embedded Audio Synthesis GM synthesiser of Android, with the small
  wavetable GM set compiled into it; it renders at its own rate (22,050 Hz in Debian's build),
  resampled here when another rate is asked for. Debian ships no player for it.

Sonivox's clock runs slow: it advances by a whole number of 1/1024 ms per mix buffer (5944/1024
ms for 128 frames at 22,050 Hz, truly 5944.31/1024), so every note came later (+5.2e-5 of its
time, 31 ms at 10 min) and the rounding of its tick length to 1/1024 ms added an error of either
sign (at pretty_midi's 220 ticks per beat: -8e-5). :func:`sonivox_midi` writes the piece with a
tick that it rounds down by just as much (1 ms + 5.2e-5): measured drift 0.3 ms in 10 min.

Both run through ctypes in a child process (``render_libs_host.py``) under
:func:`model.synth.run_bounded_render`: a library call cannot be interrupted, the child can be
killed at the time and size bounds, and a crash in the library fails one render, not the caller.
Both return float32 mono in which sample ``i`` is time ``i / sample_rate`` of the MIDI (WildMIDI
+1.3 ms, Sonivox within ±3 ms: it renders in blocks of 128 frames; tests/model/training).
"""

from __future__ import annotations

import copy
import ctypes
import math
import sys
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np
import pretty_midi

from model.errors import RenderError
from model.synth import run_bounded_render
from model.training import render_libs_host as host

HOST = Path(host.__file__)
_LIBRARIES = {"wildmidi": host.WILDMIDI_SONAME, "sonivox": host.SONIVOX_SONAME}


@cache
def library_available(engine: str) -> bool:
    """Whether the shared library of ``engine`` ("wildmidi" or "sonivox") can be loaded here."""
    soname = _LIBRARIES.get(engine)
    if soname is None:
        return False
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


@cache
def sonivox_format() -> tuple[int, int]:
    """(sample rate, channels) libsonivox renders at (its build configuration)."""
    cfg = host.sonivox_config()
    return int(cfg.sampleRate), int(cfg.numChannels)


def sonivox_midi(pm: pretty_midi.PrettyMIDI) -> pretty_midi.PrettyMIDI:
    """``pm`` (its instruments, copied) written so that Sonivox's clock keeps time: one tempo,
    960 ticks per beat, each tick 1 ms times the ratio by which EAS's mix-buffer clock falls
    behind, so that EAS rounds it to exactly 1 ms (see the module's docstring)."""
    rate, _ = sonivox_format()
    buffer_q10 = host.sonivox_config().mixBufferSize * 1_024_000 / rate  # 1/1024 ms
    slow = buffer_q10 / math.floor(buffer_q10)
    tempo_us = round(960_000 * slow)  # us per beat of 960 ticks
    out = pretty_midi.PrettyMIDI(resolution=960, initial_tempo=6e7 / (tempo_us + 0.4))
    out.instruments = copy.deepcopy(pm.instruments)
    return out


def _host_command(*args: str) -> list[str]:
    # -I: isolated (no user site, no cwd on the path); the host imports the standard library only
    return [sys.executable, "-I", str(HOST), *args]


def _to_mono(pcm: np.ndarray, channels: int) -> np.ndarray:
    pcm = pcm[: pcm.size // channels * channels].reshape(-1, channels).astype(np.float32)
    return pcm.mean(axis=1) / np.float32(32768.0)


def render_wildmidi(pm: pretty_midi.PrettyMIDI, config: Path, sample_rate: int,
                    timeout_s: float, n: int) -> np.ndarray:
    """``pm`` through libWildMidi with the patches of ``config``; (n,) float32 mono at most."""
    if not library_available("wildmidi"):
        raise RenderError("libWildMidi is not installed (apt-get install libwildmidi2)",
                          reason="unavailable")
    if not 11025 <= sample_rate <= 65000:  # WildMidi_Init refuses other rates
        raise RenderError(f"WildMIDI renders at 11025..65000 Hz, not {sample_rate}",
                          reason="failed")
    pcm, err = run_bounded_render(
        "wildmidi", pm,
        lambda mid, raw: _host_command("wildmidi", str(config), str(sample_rate), str(mid),
                                       str(raw)),
        cap_bytes=4 * n, timeout_s=timeout_s, dtype="<i2")
    if not pcm.size:
        raise RenderError(f"wildmidi wrote no audio: {err}", reason="failed")
    return _to_mono(pcm, 2)


def render_sonivox(pm: pretty_midi.PrettyMIDI, sample_rate: int, timeout_s: float,
                   n: int) -> np.ndarray:
    """``pm`` through libsonivox (EAS), resampled to ``sample_rate``; (n,) float32 mono at most.
    """
    if not library_available("sonivox"):
        raise RenderError("libsonivox is not installed (apt-get install libsonivox3)",
                          reason="unavailable")
    rate, channels = sonivox_format()
    n_native = int(np.ceil(n * rate / sample_rate)) + 1
    pcm, err = run_bounded_render(
        "sonivox", sonivox_midi(pm), lambda mid, raw: _host_command("sonivox", str(mid), str(raw)),
        cap_bytes=2 * channels * n_native, timeout_s=timeout_s, dtype="<i2")
    if not pcm.size:
        raise RenderError(f"sonivox wrote no audio: {err}", reason="failed")
    audio = _to_mono(pcm, channels)
    if rate != sample_rate:
        from scipy.signal import resample_poly

        ratio = Fraction(sample_rate, rate)
        audio = resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
    return audio
