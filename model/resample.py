"""Streaming resampling at any integer rate: libsoxr (python-soxr) one chunk at a time.

One job: turn input at any rate of ``8,000..96,000`` Hz (:func:`model.audio.check_rate`) into
the 22,050 Hz signal the CQT reads, chunk by chunk. :class:`StreamingResampler` wraps
``soxr.ResampleStream``, which is made for arbitrary ratios (91,403 Hz costs what 44,100 Hz does;
an exact-ratio polyphase kernel for it would have ~10^9 taps). libsoxr's stages consume their
FIFOs in fixed-size blocks, so the output does not depend on how the input was chunked: a stream
gives the samples of the whole-signal call bit for bit (tested over random chunkings and rates),
and :func:`resample` *is* one push and a finish. :class:`SampleBuffer` is the float64 FIFO
:class:`model.features.StreamingCQT` keeps its pending samples in.

Quality ``LQ`` (libsoxr's 16-bit preset): the CQT reads 65 Hz..1.8 kHz of the output, where LQ is
flat to 1e-4 at every rate, and aliases into that band are under -130 dB (the log keeps 80 dB),
while its look-ahead is the shortest of the linear-phase presets (``lookahead_s``: 1 to 23 ms at
most rates, up to ~60 ms at odd rates under 11 kHz; HQ waits 116 ms at 8 kHz). How the frames
compare with those of the torchaudio sinc resampler it replaces is in the commit that made it.
"""

from __future__ import annotations

import functools

import numpy as np
import soxr

from model.audio import check_rate

#: libsoxr's quality preset (see the module docstring).
QUALITY = "LQ"
# libsoxr keeps its state in C (filter tables, FIFOs), out of numpy's sight. Measured by RSS
# over 300 streams after 1 s of audio each: 112 KiB (44.1 kHz) .. 206 KiB (91,403 Hz) a stream;
# ``nbytes`` counts this bound.
_STATE_BYTES = 256 * 1024


class SampleBuffer:
    """A float64 FIFO with amortised O(1) append and drop (1-sample pushes stay cheap)."""

    def __init__(self, zeros: int) -> None:
        self._a = np.zeros(max(4096, 2 * zeros), dtype=np.float64)
        self._lo, self._hi = 0, zeros

    def __len__(self) -> int:
        return self._hi - self._lo

    def append(self, x: np.ndarray) -> None:
        if self._hi + x.size > self._a.size:
            live = self._a[self._lo:self._hi]
            if live.size + x.size > self._a.size // 2:
                self._a = np.concatenate(
                    [live, np.zeros(max(live.size + x.size, self._a.size), np.float64)])
            else:
                self._a[: live.size] = live
            self._lo, self._hi = 0, live.size
        self._a[self._hi:self._hi + x.size] = x
        self._hi += x.size

    def view(self) -> np.ndarray:
        return self._a[self._lo:self._hi]

    def drop(self, k: int) -> None:
        self._lo += k

    @property
    def nbytes(self) -> int:
        return int(self._a.nbytes)


class StreamingResampler:
    """Mono float64 samples at ``orig`` Hz in, at ``new`` Hz out, any chunking.

    Parameters
    ----------
    orig, new : int
        Rates in Hz, each an integer in 8,000..96,000 (else ``AudioError("unsupported_rate")``).
    device : optional
        Accepted for the caller's convenience and ignored: libsoxr runs on the CPU (the
        samples are moved to the CQT's device after it).

    Notes
    -----
    ``push`` returns what is final so far; ``finish`` flushes the rest. In all,
    ``floor(n·new/orig + 1/2)`` samples come out for ``n`` in, whatever the chunking; output
    sample ``j`` is the signal at time ``j/new`` (the filter's delay is compensated).
    """

    def __init__(self, orig: int, new: int, device: object = None) -> None:
        self.rate, self.new = check_rate(orig), check_rate(new)
        self._rs = soxr.ResampleStream(self.rate, self.new, 1, dtype="float64", quality=QUALITY)
        self.n_in = self.n_out = 0
        self._finished = False

    @property
    def lookahead_s(self) -> float:
        """Worst-case wait for an output sample: input time that must follow it, s."""
        return _lookahead_s(self.rate, self.new)

    @property
    def nbytes(self) -> int:
        """Bytes of this stream's resampling state (libsoxr's, bounded as measured)."""
        return _STATE_BYTES

    def push(self, x: np.ndarray) -> np.ndarray:
        """Add samples, shape (n,); return the output samples they complete, float64."""
        if self._finished:
            raise RuntimeError("push() after finish(): start a new StreamingResampler")
        x = np.ascontiguousarray(x, dtype=np.float64)
        self.n_in += x.size
        out = self._rs.resample_chunk(x)
        self.n_out += out.size
        return out

    def finish(self) -> np.ndarray:
        """Flush the filter's tail; the stream is then closed."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        out = self._rs.resample_chunk(np.zeros(0), last=True)
        self.n_out += out.size
        return out


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Whole-signal resampling: one push and a finish of :class:`StreamingResampler`.

    Parameters
    ----------
    x : np.ndarray, shape (n,), float
    orig, new : int
        Hz, 8,000..96,000.

    Returns
    -------
    np.ndarray, shape (floor(n·new/orig + 1/2),), float64
    """
    rs = StreamingResampler(orig, new)
    return np.concatenate([rs.push(x), rs.finish()])


@functools.lru_cache(maxsize=64)
def _lookahead_s(orig: int, new: int) -> float:
    """Measured, not derived: libsoxr emits in blocks, so feed silence one sample at a time
    for 0.5 s and keep the largest lag of output time behind input time, plus one sample at
    each rate: with incommensurate rates the blocks' phase wanders within a sample (57,450 Hz:
    16.869 ms in the first second, 16.884 ms by the sixth; the margin there is 63 µs)."""
    rs = soxr.ResampleStream(orig, new, 1, dtype="float64", quality=QUALITY)
    one, got, worst = np.zeros(1), 0, 0.0
    for i in range(1, orig // 2 + 1):
        got += rs.resample_chunk(one).size
        worst = max(worst, i / orig - got / new)
    return worst + 1.0 / orig + 1.0 / new
