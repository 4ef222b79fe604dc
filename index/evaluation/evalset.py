"""The identification test set: which pieces are indexed, and query clips with known answers.

:func:`plan_collection` splits the cached MIDI (``midimatch data corpus|generate``) into

* the **index**: music21 works of the ``train`` and ``test`` splits
(:func:`model.training.data_pieces.split_of`)
  and generated songs with seeds below ``n_generated_index``;
* **in-collection query pieces**, all indexed and none trained on: music21 works of the
  ``test`` split and generated songs with seeds in ``[250, n_generated_index)`` (the shipped
  model trained on music21 ``train`` works, generated seeds 0–249 and training-only seeds from
  10,000 on, never on these);
* **out-of-collection query pieces**, left out of the index: music21 works of the ``valid``
  split and generated seeds from ``n_generated_index`` on.

Generated seeds from :data:`model.training.songgen_files.TRAINING_ONLY_SEED` on are training
data only and play no part here.

:func:`make_queries` renders every query piece with the held-out renderer (TiMidity + freepats,
never used in training), one render per tempo condition from a random start, and cuts clips of
each length from it, all starting at the same point. Tempo changes are applied to the MIDI before
rendering (:func:`model.training.augment_midi.change_tempo`), so the true position is known
exactly; it
is stored in the *reference's* time (seconds of the original MIDI). Room + noise and phone
conditions are audio effects on the clean render (:func:`model.training.augment.augment_audio`).

On disk (``out_dir``): ``pieces/<name>.npz`` (frames of every clip of one piece, float16) and
``queries.json`` (one record per clip). Per-piece files make the build resumable.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import MidimatchError
from model.training.songgen_files import TRAINED_SEEDS

FORMAT = "midimatch-evalset/1"
LEAD_S = 1.0  # music rendered before a clip starts, so held notes and reverb are sounding
TEMPO_CONDITIONS = {"tempo0.9": 0.9, "tempo1.1": 1.1}
AUDIO_CONDITIONS = {"clean": "clean", "room_noise": "room_noise", "phone": "phone"}


@dataclass(frozen=True)
class QuerySetConfig:
    """What :func:`make_queries` renders.

    ``conditions`` are names of ``AUDIO_CONDITIONS`` or ``TEMPO_CONDITIONS``; out-of-collection
    pieces get ``out_conditions`` (they only measure false confidence, tempo adds little there).
    """

    lengths_s: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0)
    conditions: tuple[str, ...] = ("clean", "room_noise", "tempo0.9", "tempo1.1")
    out_conditions: tuple[str, ...] = ("clean", "room_noise")
    renderer: str = "timidity-freepats"
    seed: int = 0

    def __post_init__(self) -> None:
        known = {*AUDIO_CONDITIONS, *TEMPO_CONDITIONS}
        for c in (*self.conditions, *self.out_conditions):
            if c not in known:
                raise MidimatchError(f"unknown condition {c!r}; known: {', '.join(sorted(known))}",
                                     reason="bad_condition")
        if not self.lengths_s or min(self.lengths_s) <= 0:
            raise MidimatchError("clip lengths must be positive seconds", reason="bad_length")

    @property
    def min_piece_s(self) -> float:
        """Shortest piece that holds the longest clip at the fastest tempo, plus the lead-in."""
        fastest = max([1.0, *(TEMPO_CONDITIONS[c] for c in self.conditions
                               if c in TEMPO_CONDITIONS)])
        return (max(self.lengths_s) + LEAD_S) * fastest + 1.0


@dataclass
class Plan:
    """Files of the index and the query pieces, each query piece with its provenance."""

    index_files: list[str]
    in_pieces: list[dict[str, Any]] = field(default_factory=list)
    out_pieces: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def plan_collection(corpus: str | Path, *, n_generated_index: int = 1000, n_in: int = 300,
                    n_out: int = 300, min_piece_s: float = 23.5, seed: int = 0) -> Plan:
    """Choose the indexed files and the query pieces (see the module docstring).

    Parameters
    ----------
    corpus : Path
        The cache root of ``midimatch data corpus|generate`` (``music21/`` and ``generated/``).
    n_generated_index : int
        Generated seeds ``0..n_generated_index-1`` are indexed; later seeds are out of collection.
    n_in, n_out : int
        Query pieces wanted; all music21 candidates are taken, generated songs fill the rest.
    min_piece_s : float
        Pieces shorter than this cannot hold the longest clip and are not queried.
    seed : int
        Which generated songs fill the query sets.

    Returns
    -------
    Plan
    """
    from model.training.corpus import corpus_midi_files, read_manifest
    from model.training.data_pieces import piece_key, split_of
    from model.training.songgen_files import TRAINING_ONLY_SEED, generated_midi_files, song_seed

    corpus = Path(corpus)
    durations = {r["midi"]: float(r.get("duration_s", 0.0))
                 for r in read_manifest(corpus).values() if r.get("status") == "done"}
    music21 = corpus_midi_files(corpus, unique=True)
    generated = [p for p in generated_midi_files(corpus) if song_seed(p) < TRAINING_ONLY_SEED]
    if not music21 and not generated:
        raise MidimatchError(f"no MIDI under {corpus}: run `midimatch data corpus` and "
                             "`midimatch data generate` first", reason="no_data")
    plan = Plan(index_files=[])
    m21_in, m21_out = [], []
    for path in music21:
        split = split_of(piece_key(path))
        rec = {"path": str(path), "source": "music21", "split": split,
               "duration_s": durations.get(path.name)}
        if split == "valid":
            m21_out.append(rec)
            continue
        plan.index_files.append(str(path))
        if split == "test":
            m21_in.append(rec)
    gen_in, gen_out = [], []
    for path in generated:
        seed_no = song_seed(path)
        rec = {"path": str(path), "source": "generated", "seed": seed_no,
               "split": "train" if seed_no < TRAINED_SEEDS else "unseen"}
        if seed_no < n_generated_index:
            plan.index_files.append(str(path))
            if seed_no >= TRAINED_SEEDS:
                gen_in.append(rec)
        else:
            gen_out.append(rec)
    rng = np.random.default_rng(seed)
    plan.in_pieces = _fill(m21_in, gen_in, n_in, min_piece_s, rng)
    plan.out_pieces = _fill(m21_out, gen_out, n_out, min_piece_s, rng)
    plan.notes = {"music21_test_candidates": len(m21_in), "music21_valid_candidates": len(m21_out),
                  "generated_in_candidates": len(gen_in), "generated_out_candidates": len(gen_out),
                  "min_piece_s": min_piece_s, "n_generated_index": n_generated_index}
    return plan


def _fill(music21: list[dict], generated: list[dict], n: int, min_s: float,
          rng: np.random.Generator) -> list[dict]:
    """All long-enough music21 pieces (up to ``n``), then random generated songs to ``n``."""
    from model.midi import load_notes

    def long_enough(rec: dict) -> bool:
        d = rec.get("duration_s")
        if d is None:
            try:
                d = rec["duration_s"] = float(load_notes(rec["path"]).end_s)
            except MidimatchError:
                return False
        return d >= min_s

    out = [r for r in music21 if long_enough(r)][:n]
    for i in rng.permutation(len(generated)):
        if len(out) >= n:
            break
        if long_enough(generated[i]):
            out.append(generated[i])
    return out


# ---------------------------------------------------------------------------- query clips
def _piece_name(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}__{p.stem}"


def clips_of_piece(piece: dict[str, Any], conditions: Sequence[str], cfg: QuerySetConfig
                   ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Render one piece under each condition and cut its clips.

    Returns
    -------
    records : list of dict
        Per clip: ``condition``, ``length_s``, ``start_s`` / ``end_s`` (true span in the
        reference's own time, seconds), ``tempo``, ``audio_aug``.
    frames : list of np.ndarray, shape (T, 48), float16
        CQT frames of each clip's audio.
    """
    from model.features import HOP, SAMPLE_RATE, audio_to_frames
    from model.midi import load_midi
    from model.training.augment import augment_audio, preset
    from model.training.augment_midi import change_tempo
    from model.training.data_pair import excerpt
    from model.training.render import render

    pm = load_midi(piece["path"])
    duration = float(pm.get_end_time())
    rng = np.random.default_rng([cfg.seed, zlib.crc32(piece["path"].encode())])
    longest = max(cfg.lengths_s)
    # the same start for any subset of conditions: bounded by the fastest tempo condition known
    fastest = max([1.0, *TEMPO_CONDITIONS.values()])
    latest = duration - (longest + LEAD_S) * fastest - 0.5
    if latest < 0:
        raise MidimatchError(f"{piece['path']}: {duration:.1f} s is too short for "
                             f"{longest:g} s clips", reason="too_short")
    start_ref = float(rng.uniform(LEAD_S * fastest, max(LEAD_S * fastest, latest)))
    renders: dict[float, tuple[np.ndarray, float]] = {}
    records, frames = [], []
    for cond in conditions:
        tempo = TEMPO_CONDITIONS.get(cond, 1.0)
        if tempo not in renders:
            played = pm if tempo == 1.0 else change_tempo(pm, tempo)
            # in the played (tempo-changed) timeline a reference time t is at t / tempo
            cut_from = start_ref / tempo - LEAD_S
            ex = excerpt(played, cut_from, LEAD_S + longest + 1.0)
            first = min(n.start for inst in played.instruments for n in inst.notes
                        if n.start >= cut_from)  # excerpt() shifts this note to 0
            renders[tempo] = (render(ex, cfg.renderer), first)
        audio, first = renders[tempo]
        offset_s = max(0.0, start_ref / tempo - first)  # clip start in the render
        aug: dict[str, Any] = {}
        if cond in AUDIO_CONDITIONS and cond != "clean":
            audio, aug = augment_audio(audio, SAMPLE_RATE, rng, preset(AUDIO_CONDITIONS[cond]))
        a = audio[int(offset_s * SAMPLE_RATE): int((offset_s + longest) * SAMPLE_RATE)]
        # One CQT of the longest clip; a shorter clip is a prefix of its frames, which is what
        # a live stream has after that long (the 132.5 ms look-ahead sees the audio that follows).
        full = audio_to_frames(a, SAMPLE_RATE)
        clip_start = (first + offset_s) * tempo
        for length in cfg.lengths_s:
            n = min(a.size, int(length * SAMPLE_RATE))
            if n < int(0.9 * length * SAMPLE_RATE):
                continue  # the piece ended early under this tempo
            records.append({"condition": cond, "length_s": float(length), "tempo": tempo,
                            "start_s": round(clip_start, 4),
                            "end_s": round(clip_start + n / SAMPLE_RATE * tempo, 4),
                            "audio_aug": sorted(aug)})
            frames.append(full[: 1 + n // HOP].astype(np.float16))
    return records, frames


def _piece_task(task: tuple[dict[str, Any], tuple[str, ...], QuerySetConfig, str]
                ) -> tuple[str, list[dict[str, Any]] | None, str | None]:
    piece, conditions, cfg, out_file = task
    try:
        records, frames = clips_of_piece(piece, conditions, cfg)
    except MidimatchError as e:
        return piece["path"], None, f"{e.reason}: {e.message}"[:300]
    tmp = Path(out_file).with_suffix(".tmp.npz")
    np.savez(tmp, **{f"clip{i}": f for i, f in enumerate(frames)})
    tmp.replace(out_file)
    Path(out_file).with_suffix(".json").write_text(json.dumps(records))
    return piece["path"], records, None


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def make_queries(plan: Plan, out_dir: str | Path, cfg: QuerySetConfig | None = None, *,
                 workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Render and cut every query piece of ``plan`` into ``out_dir`` (resumable).

    Parameters
    ----------
    workers : int
        Worker processes (spawned, one torch thread each); 0 renders in this process.

    Returns
    -------
    dict
        The written ``queries.json``: ``format``, ``config``, ``plan_notes``, ``queries``
        (records of :func:`clips_of_piece` plus ``piece``, ``kind`` ("in"/"out"), ``ref_path``,
        ``source``, ``split``, ``file``, ``key``) and ``skipped`` pieces with reasons.
    """
    from tqdm import tqdm

    cfg = cfg or QuerySetConfig()
    out_dir = Path(out_dir)
    (out_dir / "pieces").mkdir(parents=True, exist_ok=True)
    tasks, meta = [], {}
    for kind, pieces, conds in (("in", plan.in_pieces, cfg.conditions),
                                ("out", plan.out_pieces, cfg.out_conditions)):
        for piece in pieces:
            f = out_dir / "pieces" / f"{_piece_name(piece['path'])}.npz"
            meta[piece["path"]] = (kind, piece, f)
            if not (f.is_file() and f.with_suffix(".json").is_file()):
                tasks.append((piece, tuple(conds), cfg, str(f)))
    skipped = []
    if tasks and workers <= 0:  # in this process (tests, debugging)
        results = map(_piece_task, tasks)
        for path, _, err in tqdm(results, total=len(tasks), desc="query pieces",
                                 disable=not progress, unit="piece"):
            if err is not None:
                skipped.append({"path": path, "error": err})
    elif tasks:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as ex:
            results = ex.map(_piece_task, tasks, chunksize=1)
            for path, _, err in tqdm(results, total=len(tasks), desc="query pieces",
                                     disable=not progress, unit="piece"):
                if err is not None:
                    skipped.append({"path": path, "error": err})
    queries = []
    for path, (kind, piece, f) in meta.items():
        if not f.with_suffix(".json").is_file():
            continue
        for i, rec in enumerate(json.loads(f.with_suffix(".json").read_text())):
            queries.append({**rec, "piece": path, "kind": kind,
                            "ref_path": path if kind == "in" else None,
                            "source": piece["source"], "split": piece["split"],
                            "file": f.name, "key": f"clip{i}"})
    manifest = {"format": FORMAT, "config": asdict(cfg), "plan_notes": plan.notes,
                "queries": queries, "skipped": skipped}
    tmp = out_dir / "queries.json.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(out_dir / "queries.json")
    return manifest


def select_queries(queries: Sequence[dict[str, Any]], *, lengths: set[float] | None = None,
                   conditions: set[str] | None = None, max_pieces: int = 0) -> list[int]:
    """Indices of ``queries`` of these clip ``lengths`` and ``conditions`` (None or empty: all),
    from at most ``max_pieces`` pieces of each kind (0: all), the first ones in the set's order
    (so the same pieces in every renderer's set of one plan)."""
    keep = [i for i, q in enumerate(queries)
            if (not lengths or q["length_s"] in lengths)
            and (not conditions or q["condition"] in conditions)]
    if max_pieces:
        allowed: dict[str, set[str]] = {"in": set(), "out": set()}
        for i in keep:
            bucket = allowed[queries[i]["kind"]]
            if len(bucket) < max_pieces:
                bucket.add(queries[i]["piece"])
        keep = [i for i in keep if queries[i]["piece"] in allowed[queries[i]["kind"]]]
    return keep


def load_queries(out_dir: str | Path) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """The records of ``queries.json`` and each clip's frames, (T, 48) float32, in order; each
    record names its ``renderer`` (the set's, None when its manifest does not say)."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / "queries.json").read_text())
    except (OSError, ValueError) as e:
        raise MidimatchError(f"no query set at {out_dir} ({e}); run `midimatch eval prepare`",
                             reason="no_queries") from e
    if manifest.get("format") != FORMAT:
        raise MidimatchError(f"{out_dir}/queries.json is not {FORMAT}", reason="no_queries")
    frames, opened = [], {}
    renderer = manifest.get("config", {}).get("renderer")
    for q in manifest["queries"]:
        q.setdefault("renderer", renderer)
        if q["file"] not in opened:
            opened = {q["file"]: np.load(out_dir / "pieces" / q["file"])}
        frames.append(opened[q["file"]][q["key"]].astype(np.float32))
    return manifest["queries"], frames
