"""The decision rules of ``bench/time_to_identify.py``, measured on the same results.

The engine runs one rule live (the calibration's: :func:`index.evidence.stream_decision`); every
session's decision input is recorded meanwhile (:func:`record`): each ``update`` (audio seconds,
every match's id, confidence and position), ``restart`` and ``reset`` the session makes
(:data:`index.evidence.StreamEvents`), and after how many of them each result message was made.
:func:`rule_rows` replays that input through any rule (:func:`rules`: the fixed-count
``StreamDecision`` and the ``EvidenceDecision``) and gives the decision each result would have
carried — exactly what the session does (a quiet period is not fed and keeps the decision; a
reset drops it; a restart drops it unless the rule kept it), so the old and the new rule are
measured on the same streams in the same run, and the replay of the live rule equals the live
results (:func:`check_live`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from index.calibration import Calibration
from index.decision import StreamDecision
from index.evidence import RESET, RESTART, EvidenceDecision, replay_steps


class _Recorder:
    """Stands in for a session's decision: logs its input, then passes it on."""

    def __init__(self, inner: Any, session: Any, events: list) -> None:
        self._inner, self._session, self._events = inner, session, events

    def update(self, matches, audio_s=None):
        self._events.append((round(float(audio_s), 4), [
            (m.id, float(m.confidence), float(m.position_s)) for m in matches]))
        return self._inner.update(matches, audio_s)

    def reset(self) -> None:
        self._events.append((round(float(self._session.audio_s), 4), RESET))
        self._inner.reset()

    def restart(self) -> bool:
        self._events.append((round(float(self._session.audio_s), 4), RESTART))
        return self._inner.restart()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def record(session: Any) -> tuple[list, list[int]]:
    """Log ``session``'s decision input from now on: (events, marks), ``marks[k]`` being how
    many events preceded result message k."""
    events: list = []
    marks: list[int] = []
    session.decision = _Recorder(session.decision, session, events)
    result = session.result

    def recorded(matches, *args, **kwargs):
        out = result(matches, *args, **kwargs)
        marks.append(len(events))
        return out

    session.result = recorded
    return events, marks


class _ResetsEvidence(EvidenceDecision):
    """An ``EvidenceDecision`` that a restart of the query resets, as the sessions did until
    2026-12-05 (what-if ``evidence-reset``: the rule as shipped keeps its evidence)."""

    def restart(self) -> bool:
        self.reset()
        return False


def rules(cal: Calibration, evidence_threshold: float | None = None,
          reset_on_restart: bool = False) -> dict[str, Any]:
    """Factories of the rules measured: ``fixed`` (``StreamDecision``: the calibration's
    ``stream_threshold`` x ``stable_results``) and ``evidence`` (``EvidenceDecision`` at
    ``evidence_threshold``, default the calibration's; left out when neither is set);
    ``reset_on_restart`` adds ``evidence-reset``, the same rule reset when the query restarts
    after a change of music (the sessions' behaviour until 2026-12-05)."""
    out: dict[str, Any] = {"fixed": lambda: StreamDecision(cal)}
    th = cal.evidence_threshold if evidence_threshold is None else evidence_threshold
    if th is not None:
        out["evidence"] = lambda: EvidenceDecision(cal, threshold=th)
        if reset_on_restart:
            out["evidence-reset"] = lambda: _ResetsEvidence(cal, threshold=th)
    return out


def decisions_at_results(events: list, marks: list[int], rule: Any) -> list[str | None]:
    """The decided id each result message carries under ``rule`` (fresh), from the session's
    recorded input: what the session holds after the first ``marks[k]`` events
    (:func:`index.evidence.replay_steps`)."""
    steps = replay_steps(events, rule)
    held: list[str | None] = []
    state: str | None = None
    done = 0
    for n in marks:
        for _, decided, _ in itertools.islice(steps, max(0, n - done)):
            state = decided
        done = max(done, n)
        held.append(state)
    return held


def rule_rows(rows: list[tuple], events: list, marks: list[int], rule: Any) -> list[tuple]:
    """``rows`` (bench ``Row``s: audio_s, decided id, ...) with the decision column as ``rule``
    would have made it."""
    decided = decisions_at_results(events, marks, rule)
    if len(decided) != len(rows):
        raise RuntimeError(f"{len(rows)} results but {len(decided)} recorded")
    return [(r[0], d, *r[2:]) for r, d in zip(rows, decided, strict=True)]


def check_live(rows: list[tuple], replayed: list[tuple]) -> int:
    """Results where the replay of the live rule differs from the live decision (0 expected)."""
    return sum(a[1] != b[1] for a, b in zip(rows, replayed, strict=True))


def live_rule(cal: Calibration) -> str:
    """The name (in :func:`rules`) of the rule the engine runs live with ``cal``."""
    return "evidence" if cal.evidence_threshold is not None else "fixed"


def switch_audio(audio: list[np.ndarray], pieces: list[dict[str, Any]], switch_s: float,
                 rate: int = 22050) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Streams that change piece: for each in-collection piece ``a`` (in order) and the next
    one ``b``, the first ``switch_s`` of ``a``'s stream then ``b``'s stream from its start, as
    long as ``a``'s. Returns the streams and their (a, b) indices into ``pieces``."""
    ins = [k for k, p in enumerate(pieces) if p["true_id"] is not None]
    pairs = [(ins[k], ins[(k + 1) % len(ins)]) for k in range(len(ins))] if len(ins) > 1 else []
    cut = int(round(switch_s * rate))
    out = [np.concatenate([audio[a][:cut], audio[b][:max(0, audio[a].shape[0] - cut)]])
           for a, b in pairs]
    return out, pairs


def switch_outcome(rows: list[tuple], a: str, b: str, switch_s: float) -> dict[str, Any]:
    """Of a stream playing ``a`` then, from ``switch_s``, ``b``: whether ``a`` was decided by
    the switch; seconds after the switch until ``b`` first ranks top (``b_top_s``, when rows
    carry the top id as their 4th element), until ``b`` is decided (``redecide_s``) and until
    ``a`` is no longer (``withdraw_s``), None when never; whether anything else was decided
    after the switch (``third``)."""
    after = [(t, d) for t, d, *_ in rows if t > switch_s + 1e-9]
    return {"a_decided": any(d == a for t, d, *_ in rows if t <= switch_s + 1e-9),
            "b_top_s": next((r[0] - switch_s for r in rows if r[0] > switch_s + 1e-9
                             and len(r) > 3 and r[3] == b), None),
            "redecide_s": next((t - switch_s for t, d in after if d == b), None),
            "withdraw_s": next((t - switch_s for t, d in after if d != a), None),
            "third": any(d not in (a, b, None) for _, d in after)}


def switch_row(condition: str, replayed: list[list[tuple]], pairs: list[tuple[int, int]],
               switch_s: float, pieces: list[dict[str, Any]], within_s: float = 6.0) -> dict:
    """The table row of switching streams under one rule: ``n``, A decided by the switch %,
    B re-decided (median / p90 s after the switch, within ``within_s`` %), A withdrawn
    (median s, within ``within_s`` %), a third piece decided after the switch %."""
    outs = [switch_outcome(r, pieces[a]["true_id"], pieces[b]["true_id"], switch_s)
            for r, (a, b) in zip(replayed, pairs, strict=True)]
    red = np.array([o["redecide_s"] for o in outs if o["redecide_s"] is not None], float)
    top = [o["b_top_s"] for o in outs if o["b_top_s"] is not None]
    gone = [o["withdraw_s"] for o in outs if o["a_decided"]]
    return {"condition": condition, "n": len(outs), "switch s": switch_s,
            "A decided %": pct([o["a_decided"] for o in outs]),
            "median B top-1 s": float(np.median(top)) if top else math.nan,
            "median re-decide s": float(np.median(red)) if red.size else math.nan,
            "p90 re-decide s": float(np.percentile(red, 90)) if red.size else math.nan,
            f"re-decided in {within_s:g} s %": pct([o["redecide_s"] is not None
                                                    and o["redecide_s"] <= within_s
                                                    for o in outs]),
            "median A withdrawn s": float(np.median([g for g in gone if g is not None]))
            if any(g is not None for g in gone) else math.nan,
            f"A withdrawn in {within_s:g} s %": pct([g is not None and g <= within_s
                                                     for g in gone]),
            "third decided %": pct([o["third"] for o in outs])}


def pct(xs: list[bool]) -> float:
    return 100.0 * sum(xs) / len(xs) if xs else math.nan
