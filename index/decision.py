"""When a ranking becomes an answer: the decision rule, offline and on a stream.

A search returns a ranking with confidences in [0, 1] (:mod:`index.search`). The answer is

* **identified** (offline, one query): the top match's confidence is at least the calibrated
  threshold (:mod:`index.calibration`);
* **identified** (a stream, the fixed-count rule; the live rule is :mod:`index.evidence`'s
  accumulated evidence, and this one decides streams only under a calibration without an
  ``evidence_threshold``; both are measured side by side by ``bench/time_to_identify.py``):
  the same reference has been the top match, and confident, in each of
  the last ``stable_results`` results (:class:`StreamDecision`), so one lucky window does not flip
  the answer. A stream gets many results, each a chance of a wrong answer, so its threshold
  (``stream_threshold``) is calibrated separately, on whole streams (:func:`calibrate_stream`):
  for each ``stable_results`` it tries, the smallest threshold at which at most
  ``max_false_rate`` of the out-of-collection *streams* ever decide, keeping the pair with the
  shortest median time to identify on the in-collection streams. With ``keep_step`` (opt-in;
  measured and not adopted, see :func:`calibrate_stream`) the run must also *move on with the
  stream*: between consecutive results the top match's position in the piece advances by the
  audio that arrived, within ``STEP_SLACK`` of it plus ``STEP_TOL_S`` (:func:`keeps_step`).
* otherwise **not in the collection** — a normal answer, not an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import numpy as np

from index.calibration import Calibration, threshold_above

__all__ = [
    "StreamDecision",
    "StreamTrace",
    "calibrate_stream",
    "decide",
    "keeps_step",
    "simulate_stream",
]

STEP_SLACK = 0.3  # keep_step: tempo ±30 % between the stream and the reference
STEP_TOL_S = 0.5  # ... plus this much jitter of the found position, s


class _Scored(Protocol):
    ref: int
    confidence: float


M = TypeVar("M", bound=_Scored)


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

    def restart(self) -> bool:
        """The query restarted after a change of music: the run starts over (:meth:`reset`);
        False: nothing kept."""
        self.reset()
        return False

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


def keeps_step(prev: tuple[float, float] | None, cur: tuple[float, float] | None,
               slack: float = STEP_SLACK) -> bool:
    """Whether a match's position moved on with the stream from ``prev`` to ``cur``, each
    ``(audio_s, position_s)``: it advanced by the audio elapsed, within ``slack`` (default
    ``STEP_SLACK``) of it plus ``STEP_TOL_S``. False when either is unknown (None, or a NaN
    time or position)."""
    if prev is None or cur is None or any(math.isnan(x) for x in (*prev, *cur)):
        return False
    elapsed, moved = cur[0] - prev[0], cur[1] - prev[1]
    return abs(moved - elapsed) <= slack * abs(elapsed) + STEP_TOL_S


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
        threshold = threshold_above(peaks, max_false_rate)
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
