"""Streaming hashes and embeddings: the learned networks fed CQT frames as they arrive.

No architecture change: the nets use symmetric 'same' padding, so every output depends on a
finite window of input frames, and an output can be emitted as soon as that window has arrived.

Receptive fields (CQT frames, 21.53 frames/s, ``FRAME_MS`` = 46.44 ms each)
----------------------------------------------------------------------------
* **HashNet**: conv 5 (time pad 2/2) → pool 2 → conv 3 (pad 1/1) → pool 2. Hash frame ``k``
  covers the block of frames ``4k … 4k+3`` and depends on frames ``4k−4 … 4k+7``: 4 frames of
  context before its block and **4 frames of look-ahead after it** (185.8 ms), on top of the
  CQT's own 132.5 ms (``model.features.LOOKAHEAD_MS``): 318.3 ms from the end of the block to
  the hash. Blocks are aligned on the stream start, as in the whole-sequence pass.
* **EmbedNet trunk**: conv 5 (pad 2/2) → pool 2. Trunk step ``j`` covers frames ``2j, 2j+1`` and
  depends on frames ``2j−2 … 2j+3``: 2 frames of context, 2 frames (92.9 ms) of look-ahead.

Only the frames still needed are kept per stream (at most ~11 for the hasher, ~5 for the
embedder), so a push costs work proportional to the frames it brings. ``hash_step`` and
``embed_step`` run ONE forward pass for many streams (the worker's tick): each stream's
(context + new) frames are right-padded to a common length; the padding never reaches an
emitted output, because only outputs whose whole receptive field lies inside the stream's own
frames are taken.

The embedder pools the trunk steps of a sliding window with :class:`AttentionWindow` (per-block
log-sum-exp-safe running sums); see its docstring for the window granularity.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model.encoder import MODALITIES, Encoder, Modality
from model.errors import MidimatchError
from model.features import HOP, LOOKAHEAD_MS, SAMPLE_RATE
from model.nets import HASH_DOWNSAMPLE, N_BINS

FRAME_MS = 1000.0 * HOP / SAMPLE_RATE  # one CQT hop, ≈ 46.44 ms
HASH_CONTEXT_FRAMES = 4  # frames before a hash block that its hash depends on
HASH_LOOKAHEAD_FRAMES = 4  # frames after a hash block that must arrive before it is emitted
EMBED_STEP_FRAMES = 2  # one trunk step per 2 CQT frames
EMBED_CONTEXT_FRAMES = 2
EMBED_LOOKAHEAD_FRAMES = 2
HASH_LOOKAHEAD_MS = HASH_LOOKAHEAD_FRAMES * FRAME_MS + LOOKAHEAD_MS  # ≈ 318.3 ms
EMBED_LOOKAHEAD_MS = EMBED_LOOKAHEAD_FRAMES * FRAME_MS + LOOKAHEAD_MS  # ≈ 225.4 ms


class StreamError(MidimatchError):
    """Frames that cannot be streamed (wrong shape, NaN or infinity), or a misuse of a stream."""

    reason = "bad_frames"


def _check_modality(modality: str) -> Modality:
    if modality not in MODALITIES:
        raise StreamError(f"modality must be one of {MODALITIES}, got {modality!r}",
                          reason="bad_modality")
    return modality  # type: ignore[return-value]


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2 or frames.shape[1] != N_BINS:
        raise StreamError(f"frames must have shape (n, {N_BINS}), got {frames.shape}")
    if not np.all(np.isfinite(frames)):
        raise StreamError("frames contain NaN or infinity")
    return frames


class _Span:
    """A slice of one stream to run through a net: outputs ``[skip, skip + count)`` of it."""

    __slots__ = ("count", "frames", "skip")

    def __init__(self, frames: np.ndarray, skip: int, count: int) -> None:
        self.frames, self.skip, self.count = frames, skip, count


class _FrameTail:
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

    def take(self, frames: np.ndarray, *, final: bool = False) -> _Span | None:
        """Append frames; return the span that yields every newly complete output, if any."""
        if self.finished:
            raise StreamError("stream already finished", reason="stream_finished")
        frames = _check_frames(frames)
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
        span = _Span(self.buf[s - self.start:e - self.start], (step * self.emitted - s) // step,
                     count)
        self.emitted = ready
        keep = max(0, step * ready - self.context)
        self.buf = self.buf[keep - self.start:].copy()
        self.start = keep
        return span


def _check_batch(encoder: Encoder, streams: list, new_frames: list[np.ndarray]
                 ) -> list[np.ndarray]:
    """Validate a whole tick before any stream's state changes (one bad stream spoils none)."""
    if len(streams) != len(new_frames):
        raise StreamError(f"{len(streams)} streams but {len(new_frames)} frame arrays",
                          reason="bad_batch")
    checked = []
    for i, (st, f) in enumerate(zip(streams, new_frames, strict=True)):
        if st.encoder is not encoder:
            raise StreamError(f"stream {i} was built with another encoder", reason="bad_batch")
        if st._tail.finished:
            raise StreamError(f"stream {i} already finished", reason="stream_finished")
        try:
            checked.append(_check_frames(f))
        except StreamError as e:
            raise StreamError(f"stream {i}: {e.message}", reason=e.reason) from e
    return checked


def _run(encoder: Encoder, fn, spans: list[_Span]) -> list[tuple[torch.Tensor, ...]]:
    """Run ``fn`` once on the right-padded, standardised batch of spans; slice each output."""
    length = max(len(sp.frames) for sp in spans)
    x = np.zeros((len(spans), length, N_BINS), np.float32)
    for i, sp in enumerate(spans):
        x[i, :len(sp.frames)] = sp.frames
    t = torch.from_numpy(x).to(encoder.device)
    outs = fn((t - encoder.mean) / encoder.std)  # same arithmetic as Encoder._prep
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [tuple(o[i, sp.skip:sp.skip + sp.count] for o in outs) for i, sp in enumerate(spans)]


def _forward(encoder: Encoder, streams: list, spans: list[_Span | None], kind: str
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


# ---------------------------------------------------------------------------------- hashes
class StreamingHasher:
    """Incremental :meth:`Encoder.hashes` for one stream.

    The concatenation of every ``push`` and the final ``finish`` equals
    ``encoder.hashes(all_frames, modality)`` for any chunking. A hash frame is emitted once the
    ``lookahead_frames`` = 4 frames after its 4-frame block have arrived (185.8 ms, plus the
    CQT's 132.5 ms: ``HASH_LOOKAHEAD_MS`` ≈ 318 ms after the block's last frame).

    Parameters
    ----------
    encoder : Encoder
    modality : {"audio", "midi"}
    """

    lookahead_frames = HASH_LOOKAHEAD_FRAMES
    lookahead_ms = HASH_LOOKAHEAD_MS

    def __init__(self, encoder: Encoder, modality: Modality = "audio") -> None:
        self.encoder = encoder
        self.modality = _check_modality(modality)
        self._tail = _FrameTail(HASH_DOWNSAMPLE, HASH_CONTEXT_FRAMES, HASH_LOOKAHEAD_FRAMES)

    @property
    def n_frames(self) -> int:
        """CQT frames received so far."""
        return self._tail.n_frames

    @property
    def n_hashes(self) -> int:
        """Hash frames emitted so far (hash ``k`` covers frames ``4k … 4k+3``)."""
        return self._tail.emitted

    @property
    def nbytes(self) -> int:
        """Bytes of per-stream state (the retained frames; at most 11 × 48 float32)."""
        return int(self._tail.buf.nbytes)

    def push(self, frames: np.ndarray, *, packed: bool = True) -> np.ndarray:
        """Feed ``frames`` (n, 48) float32; return the newly complete hash frames.

        Returns (k,) uint16/uint32 packed hashes, or (k, n_bits) float32 activations when
        ``packed`` is False.
        """
        return hash_step(self.encoder, [self], [frames], packed=packed)[0]

    def finish(self, *, packed: bool = True) -> np.ndarray:
        """End of stream: flush the last hash frames (zero padding as in the whole pass)."""
        span = self._tail.take(np.zeros((0, N_BINS), np.float32), final=True)
        if span is None:
            return _empty(self.encoder, packed)
        # alone: a padded batch would not reproduce the end
        (act,) = _forward(self.encoder, [self], [span], "hash")[0]
        return _pack(act, packed)


def _empty(encoder: Encoder, packed: bool) -> np.ndarray:
    if packed:
        return np.zeros(0, encoder.hash_dtype)
    return np.zeros((0, encoder.n_bits), np.float32)


def _pack(act: np.ndarray, packed: bool) -> np.ndarray:
    from model.bits import pack_bits

    return pack_bits(act) if packed else act


def hash_step(encoder: Encoder, hashers: list[StreamingHasher], new_frames: list[np.ndarray],
              *, packed: bool = True) -> list[np.ndarray]:
    """One tick for many streams: push ``new_frames[i]`` into ``hashers[i]``, one forward pass
    per modality for all of them.

    Parameters
    ----------
    encoder : Encoder
        The encoder every hasher was built with.
    hashers : list of StreamingHasher
    new_frames : list of np.ndarray (n_i, 48) float32
        Each stream's new CQT frames (n_i may be 0).
    packed : bool
        True: packed hashes; False: tanh activations.

    Returns
    -------
    list of np.ndarray
        Per stream, (k_i,) packed hashes (uint16/uint32), or (k_i, n_bits) float32.
    """
    frames = _check_batch(encoder, hashers, new_frames)
    spans = [h._tail.take(f) for h, f in zip(hashers, frames, strict=True)]
    return [_empty(encoder, packed) if o is None else _pack(o[0], packed)
            for o in _forward(encoder, hashers, spans, "hash")]


# ------------------------------------------------------------------------------ embeddings
class AttentionWindow:
    """Softmax-over-time pooling of a sliding window, from per-block running sums.

    Steps are grouped in blocks of ``block_steps`` aligned on step 0. Per block ``b`` it keeps
    ``m_b = max s_t``, ``S_b = Σ exp(s_t − m_b)`` and ``V_b = Σ exp(s_t − m_b)·h_t`` (float64);
    the pool is ``Σ_b exp(m_b − M)·V_b / Σ_b exp(m_b − M)·S_b`` with ``M = max_b m_b``, so no
    exponent is ever positive: any finite scores give a finite pool (the arg-max step has weight
    1, the denominator is ≥ 1). The newest block is updated in place, rescaled when its max rises.

    Granularity: old blocks drop off whole, so the window is ``[start, end)`` where ``end`` is
    the number of steps added and ``start`` is the first block boundary ≥ ``end −
    window_steps`` (clamped at 0): its length is in ``(window_steps − block_steps,
    window_steps]`` once the stream is long enough, and it always starts on a block boundary.

    Parameters
    ----------
    dim : int
        Feature width D.
    window_steps, block_steps : int
        Window and block lengths in steps, 1 ≤ block_steps ≤ window_steps.
    """

    def __init__(self, dim: int, window_steps: int, block_steps: int) -> None:
        if not 1 <= block_steps <= window_steps:
            raise StreamError(f"need 1 <= block_steps ({block_steps}) <= window_steps "
                              f"({window_steps})", reason="bad_window")
        self.dim, self.window_steps, self.block_steps = dim, window_steps, block_steps
        cap = window_steps // block_steps + 2  # blocks a window can touch, +1 spare
        self._m = np.full(cap, -np.inf)
        self._s = np.zeros(cap)
        self._v = np.zeros((cap, dim))
        self.end = 0  # steps added

    @property
    def start(self) -> int:
        """First step of the window (a block boundary)."""
        b = self.block_steps
        return max(0, -(-(self.end - self.window_steps) // b) * b)

    @property
    def nbytes(self) -> int:
        return int(self._m.nbytes + self._s.nbytes + self._v.nbytes)

    def add(self, h: np.ndarray, scores: np.ndarray) -> None:
        """Append steps: features ``h`` (n, D) and attention scores ``scores`` (n,), finite."""
        h = np.asarray(h, np.float64)
        scores = np.asarray(scores, np.float64)
        if h.ndim != 2 or h.shape[1] != self.dim or scores.shape != (h.shape[0],):
            raise StreamError(f"need h (n, {self.dim}) and scores (n,), got {h.shape} and "
                              f"{scores.shape}")
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(scores))):
            raise StreamError("features or scores contain NaN or infinity")
        i, n, bs, cap = 0, len(scores), self.block_steps, len(self._m)
        while i < n:
            block, offset = divmod(self.end, bs)
            j = min(n, i + bs - offset)
            seg_s, seg_h = scores[i:j], h[i:j]
            slot = block % cap
            m_new = seg_s.max()
            if offset == 0:  # a new block: forget what the slot held
                self._m[slot], self._s[slot], self._v[slot] = m_new, 0.0, 0.0
            elif m_new > self._m[slot]:  # rescale the block's sums to the new max
                r = math.exp(self._m[slot] - m_new)
                self._m[slot] = m_new
                self._s[slot] *= r
                self._v[slot] *= r
            w = np.exp(seg_s - self._m[slot])
            self._s[slot] += w.sum()
            self._v[slot] += w @ seg_h
            self.end += j - i
            i = j

    def pooled(self) -> np.ndarray | None:
        """The attention-pooled (D,) float64 vector of the window, or None before any step."""
        if self.end == 0:
            return None
        return self._pool(self._slots())

    def pooled_views(self, parts: int) -> np.ndarray | None:
        """(1 + parts, D) float64: the window pooled whole, then each of ``parts`` consecutive
        groups of its blocks (as equal in blocks as they can be; a group left empty by a window
        of fewer blocks is the whole window), or None before any step. The streaming form of
        :meth:`model.encoder.Encoder.embed_views`, at block granularity."""
        if self.end == 0:
            return None
        slots = self._slots()
        whole = self._pool(slots)
        groups = np.array_split(slots, parts) if parts else []
        return np.stack([whole, *(self._pool(g) if g.size else whole for g in groups)])

    def _slots(self) -> np.ndarray:
        bs, cap = self.block_steps, len(self._m)
        return np.arange(self.start // bs, (self.end - 1) // bs + 1) % cap

    def _pool(self, slots: np.ndarray) -> np.ndarray:
        m = self._m[slots]
        w = np.exp(m - m.max())
        return (w @ self._v[slots]) / (w @ self._s[slots])


class StreamingEmbedder:
    """Incremental embedding of the last ``window_frames`` CQT frames of one stream.

    The trunk (conv 5 → pool 2 → attention score) runs incrementally with 2 frames of look-ahead
    (``EMBED_LOOKAHEAD_MS`` ≈ 225 ms with the CQT's); its steps feed an :class:`AttentionWindow`
    of ``window_frames // 2`` steps in blocks of ``block_frames // 2`` steps. The embedding of
    window ``[2·start, 2·end)`` frames equals pooling the whole-stream trunk over steps
    ``[start, end)`` — what :meth:`Encoder.window_embeddings` does for an index window starting
    at frame ``2·start``. It differs from ``Encoder.embed(frames[2·start:2·end])`` only at the
    window's first and last steps, which that call computes with zero padding instead of the
    neighbouring frames; after :meth:`finish`, a stream no longer than the window embeds
    exactly as ``Encoder.embed`` of all its frames.

    Parameters
    ----------
    encoder : Encoder
    window_frames : int, optional
        Window length in CQT frames (default ``encoder.window.length`` = 215 ≈ 10 s).
    block_frames : int
        Granularity with which old frames leave the window (default 22 ≈ 1 s); even.
    modality : {"audio", "midi"}
    parts : int
        Parts of the window embedded beside it (:meth:`AttentionWindow.pooled_views`; the
        cascade's ``prune_parts``). 0: :meth:`embedding` is one (embed_dim,) vector; otherwise
        (1 + parts, embed_dim), the query views the prune takes.
    """

    lookahead_frames = EMBED_LOOKAHEAD_FRAMES
    lookahead_ms = EMBED_LOOKAHEAD_MS

    def __init__(self, encoder: Encoder, window_frames: int | None = None,
                 block_frames: int = 22, modality: Modality = "audio", parts: int = 0) -> None:
        window_frames = encoder.window.length if window_frames is None else int(window_frames)
        if block_frames < 2 or block_frames % 2 or window_frames < block_frames:
            raise StreamError(f"need an even block_frames >= 2 and window_frames >= block_frames,"
                              f" got {block_frames} and {window_frames}", reason="bad_window")
        if parts < 0:
            raise StreamError(f"parts must be >= 0, got {parts}", reason="bad_window")
        self.encoder = encoder
        self.parts = int(parts)
        self.modality = _check_modality(modality)
        self.window_frames, self.block_frames = window_frames, block_frames
        net = encoder.nets[f"embed_{self.modality}"]
        self._window = AttentionWindow(net.front.out_features, window_frames // 2,
                                       block_frames // 2)
        self._tail = _FrameTail(EMBED_STEP_FRAMES, EMBED_CONTEXT_FRAMES, EMBED_LOOKAHEAD_FRAMES)

    @property
    def n_frames(self) -> int:
        """CQT frames received so far."""
        return self._tail.n_frames

    @property
    def window_span(self) -> tuple[int, int]:
        """The frames ``[start, end)`` the current embedding pools (start on a block boundary)."""
        return 2 * self._window.start, 2 * self._window.end

    @property
    def nbytes(self) -> int:
        """Bytes of per-stream state: retained frames plus the block sums."""
        return int(self._tail.buf.nbytes + self._window.nbytes)

    def push(self, frames: np.ndarray) -> None:
        """Feed ``frames`` (n, 48) float32 (one forward pass; batch streams with embed_step)."""
        embed_step(self.encoder, [self], [frames])

    def finish(self) -> None:
        """End of stream: add the last trunk steps, zero-padded as the whole pass pads them.

        A stream of N ≤ ``window_frames`` frames then embeds exactly as ``Encoder.embed``.
        """
        span = self._tail.take(np.zeros((0, N_BINS), np.float32), final=True)
        if span is not None:
            # alone: a padded batch would not reproduce the end
            self._window.add(*_forward(self.encoder, [self], [span], "embed")[0])

    def pooled(self) -> np.ndarray | None:
        """The attention-pooled trunk features of the window, or None: (D,) float64, or with
        ``parts`` the (1 + parts, D) views."""
        if self.parts:
            return self._window.pooled_views(self.parts)
        return self._window.pooled()

    def embedding(self) -> np.ndarray | None:
        """The window's embedding, (embed_dim,) float32 (with ``parts``: (1 + parts,
        embed_dim), the views), or None before the first trunk step."""
        out = embeddings(self.encoder, [self])
        return out[0]


def embed_step(encoder: Encoder, embedders: list[StreamingEmbedder],
               new_frames: list[np.ndarray]) -> None:
    """One tick for many streams: push ``new_frames[i]`` (n_i, 48) into ``embedders[i]`` with one
    trunk forward pass per modality, updating each stream's running sums."""
    frames = _check_batch(encoder, embedders, new_frames)
    spans = [e._tail.take(f) for e, f in zip(embedders, frames, strict=True)]
    for e, out in zip(embedders, _forward(encoder, embedders, spans, "embed"), strict=True):
        if out is not None:
            e._window.add(*out)


def embeddings(encoder: Encoder, embedders: list[StreamingEmbedder]) -> list[np.ndarray | None]:
    """Current embeddings of many streams, one head forward pass per modality.

    Returns, per stream, an (embed_dim,) float32 array (with ``parts``: (1 + parts,
    embed_dim)), or None before its first trunk step.
    """
    if any(e.encoder is not encoder for e in embedders):
        raise StreamError("every embedder must use the given encoder", reason="bad_batch")
    pooled = [e.pooled() for e in embedders]
    out: list[np.ndarray | None] = [None] * len(embedders)
    with torch.inference_mode():
        for modality in {e.modality for e in embedders}:
            idx = [i for i, e in enumerate(embedders)
                   if e.modality == modality and pooled[i] is not None]
            if not idx:
                continue
            rows = [np.atleast_2d(pooled[i]) for i in idx]  # (V_i, D) each
            x = torch.as_tensor(np.concatenate(rows), dtype=torch.float32, device=encoder.device)
            emb = encoder.nets[f"embed_{modality}"].head(x).cpu().numpy()
            at = 0
            for i, r in zip(idx, rows, strict=True):
                out[i] = emb[at] if pooled[i].ndim == 1 else emb[at:at + len(r)]
                at += len(r)
    return out
