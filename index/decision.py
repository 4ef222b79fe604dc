"""When a ranking becomes an answer: the decision rule and its calibration.

A search returns a ranking with confidences in [0, 1] (:mod:`index.search`). The answer is

* **identified** (offline, one query): the top match's confidence is at least the calibrated
  threshold;
* **identified** (a stream): the same reference has been the top match, and confident, in each of
  the last ``stable_results`` results (:class:`StreamDecision`), so one lucky window does not flip
  the answer. A stream gets many results, each a chance of a wrong answer, so its threshold
  (``stream_threshold``) is calibrated separately, on whole streams (:func:`calibrate_stream`);
  With ``keep_step`` (opt-in; measured and not adopted, see :func:`calibrate_stream`) the run
  must also *move on with the stream*: between consecutive results the top match's position in
  the piece advances by the audio that arrived, within ``STEP_SLACK`` of it plus ``STEP_TOL_S``
  (:func:`keeps_step`).
* otherwise **not in the collection** — a normal answer, not an error.

Calibration (:func:`calibrate`) picks the threshold from scored queries whose answer is known:
the smallest threshold at which at most ``max_false_rate`` (1 %) of the out-of-collection queries
are confident, and reports the recall (in-collection queries that are confident *and* right) at
that point. :func:`calibrate_stream` does the same for whole streams: for each ``stable_results``
it tries, the smallest threshold at which at most ``max_false_rate`` of the out-of-collection
*streams* ever decide, keeping the pair with the shortest median time to identify on the
in-collection streams. Calibrations are stored as JSON keyed by ``model_id`` (a threshold means
nothing for another model); :func:`load_calibration` reads
``model/weights/default.calibration.json`` unless told otherwise and falls back to Raffel's
c >= 0.5 for a model it has no entry for, with a warning (:func:`uncalibrated_warning`) that the
worker also shows in ``/readyz``.
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
from typing import Protocol, TypeVar

import numpy as np

from model.errors import MidimatchError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CALIBRATION_PATH",
    "Calibration",
    "StreamDecision",
    "StreamTrace",
    "calibrate",
    "calibrate_stream",
    "decide",
    "keeps_step",
    "simulate_stream",
    "load_calibration",
    "save_calibration",
    "uncalibrated_warning",
]

DEFAULT_CALIBRATION_PATH = (
    Path(__file__).resolve().parent.parent / "model" / "weights" / "default.calibration.json"
)
FORMAT = "midimatch-calibration/1"
DEFAULT_THRESHOLD = 0.5  # Raffel's c >= 0.5, set on 30 s clips: only a fallback here
DEFAULT_STABLE_RESULTS = 3
STEP_SLACK = 0.3  # keep_step: tempo ±30 % between the stream and the reference
STEP_TOL_S = 0.5  # ... plus this much jitter of the found position, s


class _Scored(Protocol):
    ref: int
    confidence: float


M = TypeVar("M", bound=_Scored)


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
    """

    model_id: str
    threshold: float = DEFAULT_THRESHOLD
    stable_results: int = DEFAULT_STABLE_RESULTS
    max_false_rate: float = 0.01
    false_rate: float | None = None
    recall: float | None = None
    n_in: int = 0
    n_out: int = 0
    source: str = "uncalibrated default (Raffel's c >= 0.5)"
    created_utc: str = ""
    stream_threshold: float | None = None
    stream: dict = field(default_factory=dict)
    keep_step: bool = False

    def __post_init__(self) -> None:
        for name in ("threshold", "stream_threshold"):
            t = getattr(self, name)
            if t is not None and not (0.0 <= t <= 1.0 or t == math.inf):
                raise ValueError(f"{name} must lie in [0, 1] (or be inf), got {t}")
        if self.stable_results < 1:
            raise ValueError(f"stable_results must be >= 1, got {self.stable_results}")

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
        for name in ("threshold", "stream_threshold"):
            if d[name] == math.inf:  # JSON has no infinity
                d[name] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for name in ("threshold", "stream_threshold"):
            if d.get(name) == "inf":
                d[name] = math.inf
        return cls(**d)


def calibrate(
    in_confidence: Sequence[float] | np.ndarray,
    out_confidence: Sequence[float] | np.ndarray,
    *,
    model_id: str,
    in_correct: Sequence[bool] | np.ndarray | None = None,
    max_false_rate: float = 0.01,
    stable_results: int = DEFAULT_STABLE_RESULTS,
    source: str = "",
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
    threshold = _threshold_above(cout, max_false_rate)
    false_rate = float(np.mean(cout >= threshold))
    recall = float(np.mean((cin >= threshold) & correct)) if cin.size else 0.0
    return Calibration(
        model_id=model_id, threshold=threshold, stable_results=stable_results,
        max_false_rate=max_false_rate, false_rate=false_rate, recall=recall,
        n_in=int(cin.size), n_out=int(cout.size), source=source,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _threshold_above(out_values: Sequence[float], max_false_rate: float) -> float:
    """The lowest threshold at which at most ``max_false_rate`` of ``out_values`` (confidences
    of outsiders, in [0, 1]) reach it: just above the ``allowed``-th highest value, so that it
    and its ties do not; 0 when every value may pass, ``inf`` when none may (above 1)."""
    allowed = int(math.floor(max_false_rate * len(out_values) + 1e-9))
    desc = np.sort(np.asarray(out_values, np.float64))[::-1]
    if allowed >= desc.size:
        return 0.0
    threshold = float(np.nextafter(max(desc[allowed], 0.0), np.inf))
    return math.inf if threshold > 1.0 else threshold


def decide(matches: Sequence[M], calibration: Calibration) -> M | None:
    """Offline decision: the top match when it is confident, else None (not in the collection)."""
    if matches and calibration.is_confident(matches[0].confidence):
        return matches[0]
    return None


class StreamDecision:
    """Stream decision: identified once the same top-1 is confident in consecutive results
    (and, with ``calibration.keep_step``, its position keeps step with the stream).

    Parameters
    ----------
    calibration : Calibration
    stable_results : int, optional
        Overrides ``calibration.stable_results``.
    """

    def __init__(self, calibration: Calibration, stable_results: int | None = None) -> None:
        self.calibration = calibration
        self.stable_results = int(stable_results or calibration.stable_results)
        if self.stable_results < 1:
            raise ValueError("stable_results must be >= 1")
        self._run_ref: int | str | None = None
        self._run = 0
        self._last: tuple[float, float] | None = None  # (audio_s, position_s) of the run's last

    def reset(self) -> None:
        """Forget the history (a new stream, or a seek)."""
        self._run_ref, self._run, self._last = None, 0, None

    def update(self, matches: Sequence[M], audio_s: float | None = None) -> M | None:
        """Feed the ranking of the newest result; returns its top match once it is stable.

        Parameters
        ----------
        matches : sequence of matches (``ref``, ``confidence`` and, for ``keep_step``,
            ``position_s``), best first
        audio_s : float, optional
            The stream's audio seconds at this result; needed by ``keep_step`` (without it a
            ``keep_step`` calibration never decides).

        Returns
        -------
        The top match when it and the previous ``stable_results - 1`` results all had the same
        confident top-1 reference (keeping step, with ``keep_step``); None otherwise (not (yet)
        identified).
        """
        top = matches[0] if matches and matches[0].confidence >= self.calibration.stream_cut \
            else None
        if top is None:
            self.reset()
            return None
        here = None if audio_s is None else (float(audio_s), float(getattr(top, "position_s",
                                                                            math.nan)))
        ref = top.ref.item() if isinstance(top.ref, np.generic) else top.ref
        same = ref == self._run_ref and (not self.calibration.keep_step
                                         or keeps_step(self._last, here))
        self._run = self._run + 1 if same else 1
        self._run_ref, self._last = ref, here
        return top if self._run >= self.stable_results else None


def keeps_step(prev: tuple[float, float] | None, cur: tuple[float, float] | None) -> bool:
    """Whether a match's position moved on with the stream from ``prev`` to ``cur``, each
    ``(audio_s, position_s)``: it advanced by the audio elapsed, within ``STEP_SLACK`` of it
    plus ``STEP_TOL_S``. False when either is unknown (None, or a NaN position)."""
    if prev is None or cur is None or math.isnan(prev[1]) or math.isnan(cur[1]):
        return False
    elapsed, moved = cur[0] - prev[0], cur[1] - prev[1]
    return abs(moved - elapsed) <= STEP_SLACK * abs(elapsed) + STEP_TOL_S


# One stream's results, oldest first: (audio seconds, top-1 id or None, top-1 confidence) and,
# for keep_step, the top-1's position (s) as a 4th element; anything after that is ignored.
StreamTrace = Sequence[tuple]


def _position(row: tuple) -> tuple[float, float]:
    return float(row[0]), float(row[3]) if len(row) > 3 and row[3] is not None else math.nan


def simulate_stream(trace: StreamTrace, threshold: float, stable_results: int,
                    keep_step: bool = False) -> tuple[float, str] | None:
    """The first decision :class:`StreamDecision` makes on ``trace``: (audio_s, id), or None
    when the stream never decides. The trace is fed to a :class:`StreamDecision` result by
    result, so the replay is the live rule itself."""
    dec = StreamDecision(Calibration("replay", threshold=0.0, stream_threshold=threshold,
                                     stable_results=stable_results, keep_step=keep_step))
    for row in trace:
        audio_s, top, conf = row[0], row[1], row[2]
        matches = [] if top is None else [_TraceTop(top, float(conf), _position(row)[1])]
        if dec.update(matches, audio_s=float(audio_s)) is not None:
            return float(audio_s), top
    return None


@dataclass(frozen=True)
class _TraceTop:
    """A trace row's top-1, shaped as the match :class:`StreamDecision` reads."""

    ref: str
    confidence: float
    position_s: float


def _stream_peak(trace: StreamTrace, k: int, keep_step: bool = False) -> float:
    """The largest threshold at which ``trace`` decides with ``stable_results = k`` (-1: never):
    the best, over runs of k results with the same top-1 (keeping step, with ``keep_step``), of
    the run's smallest confidence."""
    best = -1.0
    for r in range(k - 1, len(trace)):
        window = trace[r - k + 1:r + 1]
        top = window[-1][1]
        if top is None or not all(w[1] == top for w in window):
            continue
        if keep_step and not all(keeps_step(_position(a), _position(b))
                                 for a, b in zip(window[:-1], window[1:], strict=True)):
            continue
        best = max(best, min(w[2] for w in window))
    return best


def calibrate_stream(
    calibration: Calibration,
    in_traces: Sequence[StreamTrace],
    true_ids: Sequence[str],
    out_traces: Sequence[StreamTrace],
    *,
    stable_choices: Sequence[int] = (1, 2, 3, 4),
    step_choices: Sequence[bool] = (False,),
    max_false_rate: float = 0.01,
    source: str = "",
) -> Calibration:
    """Choose the stream decision (``stream_threshold``, ``stable_results``, ``keep_step``) from
    whole streams.

    Parameters
    ----------
    calibration : Calibration
        The single-query calibration of the same model; returned with the stream fields set.
    in_traces, true_ids : the results of in-collection streams and the id each should decide for.
    out_traces : the results of out-of-collection streams (at least one).
    stable_choices : the ``stable_results`` values tried.
    step_choices : the ``keep_step`` values tried with each (default: only False; with True
        the rows must carry positions). Measured on the evaluation streams, ``keep_step`` lets
        a lower threshold through on the calib half but does not hold on the test half (2-3 %
        of its outsiders decided against 1.3 % without it: docs/benchmarks.md), so it is opt-in.
    max_false_rate : allowed fraction of out-of-collection streams that ever decide.

    Returns
    -------
    Calibration
        For each ``k`` in ``stable_choices`` (and ``keep_step`` in ``step_choices``) the
        smallest threshold at which at most ``max_false_rate`` of ``out_traces`` decide; the
        rule whose in-collection streams have the shortest median time to a right first decision
        (a wrong first decision or none counts as never) wins, ties going to the larger share
        identified. ``stream`` records the figures of every rule tried.
    """
    if not out_traces:
        raise ValueError("stream calibration needs at least one out-of-collection stream")
    if len(in_traces) != len(true_ids):
        raise ValueError(f"{len(in_traces)} in-collection traces but {len(true_ids)} ids")
    if not 0.0 <= max_false_rate < 1.0:
        raise ValueError(f"max_false_rate must lie in [0, 1), got {max_false_rate}")
    if any(step_choices) and not all(len(row) > 3 for t in (*in_traces, *out_traces)
                                     for row in t):
        raise ValueError("keep_step needs every trace row to carry the top-1's position")
    tried = []
    for k, step in ((k, step) for step in step_choices for k in stable_choices):
        peaks = np.array([_stream_peak(t, k, step) for t in out_traces])
        threshold = _threshold_above(peaks, max_false_rate)
        times = []
        wrong = 0
        for trace, true in zip(in_traces, true_ids, strict=True):
            d = simulate_stream(trace, threshold, k, step)
            wrong += d is not None and d[1] != true
            times.append(d[0] if d is not None and d[1] == true else math.inf)
        ts = np.asarray(times)
        out_rate = float(np.mean(peaks >= threshold))  # a stream decides iff its peak reaches it
        tried.append({
            "stable_results": int(k), "keep_step": bool(step), "threshold": threshold,
            "false_rate": out_rate,
            "identified": float(np.mean(np.isfinite(ts))) if ts.size else 0.0,
            "wrong_first": wrong / max(1, len(in_traces)),
            "median_s": float(np.median(ts)) if ts.size else math.inf,
        })
    best = min(tried, key=lambda r: (r["median_s"], -r["identified"]))
    figures = {"max_false_rate": max_false_rate, "n_in": len(in_traces),
               "n_out": len(out_traces), "source": source,
               "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "tried": [{k: (v if v != math.inf else "inf") for k, v in r.items()}
                         for r in tried]}
    return replace(calibration, stream_threshold=best["threshold"],
                   stable_results=best["stable_results"], keep_step=best["keep_step"],
                   stream=figures)


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
