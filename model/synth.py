"""MIDI → audio by synthesis, and MIDI → CQT frames by synthesis or by the fast render.

One job: rendering a loaded piece (:mod:`model.midi` loads and validates it).

* :func:`midi_to_audio` renders with the FluidSynth CLI (a subprocess with a timeout and an
  output cap; one render in the corpus once produced gigabytes) or pretty_midi's sine synth.
  :func:`run_bounded_render` is that bounded subprocess, for any external renderer.
* :func:`midi_to_frames` gives frames on the grid of :mod:`model.features` (hop 1024 at
  22,050 Hz, 48 bins from MIDI 36): ``"synth"`` renders and runs the CQT
  (:func:`midi_to_frames_synth`; Raffel's better side, slow); ``"fast"`` draws notes straight
  into CQT-bin magnitudes (:func:`model.fastrender.midi_to_frames_fast`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi

from model.errors import RenderError
from model.fastrender import NoteTable, midi_to_frames_fast, n_frames
from model.features import SAMPLE_RATE, audio_to_frames

__all__ = [
    "SOUNDFONT_DIRS", "available_renderers", "default_soundfont", "midi_to_audio",
    "midi_to_frames", "midi_to_frames_synth", "run_bounded_render",
]

SOUNDFONT_DIRS = (Path("/usr/share/sounds/sf2"), Path("/usr/share/soundfonts"))
_PREFERRED_SOUNDFONTS = ("FluidR3_GM.sf2", "default-GM.sf2", "TimGM6mb.sf2")


def default_soundfont() -> Path | None:
    """The General MIDI soundfont FluidSynth uses by default, or None when none is installed."""
    found = [p for d in SOUNDFONT_DIRS if d.is_dir() for p in sorted(d.glob("*.sf2"))]
    for name in _PREFERRED_SOUNDFONTS:
        for p in found:
            if p.name == name and p.exists():
                return p
    return next((p for p in found if p.exists()), None)


def available_renderers() -> tuple[str, ...]:
    """Renderers usable here, best first: ``"fluidsynth"`` (CLI + soundfont), ``"pretty_midi"``."""
    fs = shutil.which("fluidsynth") is not None and default_soundfont() is not None
    return ("fluidsynth", "pretty_midi") if fs else ("pretty_midi",)


def midi_to_audio(pm: pretty_midi.PrettyMIDI, *, sample_rate: int = SAMPLE_RATE,
                  renderer: str = "auto", soundfont: str | Path | None = None,
                  timeout_s: float = 60.0, max_duration_s: float = 1800.0,
                  tail_s: float = 0.5, gain: float = 0.4) -> np.ndarray:
    """Render MIDI to mono audio.

    Parameters
    ----------
    pm : pretty_midi.PrettyMIDI
    sample_rate : int
        Hz.
    renderer : {"auto", "fluidsynth", "pretty_midi"}
        ``"auto"`` takes the first of :func:`available_renderers`.
    soundfont : str or Path, optional
        For FluidSynth; default :func:`default_soundfont`.
    timeout_s : float
        Wall-clock bound on the FluidSynth process, which is killed past it.
    max_duration_s : float
        Longest piece rendered (``pm.get_end_time()``); longer ones raise ``too_long``.
    tail_s : float
        Audio kept after the last note ends (release and reverb), seconds.
    gain : float
        FluidSynth's master gain (its default, 0.2, is quiet; 0.4 rarely clips).

    Returns
    -------
    np.ndarray, shape (int((end_time + tail_s) * sample_rate),), float32
        Zero-padded if the renderer stopped early.

    Raises
    ------
    RenderError
        ``reason`` ``unavailable``, ``too_long``, ``timeout`` or ``failed``.
    """
    end_s = float(pm.get_end_time())
    if end_s > max_duration_s:
        raise RenderError(f"the piece lasts {end_s:.0f} s, over the render limit of "
                          f"{max_duration_s:.0f} s", reason="too_long")
    n = int((end_s + tail_s) * sample_rate)
    choice = available_renderers()[0] if renderer == "auto" else renderer
    if choice == "fluidsynth":
        audio = _render_fluidsynth(pm, sample_rate, soundfont, timeout_s, n, gain)
    elif choice == "pretty_midi":
        try:
            with np.errstate(invalid="ignore", divide="ignore"):
                audio = pm.synthesize(fs=sample_rate).astype(np.float32)
        except Exception as e:  # pretty_midi's synth has no failure contract
            raise RenderError(f"pretty_midi synthesis failed: {e!r}", reason="failed") from e
        # It skips drums and then normalises by the peak: a drums-only piece comes back 0/0.
        audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        raise RenderError(f"unknown renderer {renderer!r}", reason="unavailable")
    out = np.zeros(n, np.float32)
    out[: min(n, audio.size)] = audio[:n]
    return out


def _render_fluidsynth(pm: pretty_midi.PrettyMIDI, sample_rate: int,
                       soundfont: str | Path | None, timeout_s: float, n: int,
                       gain: float) -> np.ndarray:
    exe = shutil.which("fluidsynth")
    sf2 = Path(soundfont) if soundfont is not None else default_soundfont()
    if exe is None or sf2 is None or not sf2.exists():
        raise RenderError("fluidsynth or a soundfont is not installed", reason="unavailable")
    with open(sf2, "rb") as f:
        head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        # fluidsynth would only warn, then render silence with exit status 0.
        raise RenderError(f"{sf2} is not a SoundFont 2 file", reason="unavailable")
    cap_bytes = n * 2 * 4  # stereo float32: stop as soon as the piece plus its tail is there
    # Headerless float32 output: readable even when the process is killed mid-write.
    pcm, err = run_bounded_render(
        "fluidsynth", pm,
        lambda mid, raw: [exe, "-ni", "-q", "-g", str(gain), "-r", str(sample_rate), "-T", "raw",
                          "-O", "float", "-E", "little", "-F", str(raw), str(sf2), str(mid)],
        cap_bytes=cap_bytes, timeout_s=timeout_s, dtype="<f4")
    pcm = pcm[: pcm.size // 2 * 2].reshape(-1, 2).mean(axis=1).astype(np.float32)
    if not np.isfinite(pcm).all() or not np.any(pcm):
        raise RenderError(f"fluidsynth rendered no sound: {err}", reason="failed")
    return pcm


def midi_to_frames_synth(pm: pretty_midi.PrettyMIDI, *, renderer: str = "auto",
                         soundfont: str | Path | None = None, timeout_s: float = 60.0,
                         max_duration_s: float = 1800.0, device: str | None = None) -> np.ndarray:
    """Render (:func:`midi_to_audio` at 22,050 Hz) and take the CQT frames.

    Returns
    -------
    np.ndarray, shape (n_frames(pm), 48), float32
        Cut to the same frame count as :func:`midi_to_frames_fast`; the render's tail only
        feeds the look-ahead of the last frames.
    """
    audio = midi_to_audio(pm, sample_rate=SAMPLE_RATE, renderer=renderer, soundfont=soundfont,
                          timeout_s=timeout_s, max_duration_s=max_duration_s)
    return audio_to_frames(audio, SAMPLE_RATE, device=device)[: n_frames(pm)]


def midi_to_frames(piece: pretty_midi.PrettyMIDI | NoteTable, *, method: str = "fast",
                   **kwargs: Any) -> np.ndarray:
    """Frames of a piece by ``method``: ``"fast"`` (:func:`midi_to_frames_fast`, which also takes
    a :class:`NoteTable`), ``"synth"`` (:func:`midi_to_frames_synth` with the best renderer
    installed; takes its keyword arguments and needs a ``PrettyMIDI``) or ``"sine"`` (the same
    with pretty_midi's own sine synthesis: no external program, so the same frames on every
    machine)."""
    if method == "fast":
        if kwargs:
            raise TypeError(f"method='fast' takes no options, got {sorted(kwargs)}")
        return midi_to_frames_fast(piece)
    if method in ("synth", "sine"):
        if isinstance(piece, NoteTable):
            raise TypeError(f"method={method!r} renders a PrettyMIDI (load_midi), "
                            "not a NoteTable")
        if method == "sine":
            kwargs = {**kwargs, "renderer": "pretty_midi"}
        return midi_to_frames_synth(piece, **kwargs)
    raise ValueError(f"method must be 'fast', 'synth' or 'sine', got {method!r}")


def run_bounded_render(name: str, pm: pretty_midi.PrettyMIDI,
                       command: Callable[[Path, Path], list[str]], *, cap_bytes: int,
                       timeout_s: float, dtype: str) -> tuple[np.ndarray, str]:
    """Run an external renderer on ``pm`` with a time and an output-size bound.

    ``command(midi_path, raw_out_path)`` builds the command line; the renderer must write
    headerless samples of ``dtype`` to ``raw_out_path`` (readable even when it is killed
    mid-write). The process is killed once ``cap_bytes`` are written (a looping or endless render
    is cut there) or after ``timeout_s``.

    Returns
    -------
    samples : np.ndarray, at most ``cap_bytes`` worth of ``dtype``
    log : str, the end of the renderer's output (for error messages)

    Raises
    ------
    RenderError
        ``timeout`` or ``failed``.
    """
    with tempfile.TemporaryDirectory(prefix=f"midimatch-{name}-") as tmp:
        mid, raw = Path(tmp) / "in.mid", Path(tmp) / "out.raw"
        try:
            pm.write(str(mid))
        except Exception as e:  # pretty_midi's writer has no failure contract
            raise RenderError(f"cannot write the MIDI for {name}: {e!r}", reason="failed") from e
        # Output to a file, not a pipe: a chatty render must not block on a full pipe while
        # this loop watches the output file.
        with open(Path(tmp) / "log.txt", "w+b") as log:
            proc = subprocess.Popen(command(mid, raw), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log)
            deadline = time.monotonic() + timeout_s
            try:
                while proc.poll() is None:
                    if _size(raw) >= cap_bytes:
                        break
                    if time.monotonic() > deadline:
                        raise RenderError(f"{name} ran past {timeout_s:g} s", reason="timeout")
                    time.sleep(0.02)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            log.seek(0)
            err = log.read()[-500:].decode(errors="replace")
        if proc.returncode in (0, -9):
            try:
                with open(raw, "rb") as f:
                    return np.frombuffer(f.read(cap_bytes), dtype=dtype), err
            except FileNotFoundError:
                pass  # it wrote nothing
        raise RenderError(f"{name} failed ({proc.returncode}): {err}", reason="failed")


def _size(path: Path) -> int:
    """Bytes in ``path``, 0 while it is missing. A renderer may create, remove or replace its
    output file while it runs (Csound did, between an ``exists()`` and a ``stat()`` of this
    loop, and one FileNotFoundError ended a 20-minute ``eval prepare``)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
