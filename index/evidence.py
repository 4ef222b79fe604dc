"""Evidence that accumulates over the stream: the live decision rule.

:class:`index.decision.StreamDecision` asks for the same top-1 over a fixed threshold in a fixed
number of consecutive results; one result under the threshold starts it over, so a piece whose
confidence hovers near the threshold (another sound set) is rarely decided, and one that is
clearly right waits for ``stable_results`` results anyway. :class:`EvidenceDecision` uses the
whole history of the session instead: every candidate has an **evidence score**, a CUSUM of
per-result log-likelihood-ratio-like increments, and the stream is decided for the top match
once its score reaches one calibrated threshold.

Per result (a non-quiet one: quiet periods are not fed, :mod:`worker.session`), the top match
``a`` with confidence ``c`` gains

* **its confidence against the field**, ``clip(logit(c), conf_floor, conf_clip) - conf_bias``:
  ``logit(c)`` is linear in the margin evidence the confidence is made of
  (:func:`index.confirm.margin_confidence`: ``(x - 0.8) / 0.08``), so it adds like a
  log-likelihood ratio. The clip follows the measured ratio (``bench/evidence_params.py`` on
  the calib half of the evaluation streams, TiMidity: a true top vs an outsider's top, per
  result, natural log): ``-2.5`` under ``c = 0.1``, ``+1.5`` at 0.3-0.5, ``+3.3`` at 0.8-0.9,
  and only ``+4.1`` to ``+5.8`` above 0.95 — so above
  ``c = 0.82`` (``conf_clip`` 1.5) a result weighs the same, under 0.047 (``conf_floor`` -3)
  too; with ``conf_bias`` 0 a top under 0.5 subtracts;
* **its lead over the runner-up**, ``gap_weight`` times the same clipped logit of ``c`` minus
  that of the second match's confidence;
* **its position keeping step with the stream**: since ``a`` was last seen in the ranking (at
  any rank), its position in the piece moved on by the audio that arrived, within ``slack``
  (tempo ±25 %) plus :data:`index.decision.STEP_TOL_S` (:func:`index.decision.keeps_step`):
  ``+ step_bonus``; a jump elsewhere in the piece: ``- jump_penalty``; not seen before: 0. A
  weak feature (hash-DTW extends any reference's path with the audio, so 69 % of the outsiders'
  repeated tops keep step too, against 87 % of the true ones), hence a small bonus and a larger
  penalty: an outsider stuck on one reference whose position wanders drifts down;

``E_a ← clip(E_a + increment, 0, cap)``. Every other candidate loses ``decay`` and, when its
own confidence in this result is low (or it left the ranking: ``conf_floor``), what that
confidence says, as for a top; it never gains. So a change of music is followed: the new piece
is decided as soon as its own score reaches the threshold, whatever the old one's, and the old
one's decision lapses after a result or two of not being on top. The score is floored at 0
(CUSUM), so a long stretch of doubt does not have to be paid back, and capped at
``threshold + hold`` so that a piece decided for minutes is withdrawn as quickly as one decided
for seconds. For the same reason a restart of the query after a change of music
(:meth:`EvidenceDecision.restart`) keeps the evidence. The increments' shape
(:class:`EvidenceParams`) is chosen on the calib half of the evaluation streams only: the
default one by hand (docs/benchmarks.md, "Time to identify"), or per model by
:func:`fit_evidence_shape` (``bench/time_to_identify.py --calibrate --fit-shape``), which
stores it in the calibration beside the threshold fitted with it (:func:`params_of`).

The answer of a result: the top match if its score reaches the threshold; else the match decided
before, while it is still in the ranking with a score at or above the threshold (one result
with another top does not withdraw a decision); else None. A candidate's score rises only while
it is the top match, so a stream ever decides exactly when the top match's score after some
result reaches the threshold: :func:`evidence_peak` is the largest such score, and
:func:`calibrate_evidence` sets the threshold just above the ``max_false_rate`` quantile of the
outsider streams' peaks — one number, fitted on whole streams. Like any rule fed results one
by one, the share of outsiders that ever decide grows with the stream's length: it is
calibrated on 30 s streams.

Memory: a few floats per candidate (score, and where and when it was last seen), at most
``MAX_CANDIDATES`` of them (the lowest scores are forgotten first).

Replays: a stream's decision input is recorded as **events** (:data:`StreamEvents`), one per
``update`` (its audio seconds and every match's id, confidence and position), ``restart``
(:data:`RESTART`) or ``reset`` (:data:`RESET`); :func:`replay` feeds them to any rule, so the
bench measures the old and the new rule on the same results (``bench/time_to_identify.py``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import numpy as np

from index.calibration import Calibration, threshold_above
from index.decision import StreamDecision, keeps_step

__all__ = [
    "MAX_CANDIDATES",
    "RESET",
    "RESTART",
    "SHAPE_GRID",
    "EvidenceDecision",
    "EvidenceParams",
    "RecordedMatch",
    "StreamEvents",
    "calibrate_evidence",
    "events_to_trace",
    "event_kind",
    "evidence_peak",
    "first_decision",
    "fit_evidence_shape",
    "params_of",
    "replay",
    "replay_steps",
    "shape_figures",
    "stream_decision",
]

MAX_CANDIDATES = 32  # candidates whose evidence a session keeps


class _Scored(Protocol):
    ref: int
    confidence: float


M = TypeVar("M", bound=_Scored)


@dataclass(frozen=True)
class EvidenceParams:
    """The shape of the evidence increments (the threshold is calibrated, these are not).

    Attributes
    ----------
    conf_bias : float
        ``logit(confidence)`` of a top match that adds nothing; above it adds, below subtracts.
    conf_clip, conf_floor : float
        ``logit(confidence)`` is clipped to ``[conf_floor, conf_clip]`` (one result's weight).
    step_bonus, jump_penalty : float
        Added / subtracted when the top match's position kept step / jumped since it was last
        seen.
    decay : float
        Subtracted from every candidate that is not the top match, per result (with what its
        own confidence says when that is negative: see :meth:`EvidenceDecision.update`).
    hold : float
        Evidence above the threshold a score may keep (``cap = threshold + hold``).
    slack : float
        Tempo tolerance of the step check (0.25: ±25 %).
    gap_weight : float
        Weight of the top match's lead over the runner-up, ``logit(c) - logit(c_2)``.
    """

    conf_bias: float = 0.0
    conf_clip: float = 1.5
    conf_floor: float = -3.0
    step_bonus: float = 1.0
    jump_penalty: float = 2.0
    decay: float = 1.0
    hold: float = 3.0
    slack: float = 0.25
    gap_weight: float = 0.5

    def __post_init__(self) -> None:
        if min(self.conf_clip, self.step_bonus, self.jump_penalty, self.decay, self.hold,
               self.slack) < 0:
            raise ValueError("evidence parameters must be >= 0 (conf_bias excepted)")
        if not self.conf_floor < self.conf_clip:
            raise ValueError(f"conf_floor ({self.conf_floor}) must lie under conf_clip "
                             f"({self.conf_clip})")

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> EvidenceParams:
        """The shape stored in a calibration; a name this version does not know is an error
        (a rule that silently ignored part of its fitted shape would not be the fitted one)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown evidence parameters {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in d.items()})


DEFAULT_PARAMS = EvidenceParams()


def params_of(calibration: Calibration) -> EvidenceParams:
    """The evidence shape ``calibration``'s threshold was fitted with
    (``stream["evidence"]["params"]``, written by :func:`calibrate_evidence`); the default
    shape when it recorded none (a file written before shapes were fitted per model)."""
    d = calibration.evidence_shape
    return DEFAULT_PARAMS if d is None else EvidenceParams.from_dict(d)


class EvidenceDecision:
    """Stream decision from evidence accumulated per candidate (see the module docstring).

    Parameters
    ----------
    calibration : Calibration
        Gives ``evidence_threshold`` unless ``threshold`` is given, and the shape unless
        ``params`` is given (:func:`params_of`: the one the threshold was fitted with).
    threshold : float, optional
        The evidence a top match needs to be decided (``inf``: never).
    params : EvidenceParams, optional
    """

    def __init__(self, calibration: Calibration, threshold: float | None = None,
                 params: EvidenceParams | None = None) -> None:
        th = calibration.evidence_threshold if threshold is None else threshold
        if th is None or not (th >= 0):
            raise ValueError(f"an evidence threshold >= 0 is needed, got {th}")
        if params is None:
            params = params_of(calibration)
        self.calibration, self.threshold, self.params = calibration, float(th), params
        self.cap = self.threshold + params.hold
        # ref -> [evidence, audio_s last seen, position_s last seen]
        self._cands: dict[object, list[float]] = {}
        self._decided: object | None = None
        self.top_evidence = 0.0  # the top match's evidence after the last update

    def reset(self) -> None:
        """Forget the history (a new stream, a seek, a change of music)."""
        self._cands.clear()
        self._decided = None
        self.top_evidence = 0.0

    def restart(self) -> bool:
        """The query restarted after a change of music
        (:meth:`worker.session.Session.restart_recent`): the evidence is kept. The rule follows
        a change on its own (the old piece lapses once it is not on top, the new one is decided
        when its own score reaches the threshold), so a false alarm of the change check costs
        no decision. True: kept."""
        return True

    def evidence(self, ref: object) -> float:
        """The evidence of reference ``ref`` (0 when it has none)."""
        c = self._cands.get(_key(ref))
        return c[0] if c else 0.0

    @property
    def nbytes(self) -> int:
        """An estimate of the state's size: a dict entry and a 3-float list per candidate."""
        return 64 + len(self._cands) * (3 * 8 + 56 + 100)

    def update(self, matches: Sequence[M], audio_s: float | None = None) -> M | None:
        """Feed the ranking of the newest result; returns the decided match, or None.

        Parameters
        ----------
        matches : sequence of matches (``ref``, ``confidence``, ``position_s``), best first
        audio_s : float, optional
            The stream's audio seconds at this result (without it no step is checked).
        """
        if not matches:
            self.top_evidence = 0.0
            return None  # nothing to point at; the evidence is left as it is
        p = self.params
        top = _key(matches[0].ref)
        # the others: ``decay``, and what their own low confidence says, as for a top (one
        # out of the ranking counts at ``conf_floor``); none of them gains
        conf = {_key(m.ref): m.confidence for m in matches[1:]}
        for ref, c in self._cands.items():
            if ref != top and c[0] > 0.0:
                lc = (min(p.conf_clip, max(p.conf_floor, _logit(conf[ref]))) if ref in conf
                      else p.conf_floor)
                c[0] = max(0.0, c[0] - p.decay + min(0.0, lc - p.conf_bias))
        now = None if audio_s is None else float(audio_s)
        c = self._cands.get(top)
        lc = min(p.conf_clip, max(p.conf_floor, _logit(matches[0].confidence)))
        inc = lc - p.conf_bias
        if p.gap_weight:
            second = matches[1].confidence if len(matches) > 1 else 0.0
            inc += p.gap_weight * (lc - min(p.conf_clip, max(p.conf_floor, _logit(second))))
        pos = float(getattr(matches[0], "position_s", math.nan))
        if c is not None and now is not None:
            step = keeps_step((c[1], c[2]), (now, pos), slack=p.slack)
            if step:
                inc += p.step_bonus
            elif not (math.isnan(c[1]) or math.isnan(c[2]) or math.isnan(pos)):
                inc -= p.jump_penalty
        if c is None:
            c = self._cands[top] = [0.0, math.nan, math.nan]
        c[0] = min(self.cap, max(0.0, c[0] + inc))
        self.top_evidence = c[0]
        for m in matches:  # where each ranked candidate was last seen
            k = _key(m.ref)
            seen = self._cands.get(k)
            if seen is None:
                seen = self._cands[k] = [0.0, math.nan, math.nan]
            seen[1] = math.nan if now is None else now
            seen[2] = float(getattr(m, "position_s", math.nan))
        self._forget({_key(m.ref) for m in matches})
        if c[0] >= self.threshold:
            self._decided = top
            return matches[0]
        held = self._decided
        if held is not None and self.evidence(held) >= self.threshold:
            for m in matches:
                if _key(m.ref) == held:
                    return m
        self._decided = None
        return None

    def _forget(self, ranked: set) -> None:
        """Drop candidates with no evidence that are not in the ranking, then the weakest past
        ``MAX_CANDIDATES``."""
        for ref in [r for r, c in self._cands.items() if c[0] <= 0.0 and r not in ranked]:
            del self._cands[ref]
        if len(self._cands) > MAX_CANDIDATES:
            keep = sorted(self._cands, key=lambda r: (r in ranked, self._cands[r][0]),
                          reverse=True)[:MAX_CANDIDATES]
            self._cands = {r: self._cands[r] for r in keep}


def _key(ref: object) -> object:
    return ref.item() if isinstance(ref, np.generic) else ref


def _logit(c: float) -> float:
    c = min(1.0 - 1e-6, max(1e-6, float(c)))
    return math.log(c / (1.0 - c))


def stream_decision(calibration: Calibration) -> StreamDecision | EvidenceDecision:
    """The live rule for ``calibration``: :class:`EvidenceDecision` when it has an
    ``evidence_threshold`` (calibrated by :func:`calibrate_evidence`), else the fixed-count
    :class:`index.decision.StreamDecision` (a calibration file written before it)."""
    if calibration.evidence_threshold is not None:
        return EvidenceDecision(calibration)
    return StreamDecision(calibration)


# ---------------------------------------------------------------------------------- replays
# One stream's decision input, oldest first, one event per call the session made on its rule:
#
# * (audio_s, matches) for an ``update``, matches a sequence of (id, confidence, position_s),
#   best first (possibly empty);
# * (audio_s, RESTART) for a restart of the query after a change of music
#   (:meth:`worker.session.Session.restart_recent`: ``rule.restart()``, which keeps the
#   evidence rule's evidence and decision and starts the fixed-count rule over);
# * (audio_s, RESET) for a reset after ``worker.session.HOLD_QUIET_S`` of quiet in a row
#   (``rule.reset()``: every rule forgets its history and decision).
#
# The markers are plain strings, so events survive a JSON round trip (``--json`` of
# ``bench/time_to_identify.py``). Recordings made before the two were told apart hold
# (audio_s, None) for both; it is read as a restart (:func:`event_kind`), which is what those
# replays did (the streams recorded for the benches and calibrations never hold that much
# quiet, so they hold no reset).
StreamEvents = Sequence[Sequence]

RESTART = "restart"  # the second element of a restart event
RESET = "reset"  # the second element of a reset event


def event_kind(ranked: object) -> str | None:
    """The kind of an event whose second element is ``ranked``: :data:`RESTART`,
    :data:`RESET`, or None for an update (``ranked`` is its matches). None, the marker of
    older recordings, reads as :data:`RESTART`."""
    if ranked is None:
        return RESTART
    if isinstance(ranked, str):
        if ranked in (RESTART, RESET):
            return ranked
        raise ValueError(f"unknown decision event {ranked!r}")
    return None


@dataclass(frozen=True)
class RecordedMatch:
    """A recorded match, shaped as the matches the rules read."""

    ref: str
    confidence: float
    position_s: float


class _Rule(Protocol):
    def update(self, matches: Sequence, audio_s: float | None = None) -> object: ...

    def reset(self) -> None: ...

    def restart(self) -> bool: ...


def replay_steps(events: StreamEvents, rule: _Rule) -> Iterator[tuple[float, str | None, bool]]:
    """Feed ``events`` to ``rule`` (fresh) one by one, as the session calls it; after each,
    yield (audio_s, the decided id the session holds or None, whether the event was an
    update). An update holds what the rule returns; a reset drops the decision; a restart
    drops it only when ``rule.restart()`` returns False (nothing kept). Lazy: the rule is in
    the state of the event just yielded."""
    held: str | None = None
    for t, ranked in events:
        kind = event_kind(ranked)
        if kind == RESET:
            rule.reset()
            held = None
        elif kind == RESTART:
            if not rule.restart():
                held = None
        else:
            got = rule.update([RecordedMatch(str(i), float(c), float(p)) for i, c, p in ranked],
                              audio_s=float(t))
            held = None if got is None else str(got.ref)
        yield float(t), held, kind is None


def replay(events: StreamEvents, rule: _Rule,
           on_update: Callable[[_Rule], None] | None = None) -> list[tuple[float, str | None]]:
    """Feed ``events`` to ``rule`` (a fresh :class:`EvidenceDecision` or
    :class:`~index.decision.StreamDecision`); per update, (audio_s, decided id or None).
    ``on_update(rule)`` is called after each update."""
    out = []
    for t, held, updated in replay_steps(events, rule):
        if updated:
            out.append((t, held))
            if on_update is not None:
                on_update(rule)
    return out


def events_to_trace(events: StreamEvents) -> list[tuple]:
    """The top-1 trace (:data:`index.decision.StreamTrace`) of ``events`` for the fixed-count
    rule's calibration: one row per update, and a restart or reset (both start that rule over)
    as a row without a top-1 (which breaks a run as they do)."""
    out: list[tuple] = []
    for t, ranked in events:
        if event_kind(ranked) is not None or not ranked:
            out.append((float(t), None, 0.0, math.nan))
        else:
            i, c, p = ranked[0]
            out.append((float(t), str(i), float(c), float(p)))
    return out


def evidence_peak(events: StreamEvents, params: EvidenceParams = DEFAULT_PARAMS) -> float:
    """The largest evidence a top match reaches over the stream: the stream decides exactly
    when the threshold is at most this (the scores do not depend on the threshold below the
    cap, and the cap is above the threshold)."""
    dec = EvidenceDecision(Calibration("replay"), threshold=math.inf, params=params)
    peak = [0.0]
    replay(events, dec, lambda d: peak.__setitem__(0, max(peak[0], d.top_evidence)))
    return peak[0]


def first_decision(events: StreamEvents, threshold: float,
                   params: EvidenceParams = DEFAULT_PARAMS) -> tuple[float, str] | None:
    """The first decision of :class:`EvidenceDecision` on ``events``: (audio_s, id) or None."""
    dec = EvidenceDecision(Calibration("replay"), threshold=threshold, params=params)
    return next(((t, d) for t, d in replay(events, dec) if d is not None), None)


def calibrate_evidence(
    calibration: Calibration,
    in_events: Sequence[StreamEvents],
    true_ids: Sequence[str],
    out_events: Sequence[StreamEvents],
    *,
    params: EvidenceParams = DEFAULT_PARAMS,
    max_false_rate: float = 0.01,
) -> Calibration:
    """Fit ``evidence_threshold`` on whole streams: just above the evidence peak of the
    ``max_false_rate`` quantile of the out-of-collection streams (at most that share of them
    ever decides). ``stream["evidence"]`` records what it gives on the in-collection streams
    (share identified, median time to a right first decision, wrong first decisions).
    """
    if not out_events:
        raise ValueError("evidence calibration needs at least one out-of-collection stream")
    if len(in_events) != len(true_ids):
        raise ValueError(f"{len(in_events)} in-collection streams but {len(true_ids)} ids")
    if not 0.0 <= max_false_rate < 1.0:
        raise ValueError(f"max_false_rate must lie in [0, 1), got {max_false_rate}")
    f = shape_figures(params, in_events, true_ids, out_events, max_false_rate)
    threshold, ts, wrong = f["threshold"], f["times"], f["wrong"]
    figures = {
        "threshold": threshold, "false_rate": float(np.mean(f["peaks"] >= threshold)),
        "identified": float(np.mean(np.isfinite(ts))) if ts.size else 0.0,
        "wrong_first": wrong / max(1, len(in_events)),
        "median_s": (float(np.median(ts)) if ts.size else math.inf),
        "n_in": len(in_events), "n_out": len(out_events), "max_false_rate": max_false_rate,
        "params": params.to_dict(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    figures = {k: ("inf" if v == math.inf else v) for k, v in figures.items()}
    return replace(calibration, evidence_threshold=threshold,
                   stream={**calibration.stream, "evidence": figures})


# The shapes :func:`fit_evidence_shape` tries (every combination; the default shape is one).
SHAPE_GRID: dict[str, tuple[float, ...]] = {
    "conf_bias": (-1.0, 0.0, 1.0), "conf_floor": (-3.0, -1.5), "conf_clip": (1.5, 3.0, 5.0),
    "step_bonus": (0.0, 1.0, 2.0), "jump_penalty": (0.0, 2.0), "gap_weight": (0.0, 0.5)}


def shape_figures(params: EvidenceParams, in_events: Sequence[StreamEvents],
                  true_ids: Sequence[str], out_events: Sequence[StreamEvents],
                  max_false_rate: float = 0.01, threshold: float | None = None) -> dict:
    """What shape ``params`` gives on streams once its threshold is fitted on the outsiders
    (:func:`calibrate_evidence`'s rule, peaks are >= 0), or at ``threshold`` (streams other than
    those it was fitted on): ``threshold``, ``peaks`` (per outsider stream,
    :func:`evidence_peak`: it decides when its peak reaches the threshold), ``times`` (per
    in-collection stream, the audio seconds of a right first decision, ``inf`` when none) and
    ``wrong`` (the number of in-collection streams first decided for another piece)."""
    peaks = np.array([evidence_peak(e, params) for e in out_events])
    if threshold is None:
        threshold = threshold_above(peaks, max_false_rate, upper=math.inf)
    times, wrong = [], 0
    for ev, true in zip(in_events, true_ids, strict=True):
        d = first_decision(ev, threshold, params)
        wrong += d is not None and d[1] != true
        times.append(d[0] if d is not None and d[1] == true else math.inf)
    return {"threshold": threshold, "times": np.asarray(times, dtype=float), "wrong": wrong,
            "peaks": peaks}


def fit_evidence_shape(
    in_events: Sequence[StreamEvents],
    true_ids: Sequence[str],
    out_events: Sequence[StreamEvents],
    *,
    grid: dict[str, Sequence[float]] | None = None,
    max_false_rate: float = 0.01,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[EvidenceParams, list[dict]]:
    """Choose the increments' shape on calibration streams: for every combination of
    ``grid`` (default :data:`SHAPE_GRID`) over the default shape, its threshold is fitted at
    ``max_false_rate`` of the outsider streams, and the shape whose in-collection streams are
    decided right soonest wins (the median time; ties: more decided within 20 s, then the
    lower mean time with undecided streams counted at 30 s). A shape that first decides more
    in-collection streams wrongly than the default shape is not chosen (with none left, or no
    valid shape in ``grid``, the default shape is). Returns the chosen
    shape and one row per shape tried (best first: the shape's values, ``threshold``,
    ``median_s``, ``in_20s``, ``wrong_first``)."""
    grid = SHAPE_GRID if grid is None else grid
    if not out_events or not in_events:
        raise ValueError("fitting the evidence shape needs in- and out-of-collection streams")
    combos = list(itertools.product(*grid.values()))
    default_wrong = shape_figures(DEFAULT_PARAMS, in_events, true_ids, out_events,
                                  max_false_rate)["wrong"]
    rows = []
    for k, values in enumerate(combos):
        try:
            p = replace(DEFAULT_PARAMS, **dict(zip(grid, values, strict=True)))
        except ValueError:  # e.g. conf_floor over conf_clip
            continue
        f = shape_figures(p, in_events, true_ids, out_events, max_false_rate)
        ts = f["times"]
        rows.append({**p.to_dict(), "threshold": f["threshold"],
                     "median_s": float(np.median(ts)), "in_20s": float(np.mean(ts <= 20.0)),
                     "mean_s": float(np.mean(np.minimum(ts, 30.0))),
                     "wrong_first": f["wrong"] / len(in_events),
                     "eligible": f["wrong"] <= default_wrong})
        if progress is not None:
            progress(k + 1, len(combos))
    rows.sort(key=lambda r: (not r["eligible"], r["median_s"], -r["in_20s"], r["mean_s"]))
    if not rows or not rows[0]["eligible"]:  # a grid without the default shape, all worse
        return DEFAULT_PARAMS, rows
    best = EvidenceParams.from_dict({k: rows[0][k] for k in EvidenceParams.__dataclass_fields__})
    return best, rows
