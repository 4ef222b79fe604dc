"""Streaming plumbing shared by the hasher and the embedder of :mod:`model.streaming`.

One job: feed a strided conv front frame by frame as if it saw the whole stream. The nets use
symmetric 'same' padding, so output ``k`` of a front with stride ``step`` depends on a finite
window of frames; :class:`FrameTail` keeps, per stream, only the frames that some pending output
still needs and hands out a :class:`Span` once outputs are complete (their whole receptive field
has arrived, or the stream ended: zeros past the end, as the whole pass pads).
:func:`forward_spans` runs many streams' spans in ONE forward pass per modality (the worker's
tick): the spans are right-padded to a common length, and the padding never reaches an output
that is taken.
"""

from __future__ import annotations

import numpy as np
import torch

from model.encoder import Encoder
from model.errors import MidimatchError
from model.nets import N_BINS


class StreamError(MidimatchError):
    """Frames that cannot be streamed (wrong shape, NaN or infinity), or a misuse of a stream."""

    reason = "bad_frames"


def check_frames(frames: np.ndarray) -> np.ndarray:
    """``frames`` as float32 of shape (n, 48), or :class:`StreamError` (shape, NaN, infinity)."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2 or frames.shape[1] != N_BINS:
        raise StreamError(f"frames must have shape (n, {N_BINS}), got {frames.shape}")
    if not np.all(np.isfinite(frames)):
        raise StreamError("frames contain NaN or infinity")
    return frames


class Span:
    """A slice of one stream to run through a net: outputs ``[skip, skip + count)`` of it."""

    __slots__ = ("count", "frames", "skip")

    def __init__(self, frames: np.ndarray, skip: int, count: int) -> None:
        self.frames, self.skip, self.count = frames, skip, count


class FrameTail:
    """The frames a strided conv front still needs, and which of its outputs are complete.

    Output ``k`` covers frames ``[step·k, step·(k+1))`` and depends on ``context`` frames before
    and ``lookahead`` frames after them (zeros outside the stream, as the whole pass pads).
    """

    def __init__(self, step: int, context: int, lookahead: int) -> None:
        self.step, self.context, self.lookahead = step, context, lookahead
        self.buf = np.zeros((0, N_BINS), np.float32)
        self.start = 0  # stream index of buf[0]; a multiple of ``step``
        self.n_frames = 0  # frames received
        self.emitted = 0  # outputs handed out
        self.finished = False

    def take(self, frames: np.ndarray, *, final: bool = False) -> Span | None:
        """Append frames; return the span that yields every newly complete output, if any."""
        if self.finished:
            raise StreamError("stream already finished", reason="stream_finished")
        frames = check_frames(frames)
        if len(frames):
            self.buf = np.concatenate([self.buf, frames])
            self.n_frames += len(frames)
        step = self.step
        if final:  # the stream's end: the whole pass's right zero padding applies
            ready = self.n_frames // step
            self.finished = True
        else:
            ready = max(0, (self.n_frames - self.lookahead) // step)
        count = ready - self.emitted
        if count <= 0:
            return None
        s = max(0, step * self.emitted - self.context)
        e = self.n_frames if final else step * ready + self.lookahead
        span = Span(self.buf[s - self.start:e - self.start], (step * self.emitted - s) // step,
                     count)
        self.emitted = ready
        keep = max(0, step * ready - self.context)
        self.buf = self.buf[keep - self.start:].copy()
        self.start = keep
        return span

def _run(encoder: Encoder, fn, spans: list[Span]) -> list[tuple[torch.Tensor, ...]]:
    """Run ``fn`` once on the right-padded, standardised batch of spans; slice each output."""
    length = max(len(sp.frames) for sp in spans)
    x = np.zeros((len(spans), length, N_BINS), np.float32)
    for i, sp in enumerate(spans):
        x[i, :len(sp.frames)] = sp.frames
    t = torch.from_numpy(x).to(encoder.device)
    outs = fn((t - encoder.mean) / encoder.std)  # same arithmetic as Encoder._prep
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [tuple(o[i, sp.skip:sp.skip + sp.count] for o in outs) for i, sp in enumerate(spans)]


def forward_spans(encoder: Encoder, streams: list, spans: list[Span | None], kind: str
             ) -> list[tuple[np.ndarray, ...] | None]:
    """Each stream's outputs for its span (None without one), one forward pass per modality.

    ``kind`` "hash" runs the hash net (→ activations); "embed" the embed trunk (→ h, scores).
    """
    out: list[tuple[np.ndarray, ...] | None] = [None] * len(streams)
    with torch.inference_mode():
        for modality in sorted({st.modality for st in streams}):
            idx = [i for i, st in enumerate(streams)
                   if st.modality == modality and spans[i] is not None]
            if not idx:
                continue
            net = encoder.nets[f"{kind}_{modality}"]
            res = _run(encoder, net.trunk if kind == "embed" else net, [spans[i] for i in idx])
            for i, r in zip(idx, res, strict=True):
                out[i] = tuple(t.cpu().numpy() for t in r)
    return out
