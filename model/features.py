"""Audio → log-magnitude constant-Q frames, streamable.

One job: the transform, on its frame grid (the constants below), computed incrementally
(:class:`StreamingCQT`) or on a whole signal (:func:`audio_to_frames`, the same frames).
The input is checked by :mod:`model.audio` and brought to 22,050 Hz by :mod:`model.resample`;
:func:`is_silent` is the level gate a query passes before its frames are searched.

The representation of the seed (Raffel's ``feature_extraction.py``): 48 semitone bins from MIDI
note 36 (65.41 Hz) to 83 (987.8 Hz), audio at 22,050 Hz, hop 1,024 samples (46.4 ms, 21.53 frames
per second), log magnitude, each frame L2-normalised, float32, shape ``(T, 48)``.

Frame ``t`` is centred on sample ``t * HOP`` of the 22,050 Hz signal; the signal is zero-padded
before its start (librosa's ``center=True`` with constant padding), so ``n`` samples give
``1 + n // HOP`` frames.

The transform is Brown–Puckette's: an STFT with a rectangular window and ``N_FFT`` = 8192 points
(the next power of two above the longest filter, 5,843 samples), multiplied by a spectral kernel
of Hann-windowed complex exponentials. The filters are librosa's (``Q = 1/alpha`` with
``alpha = (2^(2/12) - 1) / (2^(2/12) + 1)``, L1-normalised, response scaled by the square root of
the filter length), so the frames correlate with ``librosa.cqt`` (tested) and a pure tone of
amplitude ``A`` at bin ``k``'s centre reads ``A * BIN_GAIN[k]``. It runs in torch, on any device.

Look-ahead
----------
Frame ``t`` depends on samples up to ``t * HOP + HALF_WINDOW - 1`` and not beyond: the analysis
window is cut to the longest filter, so the frame is final as soon as those samples arrive.
At 22,050 Hz input that is ``HALF_WINDOW`` = 2,922 samples = **132.5 ms** (``LOOKAHEAD_MS``).
Other input rates add the streaming resampler's look-ahead (libsoxr's filter delay, see
:func:`lookahead_ms`): 22.3 ms at 44.1 kHz, 20.5 ms at 48 kHz, 20.6 ms at 96 kHz, 1.4 ms at
16 kHz, 2.8 ms at 8 kHz, up to about 58 ms at odd rates under 11 kHz. A frame is emitted at hop
boundaries, so a sample waits at most one more hop (46.4 ms) on top of that.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from model.audio import check_rate, pcm_to_samples
from model.errors import AudioError
from model.resample import SampleBuffer, StreamingResampler

SAMPLE_RATE = 22050
HOP = 1024
N_BINS = 48
MIDI_LO = 36
BINS_PER_OCTAVE = 12
FRAME_RATE = SAMPLE_RATE / HOP

#: Centre frequency of each bin, Hz, shape (48,).
FREQS = 440.0 * 2.0 ** ((MIDI_LO + np.arange(N_BINS) - 69) / BINS_PER_OCTAVE)
# librosa's relative bandwidth for 12 bins per octave (filters overlap at their -6 dB points).
_ALPHA = (2.0 ** (2 / BINS_PER_OCTAVE) - 1) / (2.0 ** (2 / BINS_PER_OCTAVE) + 1)
#: Filter length of each bin in samples at 22,050 Hz (fractional, as librosa), shape (48,).
LENGTHS = SAMPLE_RATE / (_ALPHA * FREQS)
#: |C| of bin k for a unit-amplitude sine at its centre frequency, shape (48,).
BIN_GAIN = 0.5 * np.sqrt(LENGTHS)
# Integer support of each filter, as librosa: n in [floor(-L/2), floor(L/2)).
_N_LO = np.floor(-LENGTHS / 2).astype(int)
_N_HI = np.floor(LENGTHS / 2).astype(int)
#: Samples of the 22,050 Hz signal each side of a frame centre that the frame depends on.
HALF_WINDOW = int(max(-_N_LO.min(), _N_HI.max()))
WINDOW = 2 * HALF_WINDOW
N_FFT = 1 << (WINDOW - 1).bit_length()
LOOKAHEAD_MS = 1000.0 * HALF_WINDOW / SAMPLE_RATE

# log_normalize's absolute floor for the reference, in |C| units. A full-scale sine reads
# BIN_GAIN, 9.8 (top bin) to 38 (bottom bin), so 1e-3 is a sine at -80 to -92 dBFS: louder
# frames are exactly gain-invariant, quieter ones (hiss, dither, fade-outs) are measured against
# the floor instead of being blown up to the full 80 dB range, which would make near-silence
# look as "musical" as music.
LOG_FLOOR = 1e-3
LOG_RANGE_DB = 80.0

_FRAMES_PER_CALL = 256  # bounds the (frames × N_FFT) STFT buffer to ~17 MB
# Samples and spectra are float64 inside, float32 out. The log keeps bins 80 dB under a frame's
# peak, and a frame next to a loud passage (a fade, an edit to digital silence) has its peak
# ~100 dB under the loud samples at its window's edge: float32 rounding there (~-130 dB of the
# window's content) moved such frames by 2e-3 between two chunkings of the same audio.
_DTYPE = torch.float64


def log_normalize(mag: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Log-compress and L2-normalise magnitude frames, the one convention of the project.

    Per frame, ``ref = max(frame peak, LOG_FLOOR)`` and ``v = max(0, 20 log10(|C| / ref) + 80)``
    (dB above a floor 80 dB under the frame's peak), then ``v / ||v||``. A per-frame reference is
    what makes it streamable (no whole-file maximum as in the seed's ``logamplitude(ref=C.max())``)
    and gain-robust (scaling the audio scales ref alike); the absolute floor keeps near-silence
    from being amplified (see ``LOG_FLOOR``). An all-zero frame stays all zeros.

    Parameters
    ----------
    mag : np.ndarray or torch.Tensor, shape (..., n_bins), non-negative
        Magnitudes, e.g. ``abs(cqt).T``.

    Returns
    -------
    np.ndarray or torch.Tensor, same type, shape and device as ``mag``, float32
        Frames of unit L2 norm (or zero).
    """
    if isinstance(mag, torch.Tensor):
        m = mag if mag.dtype == torch.float64 else mag.to(torch.float32)
        ref = m.amax(dim=-1, keepdim=True).clamp_min(LOG_FLOOR)
        v = (20.0 * torch.log10(m.clamp_min(1e-30) / ref) + LOG_RANGE_DB).clamp_min(0.0)
        norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        out = torch.where(norm > 0, v / norm.clamp_min(1e-30), torch.zeros_like(v))
        return out.to(torch.float32)
    m = np.asarray(mag)
    m = m if m.dtype == np.float64 else m.astype(np.float32)
    ref = np.maximum(m.max(axis=-1, keepdims=True, initial=0.0), LOG_FLOOR).astype(m.dtype)
    v = np.maximum(20.0 * np.log10(np.maximum(m, 1e-30) / ref) + LOG_RANGE_DB, 0.0)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    out = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)
    return out.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=8)
def _spectral_kernel(device: torch.device) -> torch.Tensor:
    """The (n_freq, 48) complex128 kernel S with C = rfft(window, N_FFT)[:n_freq] @ S."""
    kernel = np.zeros((N_BINS, N_FFT), dtype=np.complex128)
    for k in range(N_BINS):
        n = np.arange(_N_LO[k], _N_HI[k])
        hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n.size) / n.size)  # periodic (librosa)
        # Analysis atom conj(e^{iωn}) so that Σ x·a is the windowed DTFT at +ω; the L1 norm
        # makes a sine of amplitude A read A/2, sqrt(L) is librosa's scale=True.
        atom = hann * np.exp(-2j * np.pi * FREQS[k] * n / SAMPLE_RATE) / hann.sum()
        kernel[k, n + HALF_WINDOW] = atom * np.sqrt(LENGTHS[k])
    # Parseval: Σ_m x[m] a[m] = Σ_f X[f] · ifft(a)[f]. The atoms live at positive frequencies,
    # so the negative half of the spectrum is dropped (Brown–Puckette), and so is everything
    # above the last FFT bin where some atom is still within 1e-4 (-80 dB) of its peak: 1.8 kHz,
    # 676 of 4097 rows, a 6x cheaper product. Measured on noise and tones, the frames move by
    # < 2e-5; what is lost is far Hann sidelobe leakage of > 2 kHz sounds, which librosa drops
    # too (sparse kernel, anti-aliased octave decimation).
    spec = np.fft.ifft(kernel, axis=1)[:, : N_FFT // 2 + 1].T
    mag = np.abs(spec)
    keep = int(np.nonzero((mag > 1e-4 * mag.max(axis=0)).any(axis=1))[0].max()) + 1
    return torch.from_numpy(spec[:keep]).to(device)


def cqt_magnitude(windows: torch.Tensor) -> torch.Tensor:
    """|CQT| of analysis windows, batched (e.g. across streams on one GPU).

    Parameters
    ----------
    windows : torch.Tensor, shape (..., WINDOW), float
        22,050 Hz samples ``[c - HALF_WINDOW, c + HALF_WINDOW)`` around each frame centre ``c``.

    Returns
    -------
    torch.Tensor, shape (..., 48), float64, on the device of ``windows``
        Magnitudes before :func:`log_normalize`.
    """
    kern = _spectral_kernel(windows.device)
    spec = torch.fft.rfft(windows.to(_DTYPE), n=N_FFT, dim=-1)[..., : kern.shape[0]]
    return torch.abs(spec @ kern)


class StreamingCQT:
    """Incremental audio → CQT frames; any chunking gives the frames of the whole signal.

    Parameters
    ----------
    sample_rate : int
        Input rate, 8,000..96,000 Hz; resampled to 22,050 Hz by :mod:`model.resample`
        (libsoxr, any integer rate).
    channels : int
        Channels of the input PCM, downmixed to mono by their mean.
    device : torch.device or str, optional
        Where the resampler and the transform run (default CPU).
    log : bool
        True: frames go through :func:`log_normalize`; False: raw |C| magnitudes.

    Notes
    -----
    Only the samples still needed are kept (at most one analysis window plus the newest chunk),
    so a push costs work proportional to the audio it brings.
    """

    def __init__(self, sample_rate: int, channels: int = 1,
                 device: torch.device | str | None = None, *, log: bool = True) -> None:
        self.sample_rate = check_rate(sample_rate)
        if not isinstance(channels, (int, np.integer)) or not 1 <= channels <= 64:
            raise AudioError(f"channels must be 1..64, got {channels!r}", reason="bad_layout")
        self.channels = int(channels)
        self.device = torch.device(device if device is not None else "cpu")
        self.log = log
        self._rs = (None if self.sample_rate == SAMPLE_RATE
                    else StreamingResampler(self.sample_rate, SAMPLE_RATE, self.device))
        # Invariant: the buffer starts at sample t_next·HOP − HALF_WINDOW of the 22.05 kHz signal
        # (negative indices are the zero padding before the start).
        self._buf = SampleBuffer(HALF_WINDOW)
        self._n = 0  # 22.05 kHz samples received
        self._t_next = 0
        self._closed = False

    @property
    def lookahead_ms(self) -> float:
        """Audio after a frame's centre that the frame waits for, ms (see module docstring)."""
        return lookahead_ms(self.sample_rate)

    @property
    def frames_emitted(self) -> int:
        return self._t_next

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Add audio; return the frames it completes.

        Parameters
        ----------
        pcm : np.ndarray, shape (n,) or (n, channels), float or int16 (scaled to [-1, 1])

        Returns
        -------
        np.ndarray, shape (new_frames, 48), float32
        """
        if self._closed:
            raise RuntimeError("push() after finish(): start a new StreamingCQT")
        x = pcm_to_samples(pcm, self.channels)
        if x.size == 0:
            return np.zeros((0, N_BINS), np.float32)
        if self._rs is not None:
            x = self._rs.push(x)
        self._buf.append(x)
        self._n += x.size
        # Frame t is final once samples up to t·HOP + HALF_WINDOW − 1 are in.
        ready = (self._n - HALF_WINDOW) // HOP + 1 if self._n >= HALF_WINDOW else 0
        return self._emit(ready)

    def finish(self) -> np.ndarray:
        """Flush: zero-pad the end and return the last frames (1 + n // HOP in all)."""
        if self._closed:
            raise RuntimeError("finish() called twice")
        self._closed = True
        if self._rs is not None:
            tail = self._rs.finish()
            self._buf.append(tail)
            self._n += tail.size
        total = 1 + self._n // HOP
        need = (total - 1) * HOP + HALF_WINDOW - self._n
        if need > 0:
            self._buf.append(np.zeros(need))
        return self._emit(total)

    def _emit(self, ready: int) -> np.ndarray:
        count = ready - self._t_next
        if count <= 0:
            return np.zeros((0, N_BINS), np.float32)
        src = torch.from_numpy(self._buf.view()[: (count - 1) * HOP + WINDOW]).to(self.device)
        out = []
        for f0 in range(0, count, _FRAMES_PER_CALL):
            f1 = min(count, f0 + _FRAMES_PER_CALL)
            win = src[f0 * HOP:(f1 - 1) * HOP + WINDOW].unfold(0, WINDOW, HOP)
            mag = cqt_magnitude(win)
            out.append(log_normalize(mag) if self.log else mag)
        self._buf.drop(count * HOP)
        self._t_next = ready
        return torch.cat(out).cpu().numpy().astype(np.float32)


def audio_to_frames(audio: np.ndarray, sample_rate: int, *,
                    device: torch.device | str | None = None, log: bool = True) -> np.ndarray:
    """Whole-signal CQT frames (one push and a finish of :class:`StreamingCQT`).

    Parameters
    ----------
    audio : np.ndarray, shape (n,) or (n, channels), float or int16
    sample_rate : int
        Hz, 8,000..96,000.
    device : torch.device or str, optional
    log : bool
        False returns raw |C| magnitudes instead of :func:`log_normalize`-d frames.

    Returns
    -------
    np.ndarray, shape (1 + m // 1024, 48), float32
        ``m`` = the length at 22,050 Hz; frame t is centred at t·1024 / 22,050 s.
    """
    a = np.asarray(audio)
    channels = 1 if a.ndim == 1 else (a.shape[1] if a.ndim == 2 else 0)
    stream = StreamingCQT(sample_rate, max(channels, 1), device, log=log)
    return np.concatenate([stream.push(a), stream.finish()])


def lookahead_ms(sample_rate: int = SAMPLE_RATE) -> float:
    """Audio after a frame's centre that the frame needs, ms, including the resampler's tail."""
    rate = check_rate(sample_rate)
    if rate == SAMPLE_RATE:
        return LOOKAHEAD_MS
    rs = StreamingResampler(rate, SAMPLE_RATE, torch.device("cpu"))
    return LOOKAHEAD_MS + 1000.0 * rs.lookahead_s


# Quiet, for the live session's result periods (worker.session) and the edges of an offline query
# (music_span): under SILENCE_DBFS, or QUIET_BELOW_LOUDEST_DB under the loudest stretch around it
# (a pause, a fade, a reverb tail, the room before and after a take).
SILENCE_DBFS = -60.0
QUIET_BELOW_LOUDEST_DB = 30.0
EDGE_BLOCK_S = 0.01  # music_span's analysis block (a fraction of a CQT hop, 46 ms)
EDGE_SUSTAIN_S = 0.1  # the music starts and ends with this much sound, half of it loud at least
EDGE_SUSTAIN_BLOCKS = max(1, int(round(EDGE_SUSTAIN_S / EDGE_BLOCK_S)))  # the same, in blocks


def is_silent(audio: np.ndarray, threshold_db: float = SILENCE_DBFS) -> bool:
    """True when the RMS level of ``audio`` (any shape; int16 is scaled) is below threshold_db dBFS.

    Empty audio is silent. A full-scale square wave is 0 dBFS, a full-scale sine −3 dBFS.
    """
    a = np.asarray(audio)
    if a.size == 0:
        return True
    x = a.astype(np.float64) / (32768.0 if a.dtype == np.int16 else 1.0)
    rms = float(np.sqrt(np.mean(np.square(x))))
    return rms <= 10.0 ** (threshold_db / 20.0)


def music_span(audio: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """The samples ``[start, end)`` of ``audio`` from its first to its last stretch of music:
    the quiet before and after it (RMS per ``EDGE_BLOCK_S`` block under ``SILENCE_DBFS`` or
    ``QUIET_BELOW_LOUDEST_DB`` under the loudest block) is left out; pauses inside the music
    stay. The music starts at a loud block followed by ``EDGE_SUSTAIN_S`` at least half loud
    (and ends at one preceded by as much), so that an isolated click or bump in the quiet is
    not taken for it; audio with no such stretch keeps its first and last loud block.
    ``(0, 0)`` when no block is louder than ``SILENCE_DBFS``.

    Silence at the edges of a query is not part of the piece, but hash-DTW must align it
    somewhere: a reference with a quiet intro absorbs it for free while the right one pays, so
    3 s of silence before 8 s of music took a confidence of 0.95 to 0.25 (and 5 s before 3 s
    named another piece at 0.99) on the engine tests' songs; even 0.25 s of it left took 0.95
    to 0.75 and the position to another bar, hence the fine blocks and no margin.
    """
    a = np.asarray(audio)
    rate = check_rate(sample_rate)
    x = pcm_to_samples(a, a.shape[1] if a.ndim == 2 else 1)  # AudioError on bad PCM
    n = x.shape[0]
    block = int(round(EDGE_BLOCK_S * rate))
    k = -(-n // block)
    if k == 0:
        return 0, 0
    padded = np.zeros(k * block)
    padded[:n] = np.square(x)
    counts = np.full(k, float(block))
    counts[-1] = n - (k - 1) * block
    rms = np.sqrt(padded.reshape(k, block).sum(axis=1) / counts)
    level = max(10.0 ** (SILENCE_DBFS / 20.0), rms.max() * 10.0 ** (-QUIET_BELOW_LOUDEST_DB / 20.0))
    is_loud = rms > level
    loud = np.flatnonzero(is_loud)
    if loud.size == 0:
        return 0, 0
    # the music's first and last block: one that starts (ends) EDGE_SUSTAIN_S in which at least
    # half the blocks are loud, so that a click or a bump in the quiet is not taken for it
    w = EDGE_SUSTAIN_BLOCKS
    run = np.convolve(is_loud.astype(np.int32), np.ones(w, np.int32))  # run[j]: loud in j-w+1..j
    after = run[w - 1:w - 1 + k]  # loud blocks in i..i+w-1
    before = run[:k]  # loud blocks in i-w+1..i
    first = np.flatnonzero(is_loud & (2 * after >= w))
    last = np.flatnonzero(is_loud & (2 * before >= w))
    start = int(first[0] if first.size else loud[0])
    end = int(last[-1] if last.size else loud[-1])
    if end < start:
        start, end = int(loud[0]), int(loud[-1])
    return start * block, min(n, (end + 1) * block)

