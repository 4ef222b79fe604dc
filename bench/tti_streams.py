"""The streams of ``bench/time_to_identify.py``: which pieces, from where, rendered how (its
docstring says why)."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 22050
MIN_START_S = 5.0
LEAD_S = 1.0  # rendered before the stream starts (held notes, reverb)


def in_half(path: str, half: str) -> bool:
    """Whether a piece belongs to ``half``: "calib" (:func:`index.evaluation.evaluate.piece_half`
    0, the halves ``midimatch eval`` calibrates on), "test" (1) or "all"."""
    from index.evaluation.evaluate import piece_half

    return half == "all" or piece_half(path) == (0 if half == "calib" else 1)


def pick_pieces(collection: dict[str, Any], id_of_path: dict[str, str], n_in: int, n_out: int,
                seconds: float, seed: int, half: str = "all",
                starts: int = 1) -> list[dict[str, Any]]:
    """Draw the query pieces and their starts.

    Parameters
    ----------
    collection : dict
        ``collection.json`` of the evaluation set (``in_pieces``, ``out_pieces``).
    id_of_path : dict
        Indexed file path → its match id (sha256[:16]); an in-collection piece missing here
        is skipped.
    n_in, n_out : int
        Pieces wanted of each kind.
    seconds : float
        Stream length; a piece must hold ``MIN_START_S + seconds + 1`` s.
    seed : int
    half : str
        Only pieces of this half (:func:`in_half`).
    starts : int
        Streams per piece, each from its own random start.

    Returns
    -------
    list of dict
        ``path``, ``start_s`` (seconds into the MIDI), ``true_id`` (None out of collection).
    """
    from model.midi import load_midi

    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for kind, want in (("in_pieces", n_in), ("out_pieces", n_out)):
        got = 0
        for k in rng.permutation(len(collection[kind])):
            if got == want:
                break
            path = collection[kind][int(k)]["path"]
            if not in_half(path, half):
                continue
            true_id = id_of_path.get(path) if kind == "in_pieces" else None
            if kind == "in_pieces" and true_id is None:
                continue
            try:
                duration = float(load_midi(path).get_end_time())
            except Exception:  # noqa: BLE001 - an unreadable piece is just not drawn
                continue
            latest = duration - seconds - 1.0
            if latest < MIN_START_S:
                continue
            for _ in range(starts):
                out.append({"path": path, "true_id": true_id,
                            "start_s": round(float(rng.uniform(MIN_START_S, latest)), 3)})
            got += 1
    return out


def clean_audio(piece: dict[str, Any], seconds: float, cache_dir: Path,
                renderer: str = "timidity-freepats") -> np.ndarray | None:
    """The clean stream of one piece rendered by ``renderer``, shape (n,), float32 at
    22,050 Hz, cached; None if it cannot be rendered or comes out short."""
    from model.errors import MidimatchError
    from model.midi import load_midi
    from model.training.data_pair import excerpt
    from model.training.render import render

    # TiMidity's streams keep their old cache keys
    tag = "" if renderer == "timidity-freepats" else f"|{renderer}"
    key = hashlib.sha256(f"{piece['path']}|{piece['start_s']}|{seconds}{tag}".encode()
                         ).hexdigest()
    f = cache_dir / f"{key[:24]}.npy"
    if f.is_file():
        return np.load(f)
    pm = load_midi(piece["path"])
    cut_from = piece["start_s"] - LEAD_S
    notes = [n.start for inst in pm.instruments for n in inst.notes if n.start >= cut_from]
    if not notes:
        return None
    first = min(notes)  # excerpt() shifts this note to 0
    try:
        audio = render(excerpt(pm, cut_from, LEAD_S + seconds + 1.0), renderer,
                       sample_rate=SAMPLE_RATE)
    except (MidimatchError, OSError):
        return None
    offset = int(max(0.0, piece["start_s"] - first) * SAMPLE_RATE)
    clip = np.asarray(audio[offset:offset + int(seconds * SAMPLE_RATE)], np.float32)
    if clip.size < int(seconds * SAMPLE_RATE):
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(f, clip)
    return clip


def condition_audio(clean: np.ndarray, condition: str, path: str, seed: int) -> np.ndarray:
    """``clean`` under ``condition`` ("clean" or an :func:`model.training.augment.preset` name), the
    generator seeded by ``seed`` and the piece's path; shape (n,), float32."""
    from model.training.augment import augment_audio, preset

    if condition == "clean":
        return clean
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    return augment_audio(clean, SAMPLE_RATE, rng, preset(condition))[0].astype(np.float32)
