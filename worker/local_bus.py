"""The bus inside one process (:class:`InProcessBus`): the embedded single-process mode
(``midimatch serve`` without Redis) and unit tests. Same semantics as ``worker.redis_bus``."""

from __future__ import annotations

import asyncio
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
    owner: str | None = None
    lease_until: float = 0.0
    owned_before: bool = False
    finished: bool = False


class InProcessBus(Bus):
    """The bus inside one process: dicts and an asyncio condition, same semantics as Redis.

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
    """

    def __init__(self, *, retain_chunks: int = 4096, max_results: int = 1000,
                 lease_s: float = 5.0, retain_s: float | None = None,
                 session_ttl_s: float = 300.0, result_ttl_s: float = 120.0) -> None:
        self.retain_chunks = retain_chunks
        self.max_results = max_results
        self.lease_s = lease_s
        self.retain_s = retain_s
        self.session_ttl_s, self.result_ttl_s = session_ttl_s, result_ttl_s
        self._sessions: dict[str, _Session] = {}
        # id → (last heartbeat, capacity, notes, calibration)
        self._workers: dict[str, tuple[float, int, tuple[str, ...], dict | None]] = {}
        # Waiters are plain futures resolved on every change; no lock, and no asyncio.wait_for,
        # which on CPython 3.11 can swallow a cancellation that arrives as the wait completes
        # (a cancelled reader then kept waiting); an asyncio.Condition under wait_for also left
        # later waiters unwoken after a cancellation (seen in the gateway's tests).
        self._waiters: set[asyncio.Future] = set()
        self._ids = itertools.count(1)

    @classmethod
    def from_settings(cls, settings: BusSettings) -> InProcessBus:
        """The bus ``settings`` describe (as ``RedisBus.from_settings``; the URL and prefix are
        not used in process)."""
        return cls(lease_s=settings.lease_ms / 1000, retain_s=settings.retain_s,
                   max_results=settings.max_results, session_ttl_s=settings.session_ttl_s,
                   result_ttl_s=settings.result_ttl_s)

    async def _notify(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def _wait_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Return once ``ready()`` holds (checked after every change) or ``timeout_s`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not ready():
            left = deadline - loop.time()
            if left <= 0:
                return
            waiter = loop.create_future()
            self._waiters.add(waiter)
            timer = loop.call_later(left, lambda f=waiter: f.done() or f.set_result(None))
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiters.discard(waiter)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items()
                    if now - s.touched > (self.result_ttl_s if s.finished
                                          else self.session_ttl_s)]:
            del self._sessions[sid]

    def _get(self, session_id: str) -> _Session:
        self._expire()
        s = self._sessions.get(session_id)
        if s is None:
            raise BusError(f"unknown session {session_id!r}", reason="unknown_session")
        return s

    # ------------------------------------------------------------------ gateway side
    async def create_session(self, params: StreamParams, session_id: str | None = None) -> str:
        self._expire()
        sid = session_id or new_session_id()
        if sid in self._sessions:
            raise BusError(f"session {sid!r} exists", reason="session_exists")
        self._sessions[sid] = _Session(params, time.monotonic())
        await self._notify()
        return sid

    async def session_params(self, session_id: str) -> StreamParams | None:
        self._expire()
        s = self._sessions.get(session_id)
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
        s.next_seq, s.touched = chunk.seq + 1, time.monotonic()
        drop = len(s.audio) - self.retain_chunks
        if self.retain_s is not None:
            cut = chunk.t_s - self.retain_s
            drop = max(drop, next((i for i, c in enumerate(s.audio) if c.t_s >= cut), 0))
        if drop > 0:
            del s.audio[:drop]
        await self._notify()
        return True

    async def last_seq(self, session_id: str) -> int:
        return self._get(session_id).next_seq - 1

    async def end_session(self, session_id: str) -> None:
        self._expire()
        s = self._sessions.get(session_id)
        if s is not None and not s.ended:
            s.ended, s.touched = True, time.monotonic()
            await self._notify()

    async def read_results(self, session_id: str, after: str = "0",
                           timeout_s: float = 1.0) -> list[tuple[str, dict]]:
        key = result_id_key(after or "0")

        def pending() -> list[tuple[str, dict]]:
            s = self._get(session_id)
            return [(rid, r) for rid, r in s.results if result_id_key(rid) > key]

        out = pending()
        if out or timeout_s <= 0:
            return out
        await self._wait_until(lambda: bool(pending()), timeout_s)
        return pending()

    async def capacity(self) -> Capacity:
        self._expire()
        now = time.monotonic()
        alive = [(cap, notes, cal) for t, cap, notes, cal in self._workers.values()
                 if now - t <= self.lease_s]
        active = sum(1 for s in self._sessions.values() if not s.finished)
        notes = tuple(dict.fromkeys(n for _, ns, _ in alive for n in ns))
        return Capacity(len(alive), active, sum(c for c, _, _ in alive), notes,
                        distinct(cal for _, _, cal in alive))

    # ------------------------------------------------------------------ worker side
    async def heartbeat(self, worker_id: str, max_sessions: int,
                        notes: tuple[str, ...] = (), calibration: dict | None = None) -> None:
        self._workers[worker_id] = (time.monotonic(), int(max_sessions), tuple(notes),
                                    calibration)

    async def claim(self, worker_id: str, max_n: int, block_s: float = 0.0) -> list[Claim]:
        def claimable() -> list[tuple[str, _Session]]:
            now = time.monotonic()
            return [(sid, s) for sid, s in self._sessions.items()
                    if not s.finished and (s.owner is None or s.lease_until < now)][:max_n]

        if max_n <= 0:
            return []
        self._expire()
        found = claimable()
        if not found and block_s > 0:
            await self._wait_until(lambda: bool(claimable()), block_s)
            found = claimable()
        claims = []
        for sid, s in found:
            reclaimed = s.owned_before
            s.owner, s.owned_before = worker_id, True
            s.lease_until = time.monotonic() + self.lease_s
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
        self._expire()
        now = time.monotonic()
        return Workload(sum(1 for s in self._sessions.values() if not s.finished),
                        sum(cap for t, cap, _, _ in self._workers.values()
                            if now - t <= self.lease_s))

    async def publish_result(self, session_id: str, result: dict,
                             owner: str | None = None) -> str | None:
        s = self._get(session_id)
        if owner is not None and (s.owner != owner or s.finished):
            return None
        rid = f"{next(self._ids)}-0"
        s.results.append((rid, result))
        s.touched = time.monotonic()
        if len(s.results) > self.max_results:
            del s.results[: len(s.results) - self.max_results]
        await self._notify()
        return rid

    async def renew(self, worker_id: str, session_ids: list[str]) -> list[str]:
        self._expire()
        lost, until = [], time.monotonic() + self.lease_s
        for sid in session_ids:
            s = self._sessions.get(sid)
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
        await self._notify()

    async def retire(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def finish(self, worker_id: str, session_id: str) -> None:
        s = self._sessions.get(session_id)
        if s is not None and s.owner == worker_id:
            s.finished, s.ended, s.owner, s.audio = True, True, None, []
            s.touched = time.monotonic()
        await self._notify()
