"""The answers midimatch gives about a piece of audio, and the one wording of each.

Every way of asking — ``midimatch identify`` (:mod:`index.cli`), a stream (the worker puts the
answer in the final result: :func:`answer`; ``midimatch stream`` and the page show it) and
``midimatch eval`` (each query's outcome) — ends with one of these kinds:

* ``identified``: the top match is confident (:mod:`index.decision`);
* ``not_in_collection``: audio was searched and no piece is confident — a normal answer;
* ``silent``: the part searched (the last 20 s, ``index.search``) is under -60 dBFS RMS, so
  there is nothing to identify — a normal answer too, not an error;
* ``too_short``: audio, not silent, but shorter than the shortest query the cascade searches
  (``CascadeConfig.min_query_frames``, 2 s): nothing was searched, so it is neither identified
  nor "not in the collection" — an answer as well. Silence is checked first, as identify does.

Failures (a missing or unreadable file, a service error) are errors, not answers. This module
imports nothing, so every layer above it may use it (the gateway, which must not load torch
or numba, included).
"""

from __future__ import annotations

__all__ = ["ANSWERS", "IDENTIFIED", "NOT_IN_COLLECTION", "SILENT", "TOO_SHORT", "answer",
           "answer_line", "clock", "stream_answer"]

IDENTIFIED = "identified"
NOT_IN_COLLECTION = "not_in_collection"
SILENT = "silent"
TOO_SHORT = "too_short"
# kind → its words, the same in identify's lines, the stream client's final line and the page
ANSWERS = {
    IDENTIFIED: "identified",
    NOT_IN_COLLECTION: "not in the collection",
    SILENT: "silent: nothing to identify",
    TOO_SHORT: "too short to identify: under 2 s of music",
}


def answer(kind: str) -> dict:
    """The ``answer`` object of a final stream result and of identify's JSON:
    ``{"kind": kind, "text": its words}``."""
    if kind not in ANSWERS:
        raise ValueError(f"unknown answer kind {kind!r}; known: {', '.join(ANSWERS)}")
    return {"kind": kind, "text": ANSWERS[kind]}


def stream_answer(identified: bool, silent: bool, too_short: bool = False) -> str:
    """The kind of a stream's final answer: identified when it ends with a decision, else silent
    when its query window is silent, else too short when it never had a query long enough to
    search, else not in the collection (the order identify's checks give: a silent query is
    never searched, so it is never identified)."""
    return (IDENTIFIED if identified else SILENT if silent else TOO_SHORT if too_short
            else NOT_IN_COLLECTION)


def answer_line(kind: str, title: str | None = None, position_s: float | None = None) -> str:
    """The answer in words: ``identified: TITLE at m:ss`` (with ``title`` and ``position_s``),
    else the kind's words. identify adds its confidence detail after it."""
    if kind == IDENTIFIED and title is not None:
        return f"{ANSWERS[kind]}: {title} at {clock(position_s or 0.0)}"
    return answer(kind)["text"]


def clock(seconds: float) -> str:
    """m:ss (h:mm:ss from an hour), rounded to the second: 1:23 for 83.4 s."""
    total = int(round(max(0.0, seconds)))
    h, m, sec = total // 3600, total // 60 % 60, total % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
