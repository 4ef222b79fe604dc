"""Streaming hashes and embeddings: the learned networks fed CQT frames as they arrive.

One job: per-stream state and batched ticks of the hash net (:class:`StreamingHasher`,
:func:`hash_step`) and of the embed net (:class:`StreamingEmbedder`, :func:`embed_step`,
:func:`embeddings`), equal to the whole-sequence pass of :class:`model.encoder.Encoder`.

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
frames are taken (that plumbing is :mod:`model.frametail`).

The embedder pools the trunk steps of a sliding window with
:class:`model.attention.AttentionWindow` (per-block log-sum-exp-safe running sums); see its
docstring for the window granularity.
"""

from __future__ import annotations

import numpy as np
import torch

from model.attention import AttentionWindow
from model.encoder import MODALITIES, Encoder, Modality
from model.features import HOP, LOOKAHEAD_MS, SAMPLE_RATE
from model.frametail import FrameTail, StreamError, check_frames, forward_spans
from model.nets import HASH_DOWNSAMPLE, N_BINS

FRAME_MS = 1000.0 * HOP / SAMPLE_RATE  # one CQT hop, ≈ 46.44 ms
HASH_CONTEXT_FRAMES = 4  # frames before a hash block that its hash depends on
HASH_LOOKAHEAD_FRAMES = 4  # frames after a hash block that must arrive before it is emitted
EMBED_STEP_FRAMES = 2  # one trunk step per 2 CQT frames
EMBED_CONTEXT_FRAMES = 2
EMBED_LOOKAHEAD_FRAMES = 2
HASH_LOOKAHEAD_MS = HASH_LOOKAHEAD_FRAMES * FRAME_MS + LOOKAHEAD_MS  # ≈ 318.3 ms
EMBED_LOOKAHEAD_MS = EMBED_LOOKAHEAD_FRAMES * FRAME_MS + LOOKAHEAD_MS  # ≈ 225.4 ms


def _check_modality(modality: str) -> Modality:
    if modality not in MODALITIES:
        raise StreamError(f"modality must be one of {MODALITIES}, got {modality!r}",
                          reason="bad_modality")
    return modality  # type: ignore[return-value]


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
            checked.append(check_frames(f))
        except StreamError as e:
            raise StreamError(f"stream {i}: {e.message}", reason=e.reason) from e
    return checked


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
        self._tail = FrameTail(HASH_DOWNSAMPLE, HASH_CONTEXT_FRAMES, HASH_LOOKAHEAD_FRAMES)

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
        (act,) = forward_spans(self.encoder, [self], [span], "hash")[0]
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
            for o in forward_spans(encoder, hashers, spans, "hash")]



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
        self._tail = FrameTail(EMBED_STEP_FRAMES, EMBED_CONTEXT_FRAMES, EMBED_LOOKAHEAD_FRAMES)

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
            self._window.add(*forward_spans(self.encoder, [self], [span], "embed")[0])

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
    outs = forward_spans(encoder, embedders, spans, "embed")
    for e, out in zip(embedders, outs, strict=True):
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
