"""Training pairs on disk: ``.npz`` shards of frame-aligned (audio, MIDI) features.

:func:`write_shard` writes one shard (what :func:`model.training.data.prepare` produces);
:class:`PairData` loads every shard of a split into one float32 array per modality, with the
pair offsets and piece ids that :class:`model.training.losses.PairSampler` draws from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.errors import MidimatchError
from model.nets import N_BINS

STD_FLOOR = 1e-3  # bins that never sound (e.g. the top octave of a bass-only set) stay finite


class DataError(MidimatchError):
    """Training shards that are missing, empty or inconsistent."""

    reason = "bad_data"


# ---------------------------------------------------------------------------------- data
def write_shard(path: str | Path, audio_list: Sequence[np.ndarray],
                midi_list: Sequence[np.ndarray], piece_ids: Sequence[int]) -> Path:
    """Write frame-aligned (audio, MIDI) feature pairs into one ``.npz`` shard, atomically.

    Parameters
    ----------
    path : str or Path
        Destination, normally ``<data_dir>/<split>/<name>.npz``.
    audio_list, midi_list : sequences of np.ndarray (T_i, 48)
        Frame i of ``audio_list[k]`` sounds what frame i of ``midi_list[k]`` plays.
    piece_ids : sequence of int
        Piece of each pair; renderings of one piece share an id (the split is by piece).

    Returns
    -------
    Path of the shard: arrays ``audio``/``midi`` (F, 48) float16, ``offsets`` (P+1,) int64,
    ``piece`` (P,) int64.
    """
    if not (len(audio_list) == len(midi_list) == len(piece_ids)) or not audio_list:
        raise ValueError("need the same, non-zero number of audio arrays, MIDI arrays and ids")
    for k, (a, m) in enumerate(zip(audio_list, midi_list, strict=True)):
        if a.ndim != 2 or a.shape[1] != N_BINS or a.shape != m.shape:
            raise ValueError(f"pair {k}: audio {a.shape} and midi {m.shape} must be equal (T, 48)")
    lengths = [len(a) for a in audio_list]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
        np.savez(fh, audio=np.concatenate(audio_list).astype(np.float16),
                 midi=np.concatenate(midi_list).astype(np.float16),
                 offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                 piece=np.asarray(piece_ids, dtype=np.int64))
    tmp.replace(path)
    return path


class PairData:
    """All pairs of a split in memory: one float32 array per modality, pairs back to back.

    Attributes
    ----------
    audio, midi : np.ndarray (F, 48) float32
    offsets : np.ndarray (P+1,) int64, pair p is frames ``offsets[p]:offsets[p+1]``
    piece : np.ndarray (P,) int64 piece id of each pair
    """

    def __init__(self, audio: np.ndarray, midi: np.ndarray, offsets: np.ndarray,
                 piece: np.ndarray) -> None:
        self.audio, self.midi = audio, midi
        self.offsets, self.piece = offsets, piece

    @classmethod
    def load(cls, data_dir: str | Path | Sequence[str | Path], split: str) -> PairData:
        """Load every ``<data_dir>/<split>/*.npz`` shard (sorted by name, folder by folder).

        ``data_dir`` may be several pairs folders (e.g. two ``train prepare`` runs with other
        seeds or renderers): their shards are read together. Piece ids are content hashes and
        splits are by piece, so the same piece in two folders is one piece in one split.
        Every folder must hold shards of ``split``.
        """
        dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
        if not dirs:
            raise DataError("no pairs folder given")
        paths: list[Path] = []
        for d in dirs:
            found = sorted((Path(d) / split).glob("*.npz"))
            if not found:
                raise DataError(f"no training shards in {Path(d) / split}")
            paths += found
        return cls.from_files(paths)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path]) -> PairData:
        # Two passes (offsets first) so the arrays are allocated once: no 2× peak from concat.
        metas = []
        for p in paths:
            try:
                with np.load(p) as z:
                    off, piece = z["offsets"].astype(np.int64), z["piece"].astype(np.int64)
            except (OSError, KeyError, ValueError) as e:
                raise DataError(f"cannot read shard {p}: {e}") from e
            if off[0] != 0 or np.any(np.diff(off) < 0) or len(piece) != len(off) - 1:
                raise DataError(f"shard {p}: inconsistent offsets/piece arrays")
            metas.append((p, off, piece))
        total = sum(int(off[-1]) for _, off, _ in metas)
        audio = np.empty((total, N_BINS), np.float32)
        midi = np.empty((total, N_BINS), np.float32)
        offsets, pieces, base = [np.zeros(1, np.int64)], [], 0
        for p, off, piece in metas:
            with np.load(p) as z:
                a, m = z["audio"], z["midi"]
                if a.shape != (off[-1], N_BINS) or m.shape != a.shape:
                    raise DataError(f"shard {p}: audio {a.shape} / midi {m.shape} do not match "
                                    f"offsets ({off[-1]} frames)")
                audio[base:base + len(a)], midi[base:base + len(a)] = a, m
            offsets.append(off[1:] + base)
            pieces.append(piece)
            base += int(off[-1])
        return cls(audio, midi, np.concatenate(offsets), np.concatenate(pieces))

    def __len__(self) -> int:
        return len(self.piece)

    @property
    def lengths(self) -> np.ndarray:
        """(P,) int64 frames per pair."""
        return np.diff(self.offsets)

    def bin_stats(self, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
        """Per-bin mean and std (48,) float32 over the audio and MIDI frames together."""
        s = np.zeros(N_BINS, np.float64)
        s2 = np.zeros(N_BINS, np.float64)
        for arr in (self.audio, self.midi):
            for i in range(0, len(arr), block):  # float64 sums in blocks: exact enough, no copy
                x = arr[i:i + block].astype(np.float64)
                s += x.sum(0)
                s2 += (x * x).sum(0)
        n = 2 * len(self.audio)
        mean = s / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
        return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)

    def summary(self) -> dict[str, int]:
        return {"pairs": len(self), "pieces": int(len(np.unique(self.piece))),
                "frames": int(self.offsets[-1])}


__all__ = ["STD_FLOOR", "DataError", "PairData", "write_shard"]
