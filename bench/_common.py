"""Shared helpers for the benchmark scripts: machine description and table printing."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"


def best_time(fn: Callable[[], object], repeat: int, *, warmup: bool = True) -> float:
    """Seconds of the fastest of ``repeat`` calls, after one warm-up call (JIT, caches)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Format a list of dicts as a Markdown table (so it can be pasted into docs as is)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
            for row in cells]
    return "\n".join([line, sep, *body])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def query_cells(cascade, sets: dict, renderers: list[str], cells: list[tuple[str, float]],
                max_queries: int = 0):
    """For each renderer's query set (``sets``: name → folder, :func:`bench.engines.query_sets`)
    and each ``(condition, length_s)`` cell: ``(renderer, condition, length_s, queries, frames,
    refs_of, selected)`` — ``selected`` the indices of that cell's in-collection queries (the
    first ``max_queries`` when given), ``refs_of`` each query's true reference in ``cascade``."""
    from index.evaluation.evalset import load_queries
    from index.evaluation.evaluate import true_refs

    for name in renderers:
        queries, frames = load_queries(sets[name])
        refs_of = true_refs(cascade.index.refs, queries)
        for cond, length in cells:
            sel = [i for i, q in enumerate(queries)
                   if q["condition"] == cond and float(q["length_s"]) == length
                   and refs_of[i] is not None]
            yield name, cond, length, queries, frames, refs_of, sel[: max_queries or None]
