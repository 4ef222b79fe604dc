"""Audio coming in: rates, PCM blocks and audio files checked before anything analyses them.

One job: refuse bad input with a typed :class:`~model.errors.AudioError` and hand on plain
samples. :func:`check_rate` bounds the input rate (8..96 kHz, an integer), :func:`pcm_to_samples`
validates one block of PCM (dtype, layout, finiteness) and downmixes it to mono float64 (what
:class:`model.features.StreamingCQT` takes), :func:`load_audio` reads a file with libsndfile and
:func:`load_audio_end` only the end of it (what ``midimatch identify`` searches), so that an
hour-long recording costs what its last seconds do. No torch here: a process that only reads or
checks audio does not load it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from model.errors import AudioError

MIN_RATE, MAX_RATE = 8000, 96000


def check_rate(sample_rate: float) -> int:
    """The input rate as an int, or ``AudioError("unsupported_rate")``: an integer number of Hz
    in ``MIN_RATE..MAX_RATE``."""
    if not (isinstance(sample_rate, (int, float, np.integer, np.floating))
            and float(sample_rate).is_integer() and MIN_RATE <= sample_rate <= MAX_RATE):
        raise AudioError(
            f"sample rate {sample_rate!r} Hz is not supported: use an integer rate in "
            f"{MIN_RATE}..{MAX_RATE} Hz", reason="unsupported_rate")
    return int(sample_rate)


def pcm_to_samples(pcm: np.ndarray, channels: int) -> np.ndarray:
    """Validate one block of PCM and downmix it to mono float64, shape (n,)."""
    a = np.asarray(pcm)
    if a.dtype == np.int16:
        a = a.astype(np.float64) / 32768.0
    elif a.dtype.kind == "f":
        a = a.astype(np.float64, copy=False)
    else:
        raise AudioError(f"PCM must be float or int16, got {a.dtype}", reason="bad_dtype")
    if a.ndim == 1 and channels == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] != channels:
        raise AudioError(
            f"PCM of shape {a.shape} does not match {channels} channel(s): expected (n,"
            f" {channels})" + (" or (n,)" if channels == 1 else ""), reason="bad_layout")
    if not np.isfinite(a).all():
        raise AudioError("PCM contains NaN or infinite samples", reason="not_finite")
    return a[:, 0].copy() if channels == 1 else a.mean(axis=1)


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a whole audio file (wav, flac, ogg... whatever libsndfile reads).

    Returns
    -------
    audio : np.ndarray, shape (n, channels), float32 in [-1, 1]
    sample_rate : int, Hz

    Raises
    ------
    AudioError
        ``unreadable`` (missing, not audio), ``empty`` (no samples), ``unsupported_rate``
        (outside 8..96 kHz), ``not_finite`` (NaN or inf in a float file).
    """
    part = load_audio_end(path, None)
    if part.audio.shape[0] == 0:
        raise AudioError(f"{path} holds no samples", reason="empty")
    return part.audio, part.sample_rate


@dataclass(frozen=True)
class AudioEnd:
    """The end of a part of an audio file (:func:`load_audio_end`).

    Attributes
    ----------
    audio : np.ndarray, shape (n, channels), float32
        File frames ``offset .. part_start + part_frames``.
    sample_rate : int
    offset : int
        The file frame ``audio[0]`` is.
    part_start, part_frames : int
        The part asked for, in file frames (``part_frames`` 0: the file ends before it starts).
    file_frames : int
        The whole file's length, frames.
    """

    audio: np.ndarray
    sample_rate: int
    offset: int
    part_start: int
    part_frames: int
    file_frames: int


# Frames decoded per read when a file is read in order (MP3) rather than by seeking.
_BLOCK = 1 << 16


def load_audio_end(path: str | Path, seconds: float | Callable[[int], float] | None, *,
                   start_s: float = 0.0, duration_s: float | None = None) -> AudioEnd:
    """The last ``seconds`` of the part of an audio file that starts ``start_s`` s in and lasts
    ``duration_s`` s (None: to the end), reading no more of the file than that. ``seconds`` may
    be a function of the file's sample rate.

    The file's length comes from its header; the end is read by seeking to it, except in MP3,
    where libsndfile's seeks are not sample-exact: there the file is decoded in order, keeping
    only the end (memory stays bounded; the length is what the decoder finds). A file that holds
    less than its header says is read again in order. ``seconds=None`` reads the whole part.
    Only the samples returned are checked for NaN and infinity.

    Returns
    -------
    AudioEnd
        ``audio`` holds ``min(part_frames, ceil(seconds * rate))`` frames; a part that starts at
        or after the file's end (or a file without samples) gives none.

    Raises
    ------
    AudioError
        As :func:`load_audio`, except for a file without samples, whose end is empty.
    """
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s must be a finite number >= 0, got {start_s}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s}")
    with _open(path) as f:
        rate = check_rate(f.samplerate)
        a0 = int(start_s * rate)
        want = None if duration_s is None else int(duration_s * rate)
        if callable(seconds):
            seconds = seconds(rate)
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        keep = None if seconds is None else int(math.ceil(seconds * rate))
        # libsndfile's MP3 seeks land a few samples off and decode differently after them
        exact_seek = f.seekable() and not f.subtype.startswith("MPEG") and f.format != "MP3"
        if exact_seek:
            end = _end_by_seeking(f, path, a0, want, keep)
        if not exact_seek or end is None:
            end = _end_in_order(f, path, a0, want, keep)
    audio, offset, part_frames, total = end
    if not np.isfinite(audio).all():
        raise AudioError(f"{path} contains NaN or infinite samples", reason="not_finite")
    return AudioEnd(audio, rate, offset, a0, part_frames, total)


def _end_by_seeking(f: sf.SoundFile, path: str | Path, a0: int, want: int | None,
                    keep: int | None) -> tuple[np.ndarray, int, int, int] | None:
    """``(audio, offset, part_frames, file_frames)`` of :func:`load_audio_end`, by seeking to
    the end of the part; None when the file holds fewer frames than its header says."""
    total = int(f.frames)
    a1 = total if want is None else min(total, a0 + want)
    if a1 <= a0:
        return np.zeros((0, f.channels), np.float32), a0, 0, total
    offset = a0 if keep is None else max(a0, a1 - keep)
    with _reading(path):
        f.seek(offset)
        audio = f.read(a1 - offset, dtype="float32", always_2d=True)
    if audio.shape[0] < a1 - offset:
        return None
    return audio, offset, a1 - a0, total


def _end_in_order(f: sf.SoundFile, path: str | Path, a0: int, want: int | None,
                  keep: int | None) -> tuple[np.ndarray, int, int, int]:
    """As :func:`_end_by_seeking`, decoding the file from its start and keeping only the last
    ``keep`` frames of the part."""
    stop = None if want is None else a0 + want
    tail: deque[np.ndarray] = deque()
    held = pos = 0  # frames in tail; file frames decoded
    with _reading(path):
        if f.seekable():
            f.seek(0)
        while stop is None or pos < stop:
            a = f.read(_BLOCK if stop is None else min(_BLOCK, stop - pos), dtype="float32",
                       always_2d=True)
            if a.shape[0] == 0:
                break
            skip = max(0, a0 - pos)
            pos += a.shape[0]
            if skip < a.shape[0]:
                tail.append(a[skip:])
                held += a.shape[0] - skip
                while keep is not None and held - tail[0].shape[0] >= keep:
                    held -= tail.popleft().shape[0]
    part_frames = max(0, pos - a0)
    total = pos if stop is None or pos < stop else max(pos, int(f.frames))
    audio = np.concatenate(tail) if tail else np.zeros((0, f.channels), np.float32)
    if keep is not None:
        audio = audio[audio.shape[0] - min(keep, audio.shape[0]):]
    return audio, a0 + part_frames - audio.shape[0], part_frames, total


@contextlib.contextmanager
def _open(path: str | Path) -> Iterator[sf.SoundFile]:
    with _reading(path, opening=True):
        f = sf.SoundFile(str(path))
    with f:
        yield f


@contextlib.contextmanager
def _reading(path: str | Path, opening: bool = False) -> Iterator[None]:
    """libsndfile's errors as ``AudioError("unreadable")``; its decoders' notes kept off stderr."""
    try:
        with _quiet_stderr():
            yield
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise AudioError(f"cannot read audio {path}: {_why(path, e, opening)}",
                         reason="unreadable") from e


def _why(path: str | Path, e: Exception, opening: bool) -> str:
    """What is wrong with the file, in words: libsndfile says "File does not exist or is not a
    regular file (possibly a pipe?)" for a regular file its MP3 decoder cannot sync to."""
    p = Path(path)
    if not p.exists():
        return "it does not exist"
    if p.is_dir():
        return "it is a folder"
    if not os.access(p, os.R_OK):
        return "permission denied"
    detail = str(getattr(e, "error_string", "") or e).strip().rstrip(".")
    if not opening:
        return detail
    if not detail or "does not exist or is not a regular file" in detail:
        return "not a readable audio file"
    return f"not a readable audio file ({detail})"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside: libsndfile's MP3 decoder (mpg123) prints
    "Note: Illegal Audio-MPEG-Header ..." there for a damaged or non-MP3 file, beside the error
    this module raises. The whole process's fd 2 is redirected for the call's duration, so a read
    in one thread hides another thread's C-level stderr meanwhile (Python's sys.stderr is kept
    when it is not fd 2)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
