"""The bus inside one process (:class:`InProcessBus`): the embedded single-process mode
(``midimatch serve`` without Redis) and unit tests. Same semantics as ``worker.redis_bus``."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.bus import (
    AudioBatch,
    AudioChunk,
    Bus,
    BusError,
    Capacity,
    Claim,
    StreamParams,
    Workload,
    distinct,
    missing_after,
    new_session_id,
    result_id_key,
)
from worker.settings import BusSettings


@dataclass
class _Session:
    params: StreamParams
    touched: float  # monotonic time of the last gateway activity (or of finishing)
    audio: list[AudioChunk] = field(default_factory=list)
    next_seq: int = 0
    ended: bool = False
    results: list[tuple[str, dict]] = field(default_factory=list)
    # result_id_key of each of ``results``, same order (ascending): ``after`` is a bisection
    result_keys: list[tuple[int, int]] = field(default_factory=list)
    owner: str | None = None
    lease_until: float = 0.0
    owned_before: bool = False
    finished: bool = False
    attaches: int = 0  # the attach generation (``Bus.attach``)
    final_id: str | None = None  # the final result's id: nothing is stored after it
    # readers of this session's results waiting for the next one; only this session's
    # changes wake them
    waiters: set[asyncio.Future] = field(default_factory=set)


class InProcessBus(Bus):
    """The bus inside one process: dicts and futures to wait on, same semantics as Redis.

    Parameters
    ----------
    retain_chunks : int
        Audio chunks kept per session at most (the retained window a new owner rebuilds from).
    max_results : int
        Results kept per session for resuming clients.
    lease_s : float
        A worker that does not renew within this loses its sessions to the next ``claim``; a
        worker whose heartbeat is older counts as dead.
    retain_s : float | None
        Also drop chunks older than this much stream time before the newest one, s (as Redis).
    session_ttl_s : float
        A session is forgotten this long after the last gateway activity (audio, end, result).
    result_ttl_s : float
        A finished session's results stay readable this long.
    sweep_every_s : float
        Sessions past their time are forgotten by a scan of all sessions at most this often
        (a session asked for by id is checked on its own at every call, so none is served late).
    clock : callable
        Monotonic time, s (tests pass a fake one).

    Cost. Every gateway connection of the process waits on its session's results here, so
    nothing may cost per session on every message: a reader waits on its own session (only a
    result of that session, its end or finish wakes it, never another session's audio), finds
    what follows ``after`` by bisection of the parsed result ids, and the scan for expired
    sessions runs at most every ``sweep_every_s``, not on every call.
    """

    def __init__(self, *, retain_chunks: int = 4096, max_results: int = 1000,
                 lease_s: float = 5.0, retain_s: float | None = None,
                 session_ttl_s: float = 300.0, result_ttl_s: float = 120.0,
                 sweep_every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retain_chunks = retain_chunks
        self.max_results = max_results
        self.lease_s = lease_s
        self.retain_s = retain_s
        self.session_ttl_s, self.result_ttl_s = session_ttl_s, result_ttl_s
        self.sweep_every_s = sweep_every_s
        self._clock = clock
        self._swept_at = clock()
        self._sessions: dict[str, _Session] = {}
        # id → (last heartbeat, capacity, notes, calibration)
        self._workers: dict[str, tuple[float, int, tuple[str, ...], dict | None]] = {}
        # Waiters are plain futures; no lock, and no asyncio.wait_for, which on CPython 3.11 can
        # swallow a cancellation that arrives as the wait completes (a cancelled reader then
        # kept waiting); an asyncio.Condition under wait_for also left later waiters unwoken
        # after a cancellation (seen in the gateway's tests). Result readers wait on their
        # session's set (``_Session.waiters``); workers blocked in ``claim`` on this one, woken
        # by what makes a session claimable (created, released) and timed to the next lease
        # that lapses.
        self._claimers: set[asyncio.Future] = set()
        self._ids = itertools.count(1)
        self.wakeups = 0  # waiters woken by a change, all told (for tests of the cost above)

    @classmethod
    def from_settings(cls, settings: BusSettings) -> InProcessBus:
        """The bus ``settings`` describe (as ``RedisBus.from_settings``; the URL and prefix are
        not used in process)."""
        return cls(lease_s=settings.lease_ms / 1000, retain_s=settings.retain_s,
                   max_results=settings.max_results, session_ttl_s=settings.session_ttl_s,
                   result_ttl_s=settings.result_ttl_s)

    def _wake(self, waiters: set[asyncio.Future]) -> None:
        """Resolve ``waiters`` (each re-checks what it waits for) and empty the set."""
        woken = list(waiters)
        waiters.clear()
        for f in woken:
            if not f.done():
                f.set_result(None)
                self.wakeups += 1

    async def _wait_until(self, ready: Callable[[], bool], timeout_s: float,
                          waiters: set[asyncio.Future],
                          recheck_in: Callable[[], float | None] = lambda: None) -> None:
        """Return once ``ready()`` holds (checked whenever ``waiters`` are woken, and after
        ``recheck_in()`` s when that is not None: a change no call announces, a lease that
        lapses) or ``timeout_s`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not ready():
            left = deadline - loop.time()
            if left <= 0:
                return
            again = recheck_in()
            if again is not None:
                left = min(left, max(again, 0.001))
            waiter = loop.create_future()
            waiters.add(waiter)
            timer = loop.call_later(left, lambda f=waiter: f.done() or f.set_result(None))
            try:
                await waiter
            finally:
                timer.cancel()
                waiters.discard(waiter)

    def _expired(self, s: _Session, now: float) -> bool:
        return now - s.touched > (self.result_ttl_s if s.finished else self.session_ttl_s)

    def _sweep(self, force: bool = False) -> None:
        """Forget the sessions past their time: a scan of all, so at most every
        ``sweep_every_s`` unless ``force`` (the calls that count sessions scan them anyway)."""
        now = self._clock()
        if not force and now - self._swept_at < self.sweep_every_s:
            return
        self._swept_at = now
        for sid in [sid for sid, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[sid]

    def _live(self, session_id: str) -> _Session | None:
        """The session, None when unknown or past its time (then forgotten now): O(1)."""
        s = self._sessions.get(session_id)
        if s is not None and self._expired(s, self._clock()):
            del self._sessions[session_id]
            return None
        return s

    def _get(self, session_id: str) -> _Session:
        self._sweep()
        s = self._live(session_id)
        if s is None:
            raise BusError(f"unknown session {session_id!r}", reason="unknown_session")
        return s

    # ------------------------------------------------------------------ gateway side
    async def create_session(self, params: StreamParams, session_id: str | None = None) -> str:
        self._sweep()
        sid = session_id or new_session_id()
        if self._live(sid) is not None:
            raise BusError(f"session {sid!r} exists", reason="session_exists")
        self._sessions[sid] = _Session(params, self._clock())
        self._wake(self._claimers)
        return sid

    async def session_params(self, session_id: str) -> StreamParams | None:
        s = self._live(session_id)
        return None if s is None else s.params

    async def push_audio(self, session_id: str, chunk: AudioChunk) -> bool:
        s = self._get(session_id)
        if s.ended:
            raise BusError(f"session {session_id!r} has ended", reason="ended")
        if chunk.seq < s.next_seq:
            return False
        if chunk.seq > s.next_seq:
            raise BusError(f"chunk seq {chunk.seq} skips ahead: expected {s.next_seq}",
                           reason="bad_seq")
        if chunk.t_s < 0 or (s.audio and chunk.t_s < s.audio[-1].t_s):
            raise BusError(f"chunk t_s {chunk.t_s} is negative or before the previous chunk's",
                           reason="bad_seq")
        s.audio.append(chunk)
        s.next_seq, s.touched = chunk.seq + 1, self._clock()
        drop = len(s.audio) - self.retain_chunks
        if self.retain_s is not None:
            cut = chunk.t_s - self.retain_s
            drop = max(drop, next((i for i, c in enumerate(s.audio) if c.t_s >= cut), 0))
        if drop > 0:
            del s.audio[:drop]
        # Wakes no one: result readers wait for results, and workers poll their sessions'
        # audio (they block only in ``claim``, which audio does not change).
        return True

    async def last_seq(self, session_id: str) -> int:
        return self._get(session_id).next_seq - 1

    async def end_session(self, session_id: str) -> None:
        self._sweep()
        s = self._live(session_id)
        if s is not None and not s.ended:
            s.ended, s.touched = True, self._clock()
            self._wake(s.waiters)

    async def attach(self, session_id: str) -> int:
        s = self._get(session_id)
        s.attaches += 1
        return s.attaches

    async def end_detached(self, session_id: str, attach: int) -> bool:
        s = self._live(session_id)
        if s is None or s.ended or s.attaches != attach:
            return False
        await self.end_session(session_id)
        return True

    async def read_results(self, session_id: str, after: str = "0",
                           timeout_s: float = 1.0) -> list[tuple[str, dict]]:
        key = result_id_key(after or "0")
        s = self._get(session_id)

        def pending() -> list[tuple[str, dict]]:
            # O(log n): ``result_keys`` ascends (ids come from one counter)
            if not s.result_keys or s.result_keys[-1] <= key:
                return []
            return s.results[bisect.bisect_right(s.result_keys, key):]

        out = pending()
        if out or timeout_s <= 0:
            return out
        await self._wait_until(lambda: bool(pending()), timeout_s, s.waiters)
        self._get(session_id)  # unknown_session when it expired meanwhile
        return pending()

    async def capacity(self) -> Capacity:
        self._sweep(force=True)
        now = self._clock()
        alive = [(cap, notes, cal) for t, cap, notes, cal in self._workers.values()
                 if now - t <= self.lease_s]
        active = sum(1 for s in self._sessions.values() if not s.finished)
        notes = tuple(dict.fromkeys(n for _, ns, _ in alive for n in ns))
        return Capacity(len(alive), active, sum(c for c, _, _ in alive), notes,
                        distinct(cal for _, _, cal in alive))

    # ------------------------------------------------------------------ worker side
    async def heartbeat(self, worker_id: str, max_sessions: int,
                        notes: tuple[str, ...] = (), calibration: dict | None = None) -> None:
        self._workers[worker_id] = (self._clock(), int(max_sessions), tuple(notes),
                                    calibration)

    async def claim(self, worker_id: str, max_n: int, block_s: float = 0.0) -> list[Claim]:
        def claimable() -> list[tuple[str, _Session]]:
            now = self._clock()
            return [(sid, s) for sid, s in self._sessions.items()
                    if not s.finished and (s.owner is None or s.lease_until < now)
                    and not self._expired(s, now)][:max_n]

        def next_lapse_in() -> float | None:
            # a lease that lapses makes its session claimable with no call to announce it
            now = self._clock()
            held = [s.lease_until for s in self._sessions.values()
                    if not s.finished and s.owner is not None and s.lease_until >= now]
            return min(held) - now if held else None

        if max_n <= 0:
            return []
        self._sweep()
        found = claimable()
        if not found and block_s > 0:
            await self._wait_until(lambda: bool(claimable()), block_s, self._claimers,
                                   next_lapse_in)
            found = claimable()
        claims = []
        for sid, s in found:
            reclaimed = s.owned_before
            s.owner, s.owned_before = worker_id, True
            s.lease_until = self._clock() + self.lease_s
            claims.append(Claim(sid, s.params, reclaimed))
        return claims

    async def read_audio(self, session_id: str, after_seq: int, max_chunks: int = 256
                         ) -> AudioBatch:
        s = self._get(session_id)
        chunks = [c for c in s.audio if c.seq > after_seq][:max_chunks]
        last = chunks[-1].seq if chunks else after_seq
        return AudioBatch(chunks, s.ended and last >= s.next_seq - 1,
                          missing_after(after_seq, chunks))

    async def workload(self) -> Workload:
        self._sweep(force=True)
        now = self._clock()
        return Workload(sum(1 for s in self._sessions.values() if not s.finished),
                        sum(cap for t, cap, _, _ in self._workers.values()
                            if now - t <= self.lease_s))

    async def publish_result(self, session_id: str, result: dict,
                             owner: str | None = None) -> str | None:
        s = self._get(session_id)
        if owner is not None and (s.owner != owner or s.finished):
            return None
        if s.final_id is not None:  # the final is the session's last word (Bus contract)
            return s.final_id
        if s.results and s.results[-1][1] == result:  # the same call again: stored once
            return s.results[-1][0]
        n = next(self._ids)
        rid = f"{n}-0"
        s.results.append((rid, result))
        s.result_keys.append((n, 0))
        if result.get("final"):
            s.final_id = rid
        s.touched = self._clock()
        if len(s.results) > self.max_results:
            del s.results[: len(s.results) - self.max_results]
            del s.result_keys[: len(s.result_keys) - self.max_results]
        self._wake(s.waiters)
        return rid

    async def renew(self, worker_id: str, session_ids: list[str]) -> list[str]:
        self._sweep()
        lost, until = [], self._clock() + self.lease_s
        for sid in session_ids:
            s = self._live(sid)
            if s is None or s.finished or s.owner != worker_id:
                lost.append(sid)
            else:
                s.lease_until = until
        return lost

    async def release(self, worker_id: str, session_ids: list[str]) -> None:
        for sid in session_ids:
            s = self._sessions.get(sid)
            if s is not None and s.owner == worker_id:
                s.owner, s.lease_until = None, 0.0
        self._wake(self._claimers)

    async def retire(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def finish(self, worker_id: str, session_id: str) -> None:
        s = self._sessions.get(session_id)
        if s is not None and s.owner == worker_id:
            s.finished, s.ended, s.owner, s.audio = True, True, None, []
            s.touched = self._clock()
            self._wake(s.waiters)
