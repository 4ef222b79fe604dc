"""MIDI files → frame-aligned (audio, MIDI) training pairs in shards, split by piece, resumable.

Rendering and augmenting a collection takes tens of minutes to hours, so :func:`prepare` writes
its pairs once into ``<out_dir>/<split>/shard-NNNNN.npz``
(:func:`model.training.pairs.write_shard`), which training then reads many times. For each piece
and each of ``renders_per_piece`` random (renderer, augmentation) draws it makes one pair
(:func:`model.training.data_pair.make_pair`), in worker processes
(:mod:`model.training.data_pool`).

Splits are by piece (:func:`model.training.data_pieces.split_of`), so a piece and all its
renderings sit in one split, whatever the order of the files or the seed. ``train``, ``valid``
and ``test`` use the training renderers; ``test_heldout`` renders the test pieces once with the
held-out renderer, without any augmentation (evaluation adds its own conditions).

Resumable: ``manifest.json`` records each finished shard with a signature of its settings and
pieces; a rerun with the same settings skips those shards and does no work.

Sizing: the report's ``s_per_music_min`` is worker seconds per minute of a pair. Measured on a
2-core CPU box (2025-11): 0.9 s on one free core, 1.6 s with two workers beside another job;
646 pieces × 2 draws of ≤ 60 s (19 h of audio) took 19 min there.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model.errors import MidimatchError
from model.features import FRAME_RATE
from model.training.augment import preset
from model.training.data_pieces import SPLITS, piece_id, piece_key, split_of
from model.training.data_pool import run_tasks
from model.training.render import (
    HELD_OUT,
    TRAIN_RENDERERS,
    available,
    install_hint,
    resource,
    sf3_to_sf2,
)

MIN_TRAIN_RENDERERS = 2  # issue #3: at least two renderers; one soundfont is learnt, not music
HELDOUT_SPLIT = "test_heldout"
MANIFEST = "manifest.json"
FORMAT = "midimatch-prepare/1"


def training_renderers(renderers: Sequence[str] | None = None,
                       min_renderers: int | None = None) -> list[str]:
    """The installed ones of ``renderers`` (default :data:`model.training.render.TRAIN_RENDERERS`).

    Raises
    ------
    MidimatchError
        ``no_renderer`` when none is installed, ``too_few_renderers`` when fewer than
        ``min_renderers`` are (default: :data:`MIN_TRAIN_RENDERERS` for the default set, 1 for
        an explicit list); the message names the Debian packages to install.
    """
    wanted = list(TRAIN_RENDERERS if renderers is None else renderers)
    use = [r for r in wanted if available(r)]
    if not use:
        raise MidimatchError(f"none of the renderers {wanted} is installed "
                             f"({install_hint(wanted)})", reason="no_renderer")
    need = (MIN_TRAIN_RENDERERS if renderers is None else 1) if min_renderers is None \
        else min_renderers
    if len(use) < need:
        missing = [r for r in wanted if r not in use]
        raise MidimatchError(
            f"only {use} of the training renderers {wanted} are installed; the model must hear "
            f"at least {need} (one soundfont teaches it that soundfont): {install_hint(missing)}",
            reason="too_few_renderers")
    return use


def prepare(out_dir: str | Path, midi_files: Sequence[str | Path], *,
            renderers: Sequence[str] | None = None, heldout: str | None = None,
            min_renderers: int | None = None,
            renders_per_piece: int = 2, max_piece_s: float = 120.0, workers: int = 2,
            seed: int = 0, split: Sequence[float] = (0.8, 0.1, 0.1), progress: bool = True,
            pieces_per_shard: int = 100, min_frames: int = 100,
            piece_timeout_s: float = 300.0, render_timeout_s: float = 60.0,
            augment_preset: str = "train") -> dict[str, Any]:
    """Build ``<out_dir>/{train,valid,test,test_heldout}/shard-*.npz`` from MIDI files.

    Parameters
    ----------
    out_dir : str or Path
        Destination; also holds ``manifest.json`` and ``soundfonts/`` (decoded ``.sf3``).
    midi_files : sequence of paths
        The collection. Files with identical bytes are one piece.
    renderers : sequence of str, optional
        Training renderers (default :data:`model.training.render.TRAIN_RENDERERS`); missing ones are
        left out (listed in the report), none available raises ``no_renderer``.
    min_renderers : int, optional
        Fewer installed training renderers raise ``too_few_renderers`` with the packages to
        install. Default :data:`MIN_TRAIN_RENDERERS` (2) for the default set, 1 for a list
        given explicitly (tests, experiments).
    heldout : str, optional
        Renderer of ``test_heldout`` (default :data:`model.training.render.HELD_OUT`); the split is
        left out, with a note in the report, when it is not installed.
    renders_per_piece : int
        Draws per piece in train/valid/test (renderers without repeats while they last).
    max_piece_s : float
        Longest excerpt, seconds.
    workers : int
        Processes; 0 runs in this process.
    seed : int
        Draws of renderers, augmentations and excerpts (not the split, which is by content).
    split : (float, float, float)
        Fractions of pieces in train, valid, test.
    progress : bool
        Show a progress bar.
    pieces_per_shard : int
        Pieces per shard: the unit of resumption.
    min_frames : int
        Shorter pairs are skipped (``too_short``); training cuts 100-frame chunks.
    piece_timeout_s, render_timeout_s : float
        Bounds on one piece (all its draws) and on one renderer process.
    augment_preset : str
        The :func:`model.training.augment.preset` of train/valid/test ("train"; "train_noisy" draws
        a room and noise more often). ``test_heldout`` is never augmented.

    Returns
    -------
    dict
        ``splits``: per split ``pieces``, ``pairs``, ``frames``, ``hours``, ``by_renderer``;
        ``skipped`` (counts by reason) and ``skipped_pieces`` (records); ``shards_written``,
        ``shards_reused``; ``seconds``; ``s_per_music_min`` (median worker seconds per minute
        of a pair, overall and by renderer), ``renderers``, ``unavailable``.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    preset(augment_preset)  # an unknown name fails here, before any work
    wanted = list(TRAIN_RENDERERS if renderers is None else renderers)
    use = training_renderers(renderers, min_renderers)
    held = HELD_OUT if heldout is None else heldout
    unavailable = [r for r in [*wanted, held] if not available(r)]
    cache_dir = out / "soundfonts"
    for r in sorted({*use, held}):
        sf = resource(r) if available(r) else None
        if sf is not None and sf.suffix == ".sf3":  # once here, not once per worker
            sf3_to_sf2(sf, cache_dir / f"{sf.stem}.sf2")

    pieces: dict[str, Path] = {}
    for f in midi_files:
        pieces.setdefault(piece_key(f), Path(f))
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key in sorted(pieces):
        by_split[split_of(key, split)].append(key)
    plan = [(s, by_split[s], use, renders_per_piece, True) for s in SPLITS]
    if available(held):
        plan.append((HELDOUT_SPLIT, by_split["test"], [held], 1, False))

    manifest = _read_manifest(out)
    shards: dict[str, dict[str, Any]] = {}
    tasks: list[dict[str, Any]] = []
    for stream, (name, keys, rends, draws, augment) in enumerate(plan):
        for i in range(0, len(keys), pieces_per_shard):
            chunk, shard = keys[i:i + pieces_per_shard], f"{name}/shard-{i // pieces_per_shard:05d}"
            settings = [FORMAT, seed, rends, draws, augment, max_piece_s, min_frames, chunk]
            if augment and augment_preset != "train":  # "train" keeps the older signatures
                settings.append(augment_preset)
            sig = _signature(settings)
            old = manifest.get(shard, {})
            have = not old.get("pairs") or (out / f"{shard}.npz").exists()
            if old.get("signature") == sig and have:
                shards[shard] = {**old, "reused": True}
                continue
            shards[shard] = {"signature": sig, "split": name, "todo": len(chunk), "results": {}}
            tasks += [{"file": str(pieces[k]), "key": k, "id": piece_id(k), "shard": shard,
                       "seed": seed, "stream": stream, "stream_key": f"{shard}:{k}",
                       "renderers": list(rends), "draws": draws, "augment": augment,
                       "augment_preset": augment_preset,
                       "max_piece_s": max_piece_s, "min_frames": min_frames,
                       "piece_timeout_s": piece_timeout_s, "render_timeout_s": render_timeout_s,
                       "cache_dir": cache_dir} for k in chunk]
    for split_dir in (*SPLITS, HELDOUT_SPLIT):
        for f in (out / split_dir).glob("shard-*.npz"):  # training reads every shard there
            if "results" in shards.get(f"{split_dir}/{f.stem}", {"results": 0}):
                f.unlink()  # from other settings, or about to be redone
    manifest = {k: v for k, v in manifest.items() if k in shards and "results" not in v}

    bar = tqdm(total=len(tasks), disable=not progress, unit="piece", desc="prepare",
               smoothing=0.05)
    written = 0
    for task, result in run_tasks(tasks, workers):
        bar.update(1)
        sh = shards[task["shard"]]
        sh["results"][task["key"]] = (task["file"], result)
        if len(sh["results"]) == sh["todo"]:
            manifest[task["shard"]] = _write(out, task["shard"], sh)
            shards[task["shard"]] = manifest[task["shard"]]
            written += 1
            _write_manifest(out, manifest)
    bar.close()
    report = _report([shards[s] for s in sorted(shards)], [s for s, *_ in plan])
    report.update(shards_written=written, shards_reused=len(shards) - written,
                  seconds=round(time.perf_counter() - t_start, 1), renderers=use,
                  heldout=held if available(held) else None, unavailable=unavailable,
                  workers=workers, out_dir=str(out), augment_preset=augment_preset)
    return report


def _signature(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, default=str).encode()).hexdigest()[:16]


def _write(out: Path, shard: str, sh: dict[str, Any]) -> dict[str, Any]:
    """Write one finished shard; return its manifest record (no arrays)."""
    from model.training.pairs import write_shard

    audio, midi, ids, pairs, skipped = [], [], [], [], []
    for key in sorted(sh["results"]):
        file, result = sh["results"][key]
        for a, m, info in result["pairs"]:
            audio.append(a)
            midi.append(m)
            ids.append(piece_id(key))
            pairs.append({"key": key, "file": file, "frames": len(a), **info})
        skipped += [{"key": key, "file": file, **s} for s in result["skipped"]]
    if audio:
        write_shard(out / f"{shard}.npz", audio, midi, ids)
    return {"signature": sh["signature"], "split": sh["split"], "pieces": len(sh["results"]),
            "pairs": pairs, "skipped": skipped}


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: every shard is redone
        return {}
    return data.get("shards", {}) if data.get("format") == FORMAT else {}


def _write_manifest(out: Path, shards: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "shards": shards}, indent=1, default=str))
    tmp.replace(out / MANIFEST)


def _report(shards: list[dict[str, Any]], splits: list[str]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    rates: dict[str, list[float]] = {}
    skipped: list[dict[str, Any]] = []
    for name in splits:
        recs = [s for s in shards if s["split"] == name]
        pairs = [p for s in recs for p in s["pairs"]]
        frames = sum(p["frames"] for p in pairs)
        per[name] = {"pieces": sum(s["pieces"] for s in recs),
                     "pieces_with_pairs": len({p["key"] for p in pairs}), "pairs": len(pairs),
                     "frames": frames, "hours": round(frames / FRAME_RATE / 3600, 3),
                     "by_renderer": dict(Counter(p["renderer"] for p in pairs))}
        skipped += [{"split": name, **k} for s in recs for k in s["skipped"]]
        for p in pairs:
            if p.get("seconds") and p["music_s"] > 0:
                rates.setdefault(p["renderer"], []).append(p["seconds"] / (p["music_s"] / 60))
    every = [r for v in rates.values() for r in v]
    return {"splits": per, "skipped": dict(Counter(s["reason"] for s in skipped)),
            "skipped_pieces": skipped,
            "s_per_music_min": {"all": _median(every),
                                **{k: _median(v) for k, v in sorted(rates.items())}}}


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None
