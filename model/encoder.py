"""One model = four networks (hash and embed, for audio and for MIDI) plus input statistics.

This is the interface the index builder and the worker use; they never touch the networks
directly. A model has a stable ``model_id`` (a digest of its configuration and weights) that an
index records, so that an index is never searched with a model that did not build it.

The default model is ``model/weights/default.pt``. A missing weights file is an error naming the
file, never a silent fallback: an untrained model (:meth:`Encoder.untrained`, for tests and the
start of training) only comes when asked for by name.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model.errors import MidimatchError
from model.nets import HASH_DOWNSAMPLE, N_BINS, EmbedNet, HashNet, NetConfig

Modality = Literal["audio", "midi"]
MODALITIES: tuple[Modality, ...] = ("audio", "midi")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "default.pt"
FORMAT = "midimatch-model/1"
# A query is pruned with its whole window and its two halves (Encoder.embed_views): chosen on the
# valid + test pairs of the training renderers (docs/evaluation.md, "Query views").
QUERY_PARTS = 2


@dataclass(frozen=True)
class WindowSpec:
    """How a whole piece is cut into windows for embedding (in CQT frames, 21.53 frames/s)."""

    length: int = 215  # ≈ 10 s: the live query window
    hop: int = 108  # ≈ 5 s

    def starts(self, n_frames: int) -> np.ndarray:
        """Start frames of the windows covering ``n_frames`` frames (at least one window)."""
        if n_frames <= self.length:
            return np.zeros(1, dtype=np.int64)
        starts = np.arange(0, n_frames - self.length + 1, self.hop, dtype=np.int64)
        if starts[-1] + self.length < n_frames:  # cover the tail too
            starts = np.append(starts, n_frames - self.length)
        return starts


class Encoder:
    """Hashes and embeddings for audio or MIDI feature frames.

    Parameters
    ----------
    config : NetConfig
    nets : dict
        ``{"hash_audio", "hash_midi", "embed_audio", "embed_midi"}`` → modules.
    mean, std : np.ndarray (48,)
        Per-bin input standardisation (training-set statistics).
    model_id : str
        Stable identifier recorded by indexes.
    device : str or torch.device
    """

    def __init__(
        self,
        config: NetConfig,
        nets: dict[str, torch.nn.Module],
        mean: np.ndarray,
        std: np.ndarray,
        model_id: str,
        device: str | torch.device = "cpu",
        window: WindowSpec | None = None,
    ) -> None:
        self.config = config
        self.device = check_device(device)
        self.nets = {k: v.to(self.device).eval() for k, v in nets.items()}
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.model_id = model_id
        self.window = window or WindowSpec()

    # ------------------------------------------------------------------ construction
    @classmethod
    def untrained(cls, seed: int = 0, config: NetConfig | None = None, **kw) -> Encoder:
        """A deterministic untrained model (same seed → same weights → same ``model_id``)."""
        cfg = config or NetConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nets = _build_nets(cfg)
        mean, std = np.zeros(N_BINS, np.float32), np.full(N_BINS, 0.15, np.float32)
        return cls(cfg, nets, mean, std, f"untrained-seed{seed}-{_digest(cfg, nets)}", **kw)

    @classmethod
    def load(cls, path: str | Path | None = None, **kw) -> Encoder:
        """Load a saved model; with no path, the shipped default (``model/weights/default.pt``).

        Raises
        ------
        MidimatchError
            ``no_model`` when the file does not exist (the message names it and says how to get
            one), ``bad_model`` when it is not a model file (or a damaged one), ``bad_device``
            for a ``device`` this machine does not have (:func:`check_device`).
        """
        if "device" in kw:
            check_device(kw["device"])  # before reading the weights
        path = Path(DEFAULT_WEIGHTS if path is None else path)
        if not path.is_file():
            hint = ("the shipped model is missing from this checkout (model/weights/ is in git: "
                    "restore it with `git checkout model/weights`, or train one with `make train`)"
                    if path == DEFAULT_WEIGHTS else "give the path of a .pt file written by "
                    "`midimatch train`")
            raise MidimatchError(f"model weights {path} do not exist: {hint}", reason="no_model")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except Exception as e:  # any file: the unpickler fails in many ways (an audio file
            # gave IndexError: pop from empty list)
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MidimatchError(f"cannot load model weights {path}: not a model file written "
                                 f"by `midimatch train` ({why})", reason="bad_model") from e
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise MidimatchError(f"{path} is not a {FORMAT} file", reason="bad_model")
        try:
            cfg = NetConfig(**blob["config"])
            nets = _build_nets(cfg)
            for name, net in nets.items():
                net.load_state_dict(blob["state"][name])
            mean = np.asarray(blob["mean"], np.float32)
            std = np.asarray(blob["std"], np.float32)
            model_id = str(blob["model_id"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MidimatchError(f"{path} is a damaged {FORMAT} file: {why}",
                                 reason="bad_model") from e
        return cls(cfg, nets, mean, std, model_id, **kw)

    def save(self, path: str | Path, *, model_id: str | None = None) -> str:
        """Write the model (atomically); returns the model id stored in it."""
        nets_cpu = {k: {n: t.detach().cpu() for n, t in v.state_dict().items()}
                    for k, v in self.nets.items()}
        mid = model_id or f"{self.config.n_bits}bit-{_digest(self.config, self.nets)}"
        blob = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "state": nets_cpu,
            "mean": self.mean.cpu().tolist(),
            "std": self.std.cpu().tolist(),
            "model_id": mid,
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
        return mid

    # ------------------------------------------------------------------ inference
    @property
    def n_bits(self) -> int:
        return self.config.n_bits

    @property
    def hash_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.config.n_bits == 16 else np.uint32)

    def _prep(self, frames: np.ndarray) -> torch.Tensor:
        frames = np.asarray(frames, dtype=np.float32)
        if frames.ndim != 2 or frames.shape[1] != N_BINS:
            raise ValueError(f"frames must have shape (T, {N_BINS}), got {frames.shape}")
        x = torch.from_numpy(frames).to(self.device)
        return ((x - self.mean) / self.std).unsqueeze(0)

    @torch.inference_mode()
    def hash_activations(self, frames: np.ndarray, modality: Modality) -> np.ndarray:
        """(T, 48) frames → (T // 4, n_bits) float32 tanh activations."""
        if frames.shape[0] < HASH_DOWNSAMPLE:
            return np.zeros((0, self.n_bits), np.float32)
        out = self.nets[f"hash_{_check(modality)}"](self._prep(frames))
        return out[0].cpu().numpy()

    def hashes(self, frames: np.ndarray, modality: Modality) -> np.ndarray:
        """(T, 48) frames → (T // 4,) packed hash frames, uint16 or uint32 (bit i = unit i > 0)."""
        from model.bits import pack_bits

        act = self.hash_activations(frames, modality)
        if act.shape[0] == 0:
            return np.zeros(0, self.hash_dtype)
        return pack_bits(act)

    @torch.inference_mode()
    def embed(self, frames: np.ndarray, modality: Modality) -> np.ndarray:
        """(T, 48) frames (T ≥ 2) → one (embed_dim,) float32 embedding of the whole excerpt."""
        if frames.shape[0] < 2:
            raise ValueError("need at least 2 frames to embed")
        return self.nets[f"embed_{_check(modality)}"](self._prep(frames))[0].cpu().numpy()

    @torch.inference_mode()
    def embed_views(self, frames: np.ndarray, modality: Modality, parts: int) -> np.ndarray:
        """The query views of an excerpt: its embedding, then the embeddings of its ``parts``
        consecutive equal parts (:data:`QUERY_PARTS`), from one trunk pass.

        The prune scores a reference by the full view's distance plus the parts' mean distance
        (:class:`index.prune.EmbeddingPruner`). Parts shorter than one trunk step are replaced
        by the whole excerpt.

        Returns
        -------
        np.ndarray, shape (1 + parts, embed_dim), float32
            Row 0 is :meth:`embed` of ``frames``.
        """
        if parts < 0:
            raise ValueError(f"parts must be >= 0, got {parts}")
        if frames.shape[0] < 2:
            raise ValueError("need at least 2 frames to embed")
        net = self.nets[f"embed_{_check(modality)}"]
        h, scores = net.trunk(self._prep(frames))  # (1, n, D), (1, n)
        n = h.shape[1]
        pooled = [net.pool_head(h, scores)]
        for i in range(parts):
            a, b = i * n // parts, (i + 1) * n // parts
            pooled.append(net.pool_head(h[:, a:b], scores[:, a:b]) if b > a else pooled[0])
        return torch.cat(pooled).cpu().numpy()

    @torch.inference_mode()
    def window_embeddings(
        self, frames: np.ndarray, modality: Modality
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed overlapping windows of a whole piece.

        The convolutional trunk runs once over the piece; each window is then attention-pooled
        over its own slice, so the cost is one trunk pass plus a small head per window.

        Returns
        -------
        embeddings : np.ndarray (W, embed_dim) float32
        starts : np.ndarray (W,) int64, window start in CQT frames
        """
        n = frames.shape[0]
        if n < 2:
            raise ValueError("need at least 2 frames to embed")
        net = self.nets[f"embed_{_check(modality)}"]
        h, scores = net.trunk(self._prep(frames))  # (1, n//2, D), (1, n//2)
        starts = self.window.starts(n)
        half_len = max(1, min(self.window.length, n) // 2)
        idx = torch.as_tensor(starts // 2, device=self.device)[:, None] + torch.arange(
            half_len, device=self.device
        )
        idx = idx.clamp_(max=h.shape[1] - 1)
        emb = net.pool_head(h[0][idx], scores[0][idx])
        return emb.cpu().numpy(), starts


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has, or ``MidimatchError("bad_device")``
    naming what is wrong: not a device name, no CUDA (or MPS) here, or no such device index."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MidimatchError(f"unknown torch device {device!r}: use cpu, cuda, cuda:N or mps",
                             reason="bad_device") from None
    if dev.type == "meta":
        raise MidimatchError("the meta device holds no data: use cpu, cuda, cuda:N or mps",
                             reason="bad_device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MidimatchError(f"torch device {device!r}: no CUDA device is available on this "
                                 "machine (use cpu)", reason="bad_device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MidimatchError(f"torch device {device!r}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s), numbered from 0",
                                 reason="bad_device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MidimatchError(f"torch device {device!r}: MPS is not available on this machine "
                             "(use cpu)", reason="bad_device")
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # a backend torch was not built with, a driver error...
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MidimatchError(f"torch device {device!r} is not usable here: {why}",
                             reason="bad_device") from None
    return dev


def _build_nets(cfg: NetConfig) -> dict[str, torch.nn.Module]:
    return {
        "hash_audio": HashNet(cfg),
        "hash_midi": HashNet(cfg),
        "embed_audio": EmbedNet(cfg),
        "embed_midi": EmbedNet(cfg),
    }


def _digest(cfg: NetConfig, nets: dict[str, torch.nn.Module]) -> str:
    h = hashlib.sha256(repr(sorted(cfg.to_dict().items())).encode())
    for name in sorted(nets):
        for key, t in sorted(nets[name].state_dict().items()):
            h.update(name.encode() + key.encode())
            buf = io.BytesIO()
            np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
            h.update(buf.getvalue())
    return h.hexdigest()[:12]


def _check(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return modality
