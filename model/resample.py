"""Streaming resampling: torchaudio's sinc resampler run one block at a time.

One job: turn input at any supported rate into the 22,050 Hz signal the CQT reads, chunk by
chunk, with the samples of the whole-signal ``torchaudio.functional.resample`` call.
:class:`SampleBuffer` is the float64 FIFO it (and :class:`model.features.StreamingCQT`) keeps
its pending samples in.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchaudio.functional.functional as _taf

from model.errors import AudioError

# A polyphase resampling kernel has new/gcd × (orig/gcd + 2·width) taps: common rates need
# < 0.3 M, a rate coprime with 22,050 would need ~10^9 (torchaudio itself would not cope).
_MAX_RESAMPLE_TAPS = 1 << 22
# The convolution runs in float64 as the CQT it feeds does (see model.features: float32
# rounding there moved quiet frames between two chunkings of the same audio).
_DTYPE = torch.float64


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


class StreamingResampler:
    """torchaudio's sinc resampler (``functional.resample`` defaults), one block at a time.

    ``resample`` zero-pads ``width`` samples in front, ``width + orig`` behind, and runs a conv1d
    of stride ``orig`` (gcd-reduced): block b reads padded samples ``[b·orig, b·orig + taps)``
    and writes ``new`` output samples. A block is computed once its input is all there, so
    the concatenated output equals the whole-signal call (to float rounding).
    """

    def __init__(self, orig: int, new: int, device: torch.device) -> None:
        gcd = math.gcd(orig, new)
        self.orig, self.new = orig // gcd, new // gcd
        # Size the kernel as torchaudio will (width for lowpass_filter_width=6, rolloff=0.99)
        # before building it: a rate coprime with 22,050 would allocate gigabytes.
        width = math.ceil(6 * self.orig / (min(self.orig, self.new) * 0.99))
        if self.new * (2 * width + self.orig) > _MAX_RESAMPLE_TAPS:
            raise AudioError(
                f"sample rate {orig} Hz needs a {self.new * (2 * width + self.orig)}-tap "
                f"resampling kernel to reach {new} Hz; use a common rate (8000, 16000, 22050, "
                "32000, 44100, 48000, 96000)", reason="unsupported_rate")
        # Private torchaudio API, pinned by pyproject (torchaudio==2.11.0). The taps are made in
        # float32 as resample() makes them; the convolution runs in float64 (see _DTYPE).
        kernel, self.width = _taf._get_sinc_resample_kernel(
            orig, new, gcd, device=device, dtype=torch.float32)
        # As a (taps, new) matrix: unfold + matmul is resample()'s strided conv1d, without
        # conv1d's per-call overhead (~ms on CPU), which dominated small pushes.
        self.kernel, self.device = kernel[:, 0, :].T.contiguous().to(_DTYPE), device
        self.taps = kernel.shape[-1]
        self.rate = orig
        self.buf = SampleBuffer(self.width)
        self.n_in = self.n_out = 0

    @property
    def lookahead_s(self) -> float:
        """Worst-case wait for an output sample: the filter half-width plus one block."""
        return (self.width + self.orig) / self.rate

    def push(self, x: np.ndarray) -> np.ndarray:
        self.n_in += x.size
        self.buf.append(x)
        return self._blocks()

    def finish(self) -> np.ndarray:
        done = self.n_out
        self.buf.append(np.zeros(self.width + self.orig))
        out = self._blocks()
        # resample() keeps ceil(new·L/orig) samples, computed in float32 as here.
        total = int(torch.ceil(torch.as_tensor(self.new * self.n_in / self.orig)))
        return out[: max(0, total - done)]

    def _blocks(self) -> np.ndarray:
        avail = len(self.buf)
        if avail < self.taps:
            return np.zeros(0)
        n_blocks = (avail - self.taps) // self.orig + 1
        per_call = max(1, (1 << 20) // self.taps)  # unfolded input ≤ 1 M samples (8 MB)
        src = torch.from_numpy(self.buf.view()[: (n_blocks - 1) * self.orig + self.taps])
        src = src.to(self.device)
        parts = []
        for b0 in range(0, n_blocks, per_call):
            b1 = min(n_blocks, b0 + per_call)
            seg = src[b0 * self.orig:(b1 - 1) * self.orig + self.taps]
            parts.append((seg.unfold(0, self.taps, self.orig) @ self.kernel).reshape(-1))
        self.buf.drop(n_blocks * self.orig)
        out = torch.cat(parts).cpu().numpy()
        self.n_out += out.size
        return out
