"""A process pool whose workers can be killed, for converting music21 works.

music21 has pathological inputs that run for minutes or crash the interpreter, and
``multiprocessing.Pool`` can neither bound one task's time nor survive a dead worker. Here each
worker converts one work at a time into a temporary file renamed into place when it is done;
the parent kills a worker that runs past ``timeout_s`` or dies, records that work as failed
(``timeout``, ``worker_died``) and starts a fresh worker, so one bad work costs a worker, never
the run. Workers are also replaced every ``max_tasks`` works: music21's caches only grow.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from model.errors import MidimatchError
from model.training.corpus_convert import _finish_midi

ConvertFn = Callable[[Path, int | None, Path], "dict[str, Any] | None"]
"""``convert_fn(source, number, out_path) -> info``: write one work as MIDI to ``out_path``."""


# --- one work, inside a worker ------------------------------------------------------------------


def _run_task(convert_fn: ConvertFn, task: dict[str, Any]) -> dict[str, Any]:
    final = Path(task["out_path"])
    tmp = _tmp_path(final, os.getpid())
    t0 = time.perf_counter()
    try:
        info = dict(convert_fn(Path(task["source"]), task["number"], tmp) or {})
        info.update(_finish_midi(tmp))
        os.replace(tmp, final)
        return {**_record(task, "done"), **info, "midi": final.name, "seconds": _since(t0)}
    except Exception as e:
        cause = e.__cause__ or e
        rec = _record(task, "failed", getattr(e, "reason", "convert_failed"))
        rec["error_type"] = type(cause).__name__
        rec["error"] = str(cause)[:300]
        return {**rec, "seconds": _since(t0)}
    finally:
        tmp.unlink(missing_ok=True)


def _worker_main(conn: Connection, convert_fn: ConvertFn) -> None:
    # The parent owns Ctrl-C and kills workers itself; music21 prints a warning per odd score,
    # which would shred the progress bar; failures reach the manifest anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    import warnings

    warnings.simplefilter("ignore")
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(("result", _run_task(convert_fn, task)))


# --- the parent: a pool whose workers can be killed ---------------------------------------------


@dataclass
class _Slot:
    proc: Any
    conn: Connection
    born: float
    task: dict[str, Any] | None = None
    started: float = 0.0
    done: int = 0
    ready: bool = False


def run_parallel(
    tasks: list[dict[str, Any]],
    convert_fn: ConvertFn,
    workers: int,
    timeout_s: float,
    max_tasks: int,
) -> Iterator[dict[str, Any]]:
    """Yield one record per task. Never hangs: each task and each worker start is bounded."""
    # spawn, not fork: the parent may hold threads (tqdm's monitor) and a fork copies their locks.
    ctx = mp.get_context("spawn")
    startup_s = max(timeout_s, 120.0)
    pending = deque(tasks)
    slots: list[_Slot] = []
    start_failures = 0
    try:
        while pending or any(s.task is not None for s in slots):
            while len(slots) < min(workers, len(pending) + sum(s.task is not None for s in slots)):
                slots.append(_spawn(ctx, convert_fn))
            for s in slots:
                if s.ready and s.task is None and pending:
                    s.task, s.started = pending.popleft(), time.monotonic()
                    s.conn.send(s.task)
            deadlines = [s.started + timeout_s if s.ready else s.born + startup_s for s in slots]
            pause = min(deadlines, default=time.monotonic() + 1) - time.monotonic()
            ready = wait([s.conn for s in slots], timeout=min(max(pause, 0.0), 1.0))
            for s in list(slots):
                if s.conn in ready:
                    try:
                        kind, payload = s.conn.recv()
                    except (EOFError, OSError):  # the worker died (segfault, OOM killer...)
                        start_failures += not s.ready
                        _kill(s)
                        slots.remove(s)
                        if s.task is not None:
                            code = s.proc.exitcode
                            yield _failed(s.task, "worker_died", f"worker exit code {code}")
                        continue
                    if kind == "ready":
                        s.ready, start_failures = True, 0
                        continue
                    yield payload
                    s.task, s.done = None, s.done + 1
                    if s.done >= max_tasks:
                        _kill(s, graceful=True)
                        slots.remove(s)
            now = time.monotonic()
            for s in list(slots):
                if s.task is not None and now - s.started > timeout_s:
                    _kill(s)
                    slots.remove(s)
                    _tmp_path(Path(s.task["out_path"]), s.proc.pid).unlink(missing_ok=True)
                    rec = _failed(s.task, "timeout", f"killed after {timeout_s:g} s")
                    yield {**rec, "seconds": round(now - s.started, 3)}
                elif not s.ready and now - s.born > startup_s:
                    start_failures += 1
                    _kill(s)
                    slots.remove(s)
            if start_failures >= 3:
                raise MidimatchError("conversion workers fail to start", reason="worker_start")
    finally:
        for s in slots:
            _kill(s)


def _spawn(ctx: Any, convert_fn: ConvertFn) -> _Slot:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_main, args=(child, convert_fn), daemon=True)
    proc.start()
    child.close()  # so that the parent's recv() sees EOF when the worker dies
    return _Slot(proc=proc, conn=parent, born=time.monotonic())


def _kill(slot: _Slot, *, graceful: bool = False) -> None:
    if graceful:
        try:
            slot.conn.send(None)
            slot.proc.join(timeout=5)
        except (OSError, ValueError):
            pass
    if slot.proc.is_alive():
        slot.proc.kill()
    slot.proc.join(timeout=5)
    slot.conn.close()


# --- small helpers ------------------------------------------------------------------------------


def _record(task: dict[str, Any], status: str, reason: str | None = None) -> dict[str, Any]:
    rec = {k: task[k] for k in ("key", "source", "number", "collection")}
    rec["status"] = status
    if reason is not None:
        rec["reason"] = reason
    return rec


def _failed(task: dict[str, Any], reason: str, error: str) -> dict[str, Any]:
    return {**_record(task, "failed", reason), "error_type": reason, "error": error}


def _tmp_path(final: Path, pid: int) -> Path:
    return final.with_name(f".{final.name}.{pid}.tmp")


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 4)
