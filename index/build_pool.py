"""The index build's worker processes: encode files in parallel and survive a worker's death.

One job: run :func:`index.build.encode_file` over many files in a pool of spawned processes and
hand back each file's result or the reason it was skipped. ``multiprocessing.Pool`` waited
forever for the task of a worker that died (the out-of-memory killer's SIGKILL, a crash in
native code): the build hung at 0 % CPU. ``concurrent.futures.ProcessPoolExecutor`` notices the
death at once and fails every unfinished task with ``BrokenProcessPool``; from there:

* each worker marks the file it is encoding in a shared array (its pid while it runs, -1 when
  done), so the files in flight when the pool broke are known. They are retried **one at a time
  in a fresh one-worker pool**: a file that kills that worker too is skipped with reason
  ``worker_died`` (it killed its worker twice); the others, bystanders stopped with the pool, are
  encoded;
* the files not started yet go on in a fresh pool of ``workers``.

A build thus ends after at most ``2 × deaths + 1`` pool starts. Pools that die twice in a row
without encoding or being caught on any file (a worker that cannot even load the model) stop the
build with ``MidimatchError(reason="workers_died")`` instead of retrying forever.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from model.errors import MidimatchError

logger = logging.getLogger(__name__)

#: (path, sha256, size in bytes, mtime): one file to encode.
Task = tuple[str, str, int, float]
#: ("ok", ref, hashes, embeddings, starts) or ("skip", {"path", "reason", "message"}).
Result = tuple
# A fresh pool after this many files per worker bounds any slow leak in a worker. Not
# ProcessPoolExecutor's max_tasks_per_child: on CPython 3.11-3.13 (before gh-115634's fix) a
# pool whose workers retire stops replacing them and hangs with no process left — an index
# build of the eval set stopped at 1,000 of 2,133 files that way.
_MAX_TASKS_PER_CHILD = 500

# --------------------------------------------------------------------------- in the workers
_ENCODER = None
_OPTS = None
_MARKS = None  # shared int64 per task of the pass: 0 not started, pid running, -1 done


def _init_worker(opts, marks) -> None:
    import torch

    from index.build import _load_encoder

    global _ENCODER, _OPTS, _MARKS
    torch.set_num_threads(1)  # one process per core; threads would only fight
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _ENCODER, _OPTS, _MARKS = _load_encoder(opts), opts, marks


def _use_here(opts) -> None:
    """Set up this process as a worker (the in-process path of a one-worker build)."""
    from index.build import _load_encoder

    global _ENCODER, _OPTS
    _ENCODER, _OPTS = _load_encoder(opts), opts


class _FileTimeout(BaseException):
    """The per-file alarm. Not an ``Exception``: no ``except Exception`` on the way (the
    encoder's, :func:`_encode`'s) may take it for a bad file."""


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _FileTimeout


def _encode_task(task: Task) -> Result:
    """Encode one file under the per-file timeout; never raises for a bad file.

    The alarm is armed and disarmed inside the ``try`` that catches it, so wherever it strikes
    (before the file is opened, in an ``except`` clause, while being disarmed) the file is
    skipped with reason ``timeout``; none escapes to stop the build.
    """
    assert _OPTS is not None
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, _OPTS.file_timeout_s)
            return _encode(task)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _FileTimeout:
        return "skip", {"path": task[0], "reason": "timeout",
                        "message": f"gave up after {_OPTS.file_timeout_s:g} s"}
    finally:
        signal.signal(signal.SIGALRM, old)


def _encode(task: Task) -> Result:
    from index.build import encode_file

    path, sha, size, mtime = task
    try:
        ref, hashes, emb, starts = encode_file(Path(path), _ENCODER, _OPTS.method)
        ref.update(sha256=sha, size_bytes=size, mtime=mtime)
        return "ok", ref, hashes, emb, starts
    except MidimatchError as e:
        return "skip", {"path": path, "reason": e.reason, "message": e.message}
    except Exception as e:  # one bad file must never take the build down
        logger.exception("unexpected failure on %s", path)
        return "skip", {"path": path, "reason": "internal", "message": f"{type(e).__name__}: {e}"}


def _marked(fn: Callable[[Task], Result], i: int, task: Task) -> Result:
    _MARKS[i] = os.getpid()
    try:
        return fn(task)
    finally:
        _MARKS[i] = -1


# --------------------------------------------------------------------------- in the parent
def run_tasks(todo: list[Task], opts, on_result: Callable[[Result], None]) -> int:
    """Encode every task, calling ``on_result`` once per file (in completion order).

    ``opts.workers`` processes (spawned: the parent has torch and its thread pools loaded), or
    this process when one is enough. Returns the number of worker deaths survived.

    Raises
    ------
    MidimatchError
        ``workers_died``: pools died twice in a row without getting through any file.
    """
    workers = max(1, min(opts.workers, len(todo)))
    if workers == 1:  # in this process: no start-up cost, and easy to debug
        _use_here(opts)
        for task in todo:
            on_result(_encode_task(task))
        return 0
    deaths = fruitless = 0
    queue, suspects = list(todo), []
    per_pool = workers * _MAX_TASKS_PER_CHILD
    while queue or suspects:
        alone = bool(suspects)
        batch, rest = (suspects, []) if alone else (queue[:per_pool], queue[per_pool:])
        broken = _pass(batch, 1 if alone else workers, opts, on_result)
        if broken is None:
            suspects, queue = ([], queue) if alone else (suspects, rest)
            continue
        in_flight, not_started, n_done = broken
        not_started += rest
        deaths += 1
        if alone:
            for path, *_ in in_flight:
                on_result(("skip", {
                    "path": path, "reason": "worker_died",
                    "message": "the worker process encoding it died twice, the second time "
                               "alone (killed by a signal, e.g. the out-of-memory killer)"}))
            suspects = not_started
        else:
            suspects, queue = in_flight, not_started
        logger.warning(
            "an index build worker died%s: %d file(s) it may have been encoding retried one at "
            "a time, %d not started go on in a fresh pool",
            " encoding a file retried alone" if alone and in_flight else "",
            len(suspects), len(queue))
        fruitless = 0 if n_done or in_flight else fruitless + 1
        if fruitless >= 2:
            raise MidimatchError(
                f"the index build's worker processes died {deaths} times, the last two without "
                "getting through any file (can a worker load the model? is memory short?)",
                reason="workers_died")
    return deaths


def _pass(tasks: list[Task], workers: int, opts, on_result: Callable[[Result], None]
          ) -> tuple[list[Task], list[Task], int] | None:
    """Run ``tasks`` in a fresh pool. None when every one finished; after a worker's death,
    (the tasks in flight, the tasks not started or whose result was lost, results received)."""
    ctx = mp.get_context("spawn")
    marks = ctx.RawArray("q", len(tasks))
    n_done, lost = 0, []
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(opts, marks)) as pool:
        # _encode_task looked up here, at submission, so a test can swap it for one that dies.
        futures = {pool.submit(_marked, _encode_task, i, t): i for i, t in enumerate(tasks)}
        for fut in as_completed(futures):
            try:
                res = fut.result()
            except BrokenProcessPool:
                lost.append(futures[fut])
                continue
            n_done += 1
            on_result(res)
    if not lost:
        return None
    lost.sort()
    in_flight = [tasks[i] for i in lost if marks[i] > 0]
    return in_flight, [tasks[i] for i in lost if marks[i] <= 0], n_done
