"""Calibration: the confidence threshold a model's answers are decided with, and where it is kept.

A search returns a ranking with confidences in [0, 1] (:mod:`index.search`). Calibration
(:func:`calibrate`) picks the threshold from scored queries whose answer is known: the smallest
threshold at which at most ``max_false_rate`` (1 %) of the out-of-collection queries are
confident, and reports the recall (in-collection queries that are confident *and* right) at that
point. Streams get their own threshold, fitted on whole streams
(:func:`index.decision.calibrate_stream`).

Calibrations are stored as JSON keyed by ``model_id`` (a threshold means nothing for another
model); :func:`load_calibration` reads ``model/weights/default.calibration.json`` unless told
otherwise and falls back to Raffel's c >= 0.5 for a model it has no entry for, with a warning
(:func:`uncalibrated_warning`) that the worker also shows in ``/readyz``.

Each calibration records its :class:`Provenance`: for the single-query threshold
(``midimatch eval --save-calibration``) and the stream threshold (``bench/time_to_identify.py
--save-calibration``), the renderers the audio came from, its conditions, how many in- and
out-of-collection queries or streams, the index size, the date and the command (:class:`Fit`).
A file saved before provenance was recorded loads with every part unknown. The worker's
heartbeat carries it to ``/readyz`` (:func:`describe`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from index.calibration_provenance import Fit, Provenance, describe
from model.errors import MidimatchError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CALIBRATION_PATH",
    "Calibration",
    "Fit",
    "Provenance",
    "calibrate",
    "check_calibration_file",
    "describe",
    "load_calibration",
    "min_outsiders",
    "save_calibration",
    "threshold_above",
    "uncalibrated_warning",
]

DEFAULT_CALIBRATION_PATH = (
    Path(__file__).resolve().parent.parent / "model" / "weights" / "default.calibration.json"
)
FORMAT = "midimatch-calibration/1"
DEFAULT_THRESHOLD = 0.5  # Raffel's c >= 0.5, set on 30 s clips: only a fallback here
DEFAULT_STABLE_RESULTS = 3
DEFAULT_MAX_FALSE_RATE = 0.01


@dataclass(frozen=True)
class Calibration:
    """A decision threshold for one model, and how it was obtained.

    Attributes
    ----------
    model_id : str
        The model the confidences came from.
    threshold : float
        A top match with ``confidence >= threshold`` is confident.
    stable_results : int
        Consecutive stream results with the same confident top-1 needed to identify.
    max_false_rate : float
        The out-of-collection rate the threshold was chosen for.
    false_rate, recall : float or None
        Measured at ``threshold`` on the calibration data (None for the uncalibrated default):
        the fraction of out-of-collection queries that were confident, and of in-collection
        queries that were confident with the right top-1.
    n_in, n_out : int
        Calibration queries in and out of the collection.
    source : str
        What data (set, query length, renderer) produced it.
    created_utc : str
    stream_threshold : float or None
        The threshold of :class:`StreamDecision` (None: ``threshold``), from
        :func:`calibrate_stream`.
    stream : dict
        How ``stream_threshold`` and ``stable_results`` were obtained: the figures measured at
        them on the calibration streams (``false_rate``, ``identified``, ``median_s``, ...).
    keep_step : bool
        Streams also require the top match's position to keep step with the stream
        (:func:`keeps_step`) across the ``stable_results`` results.
    provenance : Provenance
        How the thresholds were fitted (unknown for a file saved before it was recorded).
    evidence_threshold : float or None
        The evidence a stream's top match needs to be decided by
        :class:`index.evidence.EvidenceDecision`, fitted on whole streams by
        :func:`index.evidence.calibrate_evidence` (None, as in a file written before it: streams
        are decided by :class:`StreamDecision` with ``stream_threshold``).
    """

    model_id: str
    threshold: float = DEFAULT_THRESHOLD
    stable_results: int = DEFAULT_STABLE_RESULTS
    max_false_rate: float = DEFAULT_MAX_FALSE_RATE
    false_rate: float | None = None
    recall: float | None = None
    n_in: int = 0
    n_out: int = 0
    source: str = "uncalibrated default (Raffel's c >= 0.5)"
    created_utc: str = ""
    stream_threshold: float | None = None
    stream: dict = field(default_factory=dict)
    keep_step: bool = False
    provenance: Provenance = field(default_factory=Provenance)
    evidence_threshold: float | None = None

    def __post_init__(self) -> None:
        for name in ("threshold", "stream_threshold"):
            t = getattr(self, name)
            if t is not None and not (0.0 <= t <= 1.0 or t == math.inf):
                raise ValueError(f"{name} must lie in [0, 1] (or be inf), got {t}")
        if self.evidence_threshold is not None and not self.evidence_threshold >= 0.0:
            raise ValueError(f"evidence_threshold must be >= 0, got {self.evidence_threshold}")
        if self.stable_results < 1:
            raise ValueError(f"stable_results must be >= 1, got {self.stable_results}")

    @property
    def evidence_shape(self) -> dict | None:
        """The evidence rule's shape its threshold was fitted with, as stored
        (``stream["evidence"]["params"]``; None when none was recorded):
        :func:`index.evidence.params_of` reads it into the rule's parameters."""
        return (self.stream.get("evidence") or {}).get("params") or None

    @property
    def calibrated(self) -> bool:
        """Whether the threshold was fitted on this model's outsiders (not the 0.5 default)."""
        return self.n_out > 0

    def is_confident(self, confidence: float) -> bool:
        """True when ``confidence`` reaches the (single-query) threshold."""
        return confidence >= self.threshold

    @property
    def stream_cut(self) -> float:
        """The threshold streams decide with."""
        return self.threshold if self.stream_threshold is None else self.stream_threshold

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("threshold", "stream_threshold", "evidence_threshold"):
            if d[name] == math.inf:  # JSON has no infinity
                d[name] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for name in ("threshold", "stream_threshold", "evidence_threshold"):
            if d.get(name) == "inf":
                d[name] = math.inf
        d["provenance"] = Provenance.from_dict(d.get("provenance"))
        return cls(**d)

    def with_fit(self, part: str, fit: Fit) -> Calibration:
        """This calibration with ``part`` (``queries`` or ``streams``) of its provenance set."""
        if part not in ("queries", "streams"):
            raise ValueError(f"part must be 'queries' or 'streams', got {part!r}")
        return replace(self, provenance=replace(self.provenance, **{part: fit}))


def calibrate(
    in_confidence: Sequence[float] | np.ndarray,
    out_confidence: Sequence[float] | np.ndarray,
    *,
    model_id: str,
    in_correct: Sequence[bool] | np.ndarray | None = None,
    max_false_rate: float = DEFAULT_MAX_FALSE_RATE,
    stable_results: int = DEFAULT_STABLE_RESULTS,
    source: str = "",
    fit: Fit | None = None,
) -> Calibration:
    """Choose the confidence threshold from scored queries.

    Parameters
    ----------
    in_confidence : array-like, shape (N_in,)
        Top-1 confidence of queries whose piece is in the collection.
    out_confidence : array-like, shape (N_out,), N_out >= 1
        Top-1 confidence of queries whose piece is not.
    model_id : str
    in_correct : array-like of bool, shape (N_in,), optional
        Whether each in-collection query's top-1 was the right piece (all right if omitted);
        a confident wrong answer does not count towards recall.
    max_false_rate : float
        Allowed fraction of out-of-collection queries at or above the threshold.
    stable_results : int
        Stored with the calibration for :class:`StreamDecision`.
    source : str
        A description of the data, stored with the calibration.
    fit : Fit, optional
        What the queries were (renderers, index size, command...): the provenance's
        ``queries``; its ``n_in``/``n_out`` are set from the confidences given.

    Returns
    -------
    Calibration
        The smallest threshold with ``false_rate <= max_false_rate``, and the recall there.
        When even the largest out-of-collection confidence must be excluded, the threshold is
        the next float above it; when that is above 1, the threshold is ``inf`` (never
        confident) and recall is 0.
    """
    cin = _as_conf(in_confidence, "in_confidence")
    cout = _as_conf(out_confidence, "out_confidence")
    if cout.size == 0:
        raise ValueError("calibration needs at least one out-of-collection query")
    if not 0.0 <= max_false_rate < 1.0:
        raise ValueError(f"max_false_rate must lie in [0, 1), got {max_false_rate}")
    correct = np.ones(cin.shape, bool) if in_correct is None else np.asarray(in_correct, bool)
    if correct.shape != cin.shape:
        raise ValueError(f"in_correct has shape {correct.shape}, in_confidence {cin.shape}")
    threshold = threshold_above(cout, max_false_rate)
    false_rate = float(np.mean(cout >= threshold))
    recall = float(np.mean((cin >= threshold) & correct)) if cin.size else 0.0
    return Calibration(
        model_id=model_id, threshold=threshold, stable_results=stable_results,
        max_false_rate=max_false_rate, false_rate=false_rate, recall=recall,
        n_in=int(cin.size), n_out=int(cout.size), source=source,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        provenance=Provenance(queries=replace(fit or Fit.now(), n_in=int(cin.size),
                                              n_out=int(cout.size))),
    )


def min_outsiders(max_false_rate: float = DEFAULT_MAX_FALSE_RATE) -> int:
    """The fewest out-of-collection queries a threshold can bound ``max_false_rate`` with:
    ``1 / max_false_rate`` (100 at 1 %).

    With fewer, ``floor(max_false_rate * n)`` is 0: no outsider may be confident, so the threshold
    lands just above the highest outsider's confidence, a fact about that sample and no bound on
    the rate (one outsider at confidence 0 gave a threshold of 5e-324: every query identified).
    :func:`calibrate` still fits such a threshold; ``midimatch eval --save-calibration`` refuses
    to save it unless told to.
    """
    if not 0.0 < max_false_rate < 1.0:
        raise ValueError(f"max_false_rate must lie in (0, 1) to be bounded, got {max_false_rate}")
    return math.ceil(1.0 / max_false_rate - 1e-9)


def threshold_above(out_values: Sequence[float], max_false_rate: float,
                    upper: float = 1.0) -> float:
    """The lowest threshold at which at most ``max_false_rate`` of ``out_values`` (outsiders'
    confidences in [0, ``upper``], or any non-negative score with ``upper=inf``) reach it: just
    above the ``allowed``-th highest value, so that it and its ties do not; 0 when every value
    may pass, ``inf`` when none may (above ``upper``)."""
    allowed = int(math.floor(max_false_rate * len(out_values) + 1e-9))
    desc = np.sort(np.asarray(out_values, np.float64))[::-1]
    if allowed >= desc.size:
        return 0.0
    threshold = float(np.nextafter(max(desc[allowed], 0.0), np.inf))
    return math.inf if threshold > upper else threshold


CALIBRATE_HINT = ("calibrate it: `midimatch eval prepare`, then `midimatch eval --lengths 10 "
                  "--save-calibration model/weights/default.calibration.json` (docs/evaluation.md)")


def uncalibrated_warning(calibration: Calibration) -> str | None:
    """What to tell an operator when ``calibration`` is the uncalibrated default; else None."""
    if calibration.calibrated:
        return None
    return (f"model {calibration.model_id} is not calibrated: decisions use the default "
            f"threshold {calibration.threshold} (Raffel's, set on 30 s clips, not on this model), "
            f"so 'identified' is not bounded at 1 % false decisions; {CALIBRATE_HINT}")


def load_calibration(model_id: str, path: str | Path | None = None) -> Calibration:
    """The stored calibration of ``model_id``, or the uncalibrated default (logged as a warning,
    see :func:`uncalibrated_warning`).

    Parameters
    ----------
    model_id : str
    path : str or Path, optional
        A calibration file; ``DEFAULT_CALIBRATION_PATH`` when omitted. A missing default file, or
        no entry for ``model_id`` in it, gives ``Calibration(model_id)`` (threshold 0.5); an
        explicitly named file must exist and hold the model.

    Raises
    ------
    MidimatchError
        ``bad_calibration``: an unreadable file, or a named file without this model.
    """
    explicit = path is not None
    p = Path(path) if explicit else DEFAULT_CALIBRATION_PATH
    if not p.is_file():
        if explicit:
            raise MidimatchError(f"no calibration file {p}", reason="bad_calibration")
        return _uncalibrated(model_id, f"{p} does not exist")
    models = _read(p)
    if model_id not in models:
        if explicit:
            raise MidimatchError(f"{p} holds no calibration for model {model_id!r} "
                                 f"(it has {sorted(models)})", reason="bad_calibration")
        return _uncalibrated(model_id, f"{p} has no entry for it")
    try:
        return Calibration.from_dict(dict(models[model_id], model_id=model_id))
    except (TypeError, ValueError) as e:
        raise MidimatchError(f"{p}: bad calibration for {model_id!r}: {e}",
                             reason="bad_calibration") from e


def _uncalibrated(model_id: str, why: str) -> Calibration:
    cal = Calibration(model_id=model_id)
    logger.warning("%s (%s)", uncalibrated_warning(cal), why)
    return cal


def save_calibration(calibration: Calibration, path: str | Path | None = None) -> Path:
    """Store ``calibration`` under its model id (other models' entries are kept), atomically."""
    p = Path(path) if path is not None else DEFAULT_CALIBRATION_PATH
    models = _read(p) if p.is_file() else {}
    models[calibration.model_id] = calibration.to_dict()
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "models": models}, indent=2, sort_keys=True)
                   + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def check_calibration_file(path: str | Path) -> Path:
    """``path`` as :func:`save_calibration` will write it: its folder exists and, when the file
    exists, it is a calibration file (whose other models' entries are kept). Lets a command fail
    before its run rather than after it.

    Raises
    ------
    MidimatchError
        ``bad_calibration``.
    """
    p = Path(path)
    if p.is_dir():
        raise MidimatchError(f"{p} is a folder: name the calibration file to write",
                             reason="bad_calibration")
    if not p.parent.is_dir():
        raise MidimatchError(f"cannot write a calibration to {p}: no folder {p.parent}",
                             reason="bad_calibration")
    if p.exists():
        _read(p)
    return p


def _read(p: Path) -> dict:
    try:
        blob = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MidimatchError(f"cannot read calibration {p}: {e}", reason="bad_calibration") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(
            blob.get("models"), dict):
        raise MidimatchError(f"{p} is not a {FORMAT} file", reason="bad_calibration")
    return blob["models"]


def _as_conf(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinity")
    return a
