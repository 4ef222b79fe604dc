"""Pieces through worker processes, each on a deadline, for :func:`model.training.data.prepare`.

Making pairs runs external synthesisers and library code that can hang or crash, and a prepare
run lasts hours: one piece must not stop it. Each piece runs under a ``SIGALRM`` deadline
(``piece_timeout_s``) and its failures come back as ``skipped`` records with a reason; a worker
process that dies costs its pieces one retry, and a pool that dies before finishing any piece
stops the run with a clear error instead of skipping everything.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from model.errors import MidimatchError
from model.midi import load_midi
from model.training.data_pair import make_pair


class _PieceTimeout(BaseException):
    """Not an Exception: library code's ``except Exception`` must not swallow the deadline."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _PieceTimeout


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _run_piece(task: dict[str, Any]) -> dict[str, Any]:
    """All draws of one piece in one split. Never raises: failures become ``skipped`` records."""
    out: dict[str, Any] = {"pairs": [], "skipped": []}
    use_alarm = threading.current_thread() is threading.main_thread()
    k, renderer = -1, None
    started = time.perf_counter()
    try:
        if use_alarm:  # interrupts Python code anywhere; render() kills its process on the way out
            # armed inside the try: an alarm firing before it would escape as an uncaught error
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, task["piece_timeout_s"])
        pm = load_midi(task["file"])
        rng = np.random.default_rng([task["seed"], *divmod(task["id"], 2**32), task["stream"]])
        order = rng.permutation(len(task["renderers"]))
        for k in range(task["draws"]):
            renderer = task["renderers"][order[k % len(order)]]
            t = time.perf_counter()
            try:
                a, m, info = make_pair(pm, renderer, rng, max_piece_s=task["max_piece_s"],
                                       augment=task["augment"], min_frames=task["min_frames"],
                                       timeout_s=task["render_timeout_s"],
                                       cache_dir=task["cache_dir"],
                                       augment_preset=task["augment_preset"],
                                       mix_pool=task["renderers"])
            except Exception as e:  # one bad draw must not stop the piece (a timeout does)
                out["skipped"].append(_skip(k, renderer, e))
                continue
            info["seconds"] = round(time.perf_counter() - t, 3)
            out["pairs"].append((a.astype(np.float16), m.astype(np.float16), info))
        # The alarm can be lost (a signal handler's exception raised inside a __del__ or a
        # callback is printed and dropped), so the deadline is also checked here.
        if time.perf_counter() - started > task["piece_timeout_s"]:
            out["pairs"] = []
            raise _PieceTimeout
    except _PieceTimeout:
        out["skipped"].append({"draw": k, "renderer": renderer, "reason": "timeout",
                               "error": f"piece ran past {task['piece_timeout_s']:g} s"})
    except Exception as e:  # an unreadable file: its reason goes to the report
        out["skipped"].append(_skip(k, renderer, e))
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return out


def _skip(draw: int, renderer: str | None, e: Exception) -> dict[str, Any]:
    reason = e.reason if isinstance(e, MidimatchError) else type(e).__name__
    return {"draw": draw, "renderer": renderer, "reason": reason, "error": str(e)[:300]}


def run_tasks(tasks: list[dict[str, Any]], workers: int
               ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(task, result) for every task. A worker that dies costs its tasks one retry, not the run."""
    if workers <= 0:
        for t in tasks:
            yield t, _run_piece(t)
        return
    pending, tries, futile = deque(tasks), Counter(), 0
    while pending:
        # spawn, not fork: the parent holds threads (tqdm's monitor, torch's pools).
        ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker)
        inflight: dict[Any, dict[str, Any]] = {}
        finished = False
        try:
            while pending or inflight:
                while pending and len(inflight) < 2 * workers:
                    inflight[ex.submit(_run_piece, pending[0])] = pending[0]
                    pending.popleft()  # only once submitted: a broken pool refuses submit()
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for f in done:
                    result = f.result()  # a broken pool raises here, f still in flight
                    finished = True
                    yield inflight.pop(f), result
        except BrokenProcessPool:
            futile = 0 if finished else futile + 1
            if futile >= 3:  # e.g. a __main__ without the spawn guard: stop, don't skip all
                raise MidimatchError("worker processes die before finishing any piece",
                                     reason="worker_start") from None
            for t in inflight.values():
                tries[t["stream_key"]] += 1
                if tries[t["stream_key"]] < 2:
                    pending.appendleft(t)
                else:
                    yield t, {"pairs": [], "skipped": [{"draw": -1, "renderer": None,
                              "reason": "worker_died", "error": "the worker process died"}]}
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
