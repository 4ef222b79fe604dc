"""Train the four networks of a model on aligned (audio, MIDI) feature pairs.

Two stages, as in the seed: DHS (hash nets, 100-frame chunks, loss per hash step) then PSE
(embed nets, query-length windows with the MIDI window shifted by up to half an index hop, since
live queries never sit on the index's window grid). Both use the contrastive loss of
:mod:`model.training.losses` with deranged negatives, RMSProp, and early stopping on the
Bhattacharyya
coefficient (BC) of the matching vs non-matching distance histograms of the validation split.

Checkpoints are written atomically at every validation; calling :func:`train` again with the same
``out_path`` resumes from the last one, with the same sampling stream (so on CPU a resumed run
equals an uninterrupted one). Budgets (``*_minutes``, ``max_batches``) are totals per stage across
resumes: rerunning with a larger budget continues a stage unless it stopped early.

Data: ``<data_dir>/{train,valid}/*.npz`` shards written by :func:`model.training.pairs.write_shard`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.encoder import Encoder, WindowSpec
from model.errors import MidimatchError
from model.nets import NetConfig
from model.training.losses import (
    EMBED_MARGIN,
    EMBED_RECALL_KS,
    EVAL_SEED,
    PairSampler,
    batch_nce,
    contrastive_loss,
    derangement,
    embed_bin_edges,
    embed_eval_set,
    embed_validation,
    evaluate_bc,
    hash_eval_set,
    hash_validation,
)
from model.training.pairs import DataError, PairData, write_shard

logger = logging.getLogger(__name__)
CKPT_FORMAT = "midimatch-train-ckpt/1"
STAGES = ("hash", "embed")


# ---------------------------------------------------------------------- hyper-parameters
@dataclass(frozen=True)
class StageParams:
    """Hyper-parameters of one stage (units: frames, batches).

    ``length`` is the chunk (DHS) or window (PSE) length; ``max_shift`` the largest MIDI window
    shift against the audio window (PSE only). ``rho`` is RMSProp's decay (torch's ``alpha``).
    Patience follows the seed: stop after ``patience`` batches, extended to ``batch + patience``
    whenever the validation score beats ``improve`` × the best so far. The score is the BC
    (``select="bc"``, the seed's) or, for the embedding, ``select="recall@k"``: 1 − the share
    of validation windows whose piece is among the k nearest
    (:func:`model.training.losses.piece_recall`), what the prune needs.
    """

    batch_size: int
    length: int
    lr: float
    rho: float
    alpha: float
    margin: float
    beta: float = 0.0
    max_shift: int = 0
    validate_every: int = 250
    patience: int = 2500
    improve: float = 0.99
    nce: float = 0.0  # weight of the in-batch InfoNCE term (model.training.losses.batch_nce)
    tau: float = 1.0  # its temperature, squared-distance units
    select: str = "bc"  # model selection: "bc" or (embedding) "recall@1" / "recall@3" / ...


def _score(v: dict, select: str) -> float:
    """The validation score a stage minimises (``select`` checked by :func:`train`)."""
    return float(v["bc"]) if select == "bc" else 1.0 - float(v[select])


def _history_entry(batch: int, v: dict, loss: float | None, minutes: float) -> dict[str, Any]:
    """One validation as the stage's history keeps it: the BC and any piece recall@k."""
    return {"batch": batch, "bc": v["bc"], "loss": loss, "minutes": minutes,
            **{k: x for k, x in v.items() if k.startswith("recall@")}}


def _check_select(kind: str, p: StageParams) -> None:
    allowed = ["bc"] + ([f"recall@{k}" for k in EMBED_RECALL_KS] if kind == "embed" else [])
    if p.select not in allowed:
        raise MidimatchError(f"{kind} stage: select must be one of {allowed}, got {p.select!r}",
                             reason="bad_argument")


def hash_params(config: NetConfig) -> StageParams:
    """DHS defaults: the thesis' α=5.33, β=0.05, batches of 50 chunks of 100 frames.

    The margin keeps the seed's hinge at a quarter of the bits (m=4 at 16 bits, whose squared
    distance 16 equals a Hamming distance of 4 between saturated outputs), i.e. m = √n_bits.
    The thesis' lr (1e-5) needs ~100k batches; a 25-minute CPU budget gives ~15k. Light tuning
    (music21 pieces × 2 soundfonts, 32 bits, ~600 batches): lr 1e-4 / 3e-4 / 1e-3 reached
    BC .36 / .30 / (.32 at 367 batches); 3e-4 is the steady middle.
    """
    return StageParams(batch_size=50, length=100, lr=3e-4, rho=0.9, alpha=5.33,
                       margin=float(np.sqrt(config.n_bits)), beta=0.05)


def embed_params(window: WindowSpec | None = None) -> StageParams:
    """PSE defaults: the thesis' α=3.34, a margin of 3; windows of the live query's length.

    Light tuning (as for :func:`hash_params`, 400–600 batches): lr 1e-4 kept improving (BC .63
    at 400), 3e-4 stalled (.68, then .72), 1e-3 saturated the tanh outputs (BC stuck at 1).
    The thesis' m=1.06 is small for our nets: at 600 batches, the share of validation queries
    whose match is nearer than every other piece's window was .11 (m=1.06), .43 (m=3),
    .43 (m=5), .42 (m=8); AUC .93 vs .98. BCs of different margins do not compare (the
    histogram range follows m), hence these scale-free figures.
    """
    w = window or WindowSpec()
    return StageParams(batch_size=20, length=w.length, lr=1e-4, rho=0.99, alpha=3.34,
                       margin=EMBED_MARGIN, max_shift=w.hop // 2, validate_every=500,
                       patience=5000)


# ------------------------------------------------------------------------------ training
def _pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _copy_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _run_stage(kind: str, f: torch.nn.Module, g: torch.nn.Module, data: PairData,
               p: StageParams, *, validate: Callable[[], dict], mean: torch.Tensor,
               std: torch.Tensor, seed: int, max_batches: int | None, budget_s: float,
               rec: dict | None, save: Callable[[dict], None], progress: bool) -> dict:
    """Train f (audio) and g (MIDI) until a limit or early stop; returns the stage record.

    The record (what the checkpoint holds for this stage) carries the live nets, optimizer and
    sampler state, the best nets so far, the validation history and the untrained/best
    histograms. ``rec`` given → resume from it.
    """
    dev = mean.device
    opt = torch.optim.RMSprop([*f.parameters(), *g.parameters()], lr=p.lr, alpha=p.rho,
                              eps=1e-6)
    sampler = PairSampler(data, kind, p.batch_size, p.length, p.max_shift,
                          np.random.default_rng([seed, STAGES.index(kind)]))
    if rec is None:
        v = validate()  # the untrained nets: the baseline every later BC is compared with
        rec = {"batch": 0, "elapsed_s": 0.0, "train_s": 0.0, "patience_end": p.patience,
               "stop": None, "best_batch": 0, "initial": v, "best_val": v,
               "history": [_history_entry(0, v, None, 0.0)],
               "best": {"audio": _copy_state(f), "midi": _copy_state(g)}}
    else:
        f.load_state_dict(rec["nets"]["audio"])
        g.load_state_dict(rec["nets"]["midi"])
        opt.load_state_dict(rec["opt"])
        sampler.load_state(rec["sampler"])
        logger.info("%s: resuming at batch %d", kind, rec["batch"])
    t_start = time.monotonic() - rec["elapsed_s"]
    losses: list[float] = []

    def checkpoint() -> None:
        if rec["history"][-1]["batch"] != rec["batch"]:
            v = validate()
            rec["history"].append(_history_entry(
                rec["batch"], v, float(np.mean(losses)) if losses else None,
                (time.monotonic() - t_start) / 60))
            losses.clear()
            score, best = _score(v, p.select), _score(rec["best_val"], p.select)
            if score < best:
                if score < p.improve * best:
                    rec["patience_end"] = max(rec["patience_end"], rec["batch"] + p.patience)
                rec.update(best_batch=rec["batch"], best_val=v,
                           best={"audio": _copy_state(f), "midi": _copy_state(g)})
        rec.update(elapsed_s=time.monotonic() - t_start, sampler=sampler.state(),
                   nets={"audio": _copy_state(f), "midi": _copy_state(g)},
                   opt=copy.deepcopy(opt.state_dict()))
        save(rec)

    def stop_reason() -> str | None:
        if rec["stop"] == "early_stop" or rec["batch"] >= rec["patience_end"]:
            return "early_stop"
        if max_batches is not None and rec["batch"] >= max_batches:
            return "max_batches"
        return "budget" if time.monotonic() - t_start >= budget_s else None

    f.train()
    g.train()
    bar = tqdm(total=max_batches, initial=rec["batch"], desc=kind, unit="batch",
               disable=not progress, dynamic_ncols=True)
    ema = None
    while (reason := stop_reason()) is None:
        t0 = time.perf_counter()
        a_idx, m_idx, pieces = sampler.next_batch()
        xa = torch.from_numpy(sampler.gather(a_idx, "audio")).to(dev, non_blocking=True)
        xm = torch.from_numpy(sampler.gather(m_idx, "midi")).to(dev, non_blocking=True)
        fa, gm = f((xa - mean) / std), g((xm - mean) / std)
        perm = torch.from_numpy(derangement(len(pieces), sampler.rng, pieces)).to(dev)
        loss = contrastive_loss(fa, gm, fa, gm[perm], alpha=p.alpha, margin=p.margin,
                                beta=p.beta)
        if p.nce:
            loss = loss + p.nce * batch_nce(fa, gm, torch.from_numpy(pieces).to(dev), p.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not np.isfinite(value):
            raise MidimatchError(f"{kind} training diverged at batch {rec['batch'] + 1} "
                                 f"(loss {value}); lower the learning rate", reason="diverged")
        rec["batch"] += 1
        rec["train_s"] += time.perf_counter() - t0
        losses.append(value)
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.update(1)
        left_min = (budget_s - time.monotonic() + t_start) / 60
        bar.set_postfix(loss=f"{ema:.3f}", bc=f"{rec['history'][-1]['bc']:.3f}",
                        left=f"{left_min:.1f}min", refresh=False)
        if rec["batch"] % p.validate_every == 0:
            checkpoint()
    bar.close()
    rec["stop"] = reason
    checkpoint()  # validates the last batches too, so the best state considers them
    return rec


def _save_stage(ckpt: dict, path: Path, kind: str, rec: dict) -> None:
    """Store one stage's record in the checkpoint and write it atomically."""
    ckpt["stages"][kind] = rec
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, identity: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise MidimatchError(f"cannot read checkpoint {path} ({e}); delete it to start over",
                             reason="bad_checkpoint") from e
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise MidimatchError(f"{path} is not a {CKPT_FORMAT} file", reason="bad_checkpoint")
    diff = sorted(k for k in identity.keys() | blob["identity"].keys()
                  if identity.get(k) != blob["identity"].get(k))
    if diff:
        raise MidimatchError(f"checkpoint {path} was made with a different {', '.join(diff)}; "
                             "delete it or choose another output path",
                             reason="checkpoint_mismatch")
    return blob


# ------------------------------------------------------------------------------ entry point
def train(data_dir: str | Path | Sequence[str | Path], out_path: str | Path, *,
          config: NetConfig | None = None,
          hash_minutes: float = 25.0, embed_minutes: float = 25.0, seed: int = 0,
          device: str | torch.device = "auto", hash_stage: StageParams | None = None,
          embed_stage: StageParams | None = None, max_batches: int | None = None,
          max_valid_items: int = 1024, checkpoint_path: str | Path | None = None,
          num_threads: int | None = None, progress: bool = True,
          plots: bool = True, init: str | Path | None = None) -> dict[str, Any]:
    """Train a model (DHS, then PSE) and write it with :meth:`Encoder.save`.

    Parameters
    ----------
    data_dir : shards in ``<data_dir>/train`` and ``<data_dir>/valid`` (see :func:`write_shard`);
        several folders are read together (:meth:`PairData.load`).
    out_path : the weights file; ``<stem>.train.json`` (report), ``<stem>.hist.png``,
        ``<stem>.curves.png`` and the checkpoint ``<stem>.ckpt`` go beside it.
    config : network sizes (default: the init's, else ``NetConfig()``).
    hash_minutes, embed_minutes : wall-clock budget of each stage, validations included,
        totalled across resumes. 0 skips a stage (its nets stay untrained).
    seed : seeds torch (initial weights: those of ``Encoder.untrained(seed)``), numpy and random.
    device : "auto" (CUDA when present), "cpu", "cuda", ...
    hash_stage, embed_stage : hyper-parameters (default :func:`hash_params`, :func:`embed_params`).
    max_batches : cap on the batches of each stage (total across resumes), e.g. for tests.
    max_valid_items : validation excerpts per stage.
    num_threads : CPU threads while training (default: all cores); restored afterwards.
    init : start from this saved model (its nets and its input mean/std) instead of untrained
        nets: a stage given 0 minutes then keeps the init's nets, so ``hash_minutes=0`` with an
        embedding budget fine-tunes only the embedding (a ``config`` given must be the init's).

    Returns
    -------
    dict, the report also written as JSON: model id, BCs untrained vs trained, batches,
    minutes, batches/s, validation history and histograms per stage, file paths.
    """
    threads = torch.get_num_threads()
    dev = _pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
    try:
        return _train(data_dir, Path(out_path), config, dev, hash_minutes,
                      embed_minutes, seed, hash_stage, embed_stage, max_batches,
                      max_valid_items, checkpoint_path, progress, plots, init)
    finally:  # a library call must not leave the process' thread count changed
        torch.set_num_threads(threads)


def _train(data_dir: str | Path | Sequence[str | Path], out_path: Path,
           config: NetConfig | None, dev: torch.device,
           hash_minutes: float, embed_minutes: float, seed: int, hash_stage: StageParams | None,
           embed_stage: StageParams | None, max_batches: int | None, max_valid_items: int,
           checkpoint_path: str | Path | None, progress: bool, plots: bool,
           init: str | Path | None) -> dict[str, Any]:
    start = Encoder.load(init) if init is not None else None
    if start is not None and config is not None and start.config != config:
        raise MidimatchError(f"{init} has network config {start.config.to_dict()}, not "
                             f"{config.to_dict()}", reason="bad_argument")
    cfg = config or (start.config if start is not None else NetConfig())
    window = WindowSpec()
    hp = hash_stage or hash_params(cfg)
    ep = embed_stage or embed_params(window)
    _check_select("hash", hp)  # a bad choice fails now, not after loading data or an hour
    _check_select("embed", ep)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stem = out_path.with_suffix("")
    ckpt_path = Path(checkpoint_path) if checkpoint_path else Path(f"{stem}.ckpt")
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    train_data, valid = PairData.load(data_dir, "train"), PairData.load(data_dir, "valid")
    identity = {"config": cfg.to_dict(), "seed": seed, "hash": asdict(hp), "embed": asdict(ep),
                "train": train_data.summary(), "valid": valid.summary(),
                "max_valid_items": max_valid_items}
    if start is not None:
        identity["init"] = start.model_id
    ckpt = _load_checkpoint(ckpt_path, identity)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    nets = {k: v.to(dev) for k, v in (start or Encoder.untrained(seed, cfg)).nets.items()}
    if ckpt is None:
        # a fine-tune keeps the init's input statistics: its other nets were trained on them
        mean, std = (start.mean.cpu().numpy(), start.std.cpu().numpy()) if start is not None \
            else train_data.bin_stats()
        ckpt = {"format": CKPT_FORMAT, "identity": identity, "mean": torch.from_numpy(mean),
                "std": torch.from_numpy(std), "stages": {}}
    mean_t, std_t = ckpt["mean"].to(dev), ckpt["std"].to(dev)
    try:  # fail on unusable data now, not after a 25-minute first stage
        for kind, p in (("hash", hp), ("embed", ep)):
            items = PairSampler(train_data, kind, p.batch_size, p.length, 0,
                                np.random.default_rng(0)).epoch_items()
            if len(items) < p.batch_size:
                raise ValueError(f"the training split has fewer than a {kind} batch of "
                                 f"{p.batch_size} excerpts of {p.length} frames")
        validators = {
            "hash": partial(hash_validation, es=hash_eval_set(
                valid, hp.length, max_items=max_valid_items, seed=EVAL_SEED),
                mean=mean_t, std=std_t, n_bits=cfg.n_bits),
            "embed": partial(embed_validation, es=embed_eval_set(
                valid, replace(window, length=ep.length, hop=max(1, 2 * ep.max_shift)),
                max_items=max_valid_items, seed=EVAL_SEED),
                mean=mean_t, std=std_t, edges=embed_bin_edges(ep.margin)),
        }
    except ValueError as e:
        where = data_dir if isinstance(data_dir, (str, Path)) else ", ".join(map(str, data_dir))
        raise DataError(f"{where}: {e}") from e
    for kind, p, minutes in (("hash", hp, hash_minutes), ("embed", ep, embed_minutes)):
        f, g = nets[f"{kind}_audio"], nets[f"{kind}_midi"]
        rec = _run_stage(kind, f, g, train_data, p, validate=partial(validators[kind], f, g),
                         mean=mean_t, std=std_t, seed=seed, max_batches=max_batches,
                         budget_s=60.0 * minutes, rec=ckpt["stages"].get(kind),
                         save=partial(_save_stage, ckpt, ckpt_path, kind), progress=progress)
        f.load_state_dict(rec["best"]["audio"])
        g.load_state_dict(rec["best"]["midi"])
    enc = Encoder(cfg, nets, ckpt["mean"].numpy(), ckpt["std"].numpy(), "pending", device=dev)
    enc.model_id = enc.save(out_path)
    files = {"weights": out_path, "report": f"{stem}.train.json", "checkpoint": ckpt_path,
             "histograms_png": f"{stem}.hist.png", "curves_png": f"{stem}.curves.png"}
    report = {"model_id": enc.model_id, "config": cfg.to_dict(), "seed": seed,
              "init": None if start is None else {"path": str(init), "model_id": start.model_id},
              "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "data": {"train": identity["train"], "valid": identity["valid"]},
              "mean": ckpt["mean"].tolist(), "std": ckpt["std"].tolist(),
              **{k: _stage_summary(ckpt["stages"][k], p) for k, p in (("hash", hp), ("embed", ep))},
              "files": {k: str(v) for k, v in files.items()}}
    if plots:
        _plot(report, Path(files["histograms_png"]), Path(files["curves_png"]))
    tmp = Path(f"{files['report']}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(files["report"])
    return report


def _stage_summary(rec: dict, p: StageParams) -> dict[str, Any]:
    return {"params": asdict(p), "batches": rec["batch"], "minutes": rec["elapsed_s"] / 60,
            "batches_per_s": rec["batch"] / rec["train_s"] if rec["train_s"] else None,
            "stop": rec["stop"], "initial_bc": rec["initial"]["bc"],
            "best_bc": rec["best_val"]["bc"], "select": p.select,
            "best_score": _score(rec["best_val"], p.select), "best_batch": rec["best_batch"],
            "history": rec["history"],
            "histograms": {"untrained": rec["initial"], "trained": rec["best_val"]}}


def _plot(report: dict, hist_path: Path, curves_path: Path) -> None:
    """Matching vs non-matching histograms (untrained, trained) and validation curves."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    for row, (kind, xlabel) in enumerate((("hash", "Hamming distance"),
                                          ("embed", "squared embedding distance "
                                                    "(last bin: and beyond)"))):
        for col, when in enumerate(("untrained", "trained")):
            h, ax = report[kind]["histograms"][when], axes[row, col]
            for key, label in (("match", "matching"), ("nonmatch", "non-matching")):
                c = np.asarray(h[key], np.float64)
                ax.stairs(c / max(c.sum(), 1.0), h["edges"], fill=True, alpha=0.5, label=label)
            ax.set(title=f"{kind}, {when}: BC {h['bc']:.3f}", xlabel=xlabel, ylabel="fraction")
    axes[0, 0].legend()
    fig.savefig(hist_path, dpi=100)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_bc, ax_loss = fig.subplots(1, 2)
    for kind in STAGES:
        hist = report[kind]["history"]
        ax_bc.plot([h["batch"] for h in hist], [h["bc"] for h in hist], marker=".", label=kind)
        pts = [(h["batch"], h["loss"]) for h in hist if h["loss"] is not None]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker=".", label=kind)
    ax_bc.set(xlabel="batch", ylabel="validation BC (lower is better)")
    ax_loss.set(xlabel="batch", ylabel="training loss (mean since last validation)")
    ax_bc.legend()
    ax_loss.legend()
    fig.savefig(curves_path, dpi=100)


__all__ = ["PairData", "StageParams", "embed_params", "evaluate_bc", "hash_params", "train",
           "write_shard"]
