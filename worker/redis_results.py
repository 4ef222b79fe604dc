"""The gateway side of result reads over Redis: one dispatcher per :class:`RedisBus`.

A gateway has a ``read_results`` call in flight for every open websocket, most of them waiting.
Waiting with one ``XREAD BLOCK`` each would hold one pooled connection per waiting session (and
redis-py 8's pool refuses more than 100 by default), so :class:`ResultsDispatcher` does two
things for all of them together:

* **Looks** (``EXISTS meta`` + ``XRANGE results (after +``, what a call does first) made in the same
  event-loop iteration, or while the previous batch is on the wire, go out as one pipeline: one
  connection and one round trip however many sessions look at once. At most ``MAX_LOOKS`` looks
  per pipeline; batches go one after another.
* **Waits**: a background task, started on the first wait and ending when nothing is watched,
  issues one ``XREAD BLOCK block_ms`` over every watched results key. A key's XREAD id is the
  smallest ``after`` of its waiters (so nothing between a waiter's look and its registration is
  missed), and each waiter gets the entries strictly after its own ``after``; any number of
  waiters may watch one key. The block is short (100 ms) because a key registered while an XREAD
  is blocked joins only on the next one; an entry for it is not lost (its id is read from the
  waiter's ``after``), it waits at most ``block_ms`` longer.

Keys per XREAD: at most ``max_keys`` (1000). Beyond that the keys are split into chunks of 1000,
each read by its own XREAD at the same time (one connection per chunk, so still about
``watched / 1000`` connections), and the next round starts when every chunk has returned: an
entry for a chunk that already returned may wait up to ``block_ms`` more. 1000 keys keep one
command's arguments (~2000 of them) and Redis's per-call scan and block registration of every key
short.

Cost. Every round re-sends every watched key (a waiter leaves when served and comes back after
its next look), so a round costs O(watched keys) on both sides: about 4 ms for 1000 keys on a
loaded 2-core test machine. On a busy gateway some key has news all the time and an XREAD returns
at once, so rounds start at most every ``min_round_ms`` (20 ms: ≤ 50 rounds/s, and a result
waits at most 20 ms more). That is the price of one connection instead of one per session; for
many thousands of sessions per gateway, a per-gateway notification stream would scale better.

Errors. A Redis error in a look fails the calls of that batch; one in an XREAD fails the waiters
of that chunk that were registered when it was sent (later ones are read again on the next
round). Callers get the raw :class:`redis.exceptions.RedisError` and map it (``RedisBus`` turns it
into ``BusError`` ``redis_unavailable``, as every other call). redis-py reconnects on its own, so
the next look or wait works again once Redis is back. A cancelled or timed-out waiter just leaves
the table: nothing else waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from worker.bus import BusError, result_id_key

BLOCK_MS = 100  # one XREAD's block: how long a newly watched key may wait to join
MAX_KEYS = 1000  # keys per XREAD (see the module docstring)
MAX_LOOKS = 1000  # looks per pipeline (two commands each)
MIN_ROUND_MS = 20  # a busy gateway re-sends its key list at most 50 times a second

Entry = tuple[bytes, dict]  # (stream entry id, fields), as redis-py returns them


def _key_of(entry_id: bytes | str) -> tuple[int, int]:
    return result_id_key(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)


@dataclass(eq=False)
class _Look:
    meta_key: str
    key: str
    after: str
    fut: asyncio.Future


@dataclass(eq=False)
class _Waiter:
    key: str
    after: str
    after_key: tuple[int, int]
    n: int  # registration number: which XREADs it was part of
    fut: asyncio.Future = field(repr=False)


class ResultsDispatcher:
    """Batched looks and one shared blocking XREAD for every ``read_results`` of one client.

    Parameters
    ----------
    r : redis.asyncio.Redis
        The bus's client (``decode_responses=False``).
    block_ms : int
        Block of each XREAD.
    max_keys : int
        Keys per XREAD; more are split into concurrent XREADs.
    min_round_ms : int
        Shortest time from one XREAD round to the next (see the module docstring).
    """

    def __init__(self, r: aioredis.Redis, *, block_ms: int = BLOCK_MS,
                 max_keys: int = MAX_KEYS, min_round_ms: int = MIN_ROUND_MS) -> None:
        self.r, self.block_ms, self.max_keys = r, int(block_ms), int(max_keys)
        self.min_round_ms = int(min_round_ms)
        self._looks: list[_Look] = []
        self._look_task: asyncio.Task | None = None
        self._waiters: dict[str, list[_Waiter]] = {}  # results key → its waiters
        self._task: asyncio.Task | None = None
        self._n = 0

    @property
    def watched(self) -> int:
        """Results keys being waited on now."""
        return len(self._waiters)

    @property
    def running(self) -> bool:
        """True while the XREAD task is alive."""
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ looks
    async def look(self, meta_key: str, key: str, after: str) -> tuple[bool, list[Entry]]:
        """Whether ``meta_key`` exists, and the entries of ``key`` after ``after`` (``"0"``: all).

        Raises the :class:`~redis.exceptions.RedisError` of the pipeline it went out in."""
        loop = asyncio.get_running_loop()
        look = _Look(meta_key, key, after, loop.create_future())
        if not _alive(self._look_task, loop):
            self._forget_other_loops(loop)
        self._looks.append(look)
        if not _alive(self._look_task, loop):
            self._look_task = loop.create_task(self._run_looks(), name="results-looks")
        return await look.fut

    async def _run_looks(self) -> None:
        while self._looks:
            batch = [x for x in self._looks[:MAX_LOOKS] if not x.fut.done()]
            del self._looks[:MAX_LOOKS]
            if not batch:
                continue
            try:
                async with self.r.pipeline(transaction=False) as p:
                    for x in batch:
                        p.exists(x.meta_key)
                        p.xrange(x.key, min=f"({x.after}" if x.after != "0" else "-")
                    out = await p.execute(raise_on_error=False)
            except asyncio.CancelledError:  # close(): this batch is no longer in _looks
                for x in batch:
                    _settle(x.fut, error=BusError("the bus was closed", reason="closed"))
                raise
            except Exception as e:  # noqa: BLE001 - handed to the callers, who map it
                for x in batch:
                    _settle(x.fut, error=e)
                continue
            for i, x in enumerate(batch):
                exists, got = out[2 * i], out[2 * i + 1]
                err = next((v for v in (exists, got) if isinstance(v, Exception)), None)
                _settle(x.fut, error=err, value=(bool(exists), got or []))

    # ------------------------------------------------------------------ waits
    async def wait(self, key: str, after: str, timeout_s: float) -> list[Entry]:
        """Entries of ``key`` strictly after ``after`` that arrive within ``timeout_s`` ([] when
        none does). The caller has looked first: nothing after ``after`` was there.

        Raises the :class:`~redis.exceptions.RedisError` of the XREAD it was part of, or
        ``BusError`` ``closed`` when the bus is closed meanwhile."""
        loop = asyncio.get_running_loop()
        if not _alive(self._task, loop):
            self._forget_other_loops(loop)
        self._n += 1
        w = _Waiter(key, after, result_id_key(after), self._n, loop.create_future())
        self._waiters.setdefault(key, []).append(w)
        if not _alive(self._task, loop):
            self._task = loop.create_task(self._run(), name="results-dispatcher")
        try:
            await asyncio.wait([w.fut], timeout=timeout_s)
            return w.fut.result() if w.fut.done() else []
        finally:
            self._drop(w)
            if not w.fut.done():
                w.fut.cancel()
            elif not w.fut.cancelled():
                w.fut.exception()  # retrieved, even when the caller was cancelled meanwhile

    def _drop(self, w: _Waiter) -> None:
        ws = self._waiters.get(w.key)
        if ws is not None:
            with contextlib.suppress(ValueError):
                ws.remove(w)
            if not ws:
                del self._waiters[w.key]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiters:
            started, n = loop.time(), self._n
            try:
                ids = {key: min(ws, key=lambda w: w.after_key)
                       for key, ws in self._waiters.items()}
                items = [(key, w.after, w.after_key) for key, w in ids.items()]
                chunks = [items[i:i + self.max_keys] for i in range(0, len(items), self.max_keys)]
                await asyncio.gather(*(self._read(c, n) for c in chunks))
            except Exception as e:  # noqa: BLE001 - a bug here must not leave waiters hanging
                for w in [w for ws in self._waiters.values() for w in ws if w.n <= n]:
                    _settle(w.fut, error=e)
                    self._drop(w)
            rest = started + self.min_round_ms / 1000 - loop.time()
            if rest > 0 and self._waiters:
                await asyncio.sleep(rest)

    async def _read(self, chunk: list[tuple[str, str, tuple[int, int]]], n: int) -> None:
        try:
            res = await self.r.xread({key: after for key, after, _ in chunk},
                                     block=self.block_ms)
        except Exception as e:  # noqa: BLE001 - handed to the waiters, who map it
            for key, _, _ in chunk:
                for w in list(self._waiters.get(key, ())):
                    if w.n <= n:
                        _settle(w.fut, error=e)
                        self._drop(w)
            return
        used = {key: after_key for key, _, after_key in chunk}
        if isinstance(res, dict):  # RESP3: {key: [entries]}
            pairs = [(key, v[0] if v else []) for key, v in res.items()]
        else:  # RESP2: [[key, entries], ...]; None on timeout
            pairs = res or []
        for key, entries in pairs:
            k = key.decode() if isinstance(key, bytes) else key
            self._deliver(k, used.get(k), [(eid, f) for eid, f in entries])

    def _deliver(self, key: str, read_from: tuple[int, int] | None, entries: list[Entry]) -> None:
        if read_from is None or not entries:
            return
        keyed = [(_key_of(eid), (eid, f)) for eid, f in entries]
        for w in list(self._waiters.get(key, ())):
            # A waiter registered during this XREAD with an earlier ``after`` than the id read
            # from might miss entries in between: it is served by the next round instead.
            if w.after_key < read_from or w.fut.done():
                continue
            mine = [e for k, e in keyed if k > w.after_key]
            if mine:
                _settle(w.fut, value=mine)
                self._drop(w)

    def _forget_other_loops(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drop looks and waiters left by an event loop that is gone (a bus reused under a new
        ``asyncio.run``): their futures can no longer be settled."""
        self._looks = [x for x in self._looks if x.fut.get_loop() is loop]
        for key in list(self._waiters):
            self._waiters[key] = [w for w in self._waiters[key] if w.fut.get_loop() is loop]
            if not self._waiters[key]:
                del self._waiters[key]

    # ------------------------------------------------------------------ closing
    async def close(self) -> None:
        """Stop both tasks; calls still waiting get ``BusError`` ``closed``. A later call starts
        the tasks again."""
        loop = asyncio.get_running_loop()
        tasks = [t for t in (self._task, self._look_task) if _alive(t, loop)]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._look_task = None
        self._forget_other_loops(loop)
        err = BusError("the bus was closed", reason="closed")
        for x in self._looks:
            _settle(x.fut, error=err)
        for ws in self._waiters.values():
            for w in ws:
                _settle(w.fut, error=err)
        self._looks.clear()
        self._waiters.clear()


def _alive(task: asyncio.Task | None, loop: asyncio.AbstractEventLoop) -> bool:
    return task is not None and not task.done() and task.get_loop() is loop


def _settle(fut: asyncio.Future, *, error: BaseException | None = None,
            value: object = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
