"""The workers' registry in Redis, for ``RedisBus``: heartbeats (capacity, notes for the operator,
calibration), what ``/readyz`` and a worker's fair share read from them, and the workers'
consumers in the group (deleted on a clean shutdown, reaped once long dead and holding nothing).

Keys are named in :mod:`worker.redis_keys`. A heartbeat expires after ``lease_ms`` (Redis's clock);
a worker whose heartbeat is gone is dead, and readers drop it from the workers' set. Calls raise
the raw ``RedisError``; the bus maps it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from worker import redis_scripts as lua
from worker.bus import distinct
from worker.redis_keys import GROUP, RedisKeys


@dataclass(frozen=True)
class Alive:
    """The alive workers, as their heartbeats say."""

    workers: int
    capacity: int  # their advertised capacity, summed
    notes: tuple[str, ...]  # each note once
    calibrations: tuple[dict, ...]  # each calibration once


class WorkerRegistry:
    """Heartbeats and consumers of the workers of one key prefix (module docstring)."""

    def __init__(self, r: aioredis.Redis, keys: RedisKeys, lease_ms: int) -> None:
        self.r, self.keys, self.lease_ms = r, keys, int(lease_ms)
        self._forget = r.register_script(lua.FORGET)

    async def heartbeat(self, worker_id: str, max_sessions: int, notes: tuple[str, ...],
                        calibration: dict | None) -> None:
        """Raises ``OutOfMemoryError`` when Redis is full (maxmemory): it refuses ``SET`` and
        ``SADD`` then, so the heartbeat it had is extended as it was (``PEXPIRE``, which Redis
        still runs) and the worker stays alive for the gateways and the other workers."""
        k = self.keys
        try:
            async with self.r.pipeline(transaction=False) as p:
                p.set(k.worker_key(worker_id), int(max_sessions), px=self.lease_ms)
                if notes:
                    p.set(k.notes_key(worker_id), json.dumps(list(notes)), px=self.lease_ms)
                if calibration:
                    p.set(k.calibration_key(worker_id), json.dumps(calibration), px=self.lease_ms)
                p.sadd(k.workers_key, worker_id)
                await p.execute()
        except OutOfMemoryError:
            async with self.r.pipeline(transaction=False) as p:
                for key in k.worker_keys(worker_id):
                    p.pexpire(key, self.lease_ms)
                await p.execute()
            raise

    async def _live(self) -> tuple[list[str], list[bytes | None]]:
        """Registered workers and their heartbeats (None: dead, dropped from the set)."""
        k = self.keys
        workers = [w.decode() for w in await self.r.smembers(k.workers_key)]
        caps = await self.r.mget([k.worker_key(w) for w in workers]) if workers else []
        dead = [w for w, c in zip(workers, caps, strict=True) if c is None]
        if dead:
            await self.r.srem(k.workers_key, *dead)
        return workers, caps

    async def capacity(self) -> int:
        """The alive workers' advertised capacity, summed (cheap: every claim asks)."""
        _, caps = await self._live()
        return sum(int(c) for c in caps if c is not None)

    async def alive(self) -> Alive:
        """What ``/readyz`` shows of the workers."""
        k = self.keys
        workers, caps = await self._live()
        said = await self.r.mget([k.notes_key(w) for w in workers]) if workers else []
        cals = await self.r.mget([k.calibration_key(w) for w in workers]) if workers else []
        live = [int(c) for c in caps if c is not None]
        notes = tuple(dict.fromkeys(n for c, raw in zip(caps, said, strict=True)
                                    if c is not None and raw for n in json.loads(raw)))
        calibrations = distinct(json.loads(raw) for c, raw in zip(caps, cals, strict=True)
                                if c is not None and raw)
        return Alive(len(live), sum(live), notes, calibrations)

    async def retire(self, worker_id: str) -> None:
        """A clean shutdown: the heartbeat goes at once, the consumer too if it holds nothing."""
        k = self.keys
        async with self.r.pipeline(transaction=False) as p:
            p.delete(*k.worker_keys(worker_id))
            p.srem(k.workers_key, worker_id)
            await p.execute()
        with _no_group():
            await self._forget(keys=[k.sessions_key, k.worker_key(worker_id)],
                               args=[GROUP, worker_id])

    async def reap(self, idle_s: float) -> int:
        """Delete the consumers of dead workers idle for over ``idle_s`` and holding nothing;
        returns how many."""
        k, reaped = self.keys, 0
        with _no_group():
            for c in await self.r.xinfo_consumers(k.sessions_key, GROUP):
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if c["pending"] or c["idle"] < idle_s * 1000:
                    continue
                reaped += int(await self._forget(keys=[k.sessions_key, k.worker_key(name)],
                                                 args=[GROUP, name]))
        return reaped


@contextmanager
def _no_group() -> Iterator[None]:
    """No consumer group (nothing claimed since Redis started empty): no consumer to forget."""
    try:
        yield
    except ResponseError as e:
        if "NOGROUP" not in str(e) and "no such key" not in str(e):
            raise
