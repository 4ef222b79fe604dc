"""The bus over Redis streams: any number of gateways and workers.

Every key is named in :mod:`worker.redis_keys` (the layout is documented there); audio reads are
:mod:`worker.redis_audio`'s, result reads :mod:`worker.redis_results`'s, the workers' heartbeats and
consumers :mod:`worker.redis_workers`'s, every check-and-act on a session a Lua script of
:mod:`worker.redis_scripts`.

Leases. The lease is the PEL entry's idle time: the owner resets it with ``XCLAIM … 0 … JUSTID``
(``renew``, a Lua script that first checks the entry is still in *its* PEL, so a worker whose
lease lapsed and was taken over can never steal it back). A worker that stops renewing loses the
entry to the next ``claim`` by anyone (``XAUTOCLAIM`` with min-idle ``lease_ms``). ``release``
acks the entry and queues a fresh one so another worker claims it at once; ``finish`` acks and
deletes it. Ownership checks and their effects run in one Lua script each, atomically, and
``publish_result`` is one of them (fenced): a worker whose lease was taken over cannot publish,
even before its next ``renew`` tells it.

A session whose stored parameters do not parse is claimed all the same, as a ``Claim`` with an
``error``, so the rest of the batch goes on; the worker fails it (an error result) and finishes it.

Consumers. A worker that shuts down cleanly calls ``retire``: its heartbeat keys go at once (its
capacity leaves ``/readyz``) and its consumer is deleted from the group if its PEL is empty.
``reap`` deletes the consumers of dead workers (no heartbeat) idle for long, PEL empty.

Sequence numbers. ``push_audio`` (a Lua script) appends only the next ``seq``: a duplicate is
ignored (returns False; a client re-sending after a reconnect is harmless), a gap is an error.
Workers read after the last seq they applied, so nothing is lost or applied twice.

Expiry. Every session key expires ``session_ttl_s`` after the last gateway activity (audio, end,
result), so sessions abandoned by a dead gateway vanish; a finished session keeps its results and
meta for ``result_ttl_s``. A session whose keys expired is reported lost by ``renew``.

Redis restart (no persistence): every session is gone. Gateways get ``unknown_session`` from
``push_audio``/``read_results``, workers get all their sessions back from ``renew`` as lost and
drop them; the consumer group is re-created on the next ``claim``. While Redis is unreachable
every call raises :class:`~worker.bus.BusError` with reason ``redis_unavailable``; redis-py
reconnects by itself once it is back. A command not answered within ``timeout_s`` (a frozen Redis,
a dead host) fails the same way, after that long and without a retry; blocking reads (the
claim's ``XREADGROUP BLOCK``, the dispatcher's ``XREAD BLOCK``) block for at most half of it, so
they never time out while Redis is well. A command Redis answers with an error (``ResponseError``:
a bug, not an outage) raises reason ``redis_error``.

Redis full (``maxmemory`` reached under ``noeviction``, as docs/deploy.md configures it): Redis
refuses every command that may grow its memory (``OOM command not allowed...``) and runs the
others, so nothing is lost, new data is just not taken. Those calls raise reason ``redis_full``
(retry later, like ``redis_unavailable``): creating a session, audio, an end, a result. A script
is refused at its first such write, before any effect, so each call is all or nothing. What only
acks, trims, claims or expires goes on: reads, ``renew``, ``release``, ``finish``, ``reap``; the
heartbeat, refused, extends the last one it wrote instead (``PEXPIRE``), so a worker is not
taken for dead while Redis is full. A claim whose adoption of a session is refused returns the
sessions it adopted before (the rest stay pending and are claimed again after the lease).

Result reads (gateway side) go through one :class:`~worker.redis_results.ResultsDispatcher`
per bus: looks batched into one pipeline, waits served by one shared short ``XREAD BLOCK``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from worker import redis_scripts as lua
from worker.bus import (
    AudioBatch,
    AudioChunk,
    Bus,
    BusError,
    Capacity,
    Claim,
    StreamParams,
    Workload,
    new_session_id,
    result_id_key,
)
from worker.redis_audio import AudioReader, seq_of
from worker.redis_keys import GROUP, RedisKeys
from worker.redis_results import BLOCK_MS, ResultsDispatcher
from worker.redis_workers import WorkerRegistry
from worker.settings import BusSettings

logger = logging.getLogger(__name__)
_DEFAULTS = BusSettings()


@contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except BusError:
        raise
    except OutOfMemoryError as e:  # at maxmemory (noeviction): no writes that grow it, for now
        raise BusError(f"Redis is full (maxmemory) and refuses writes: {e}",
                       reason="redis_full") from e
    except ResponseError as e:  # Redis answered and refused the command: a bug, not an outage
        raise BusError(f"Redis refused a command: {e}", reason="redis_error") from e
    except RedisError as e:  # unreachable, timed out, loading: retry later
        raise BusError(f"Redis failed: {type(e).__name__}: {e}",
                       reason="redis_unavailable") from e


def _params(sr: bytes | None, ch: bytes | None, enc: bytes | None) -> StreamParams:
    """Stream parameters as stored in a meta hash. Raises ``BusError`` ``bad_params``."""
    return StreamParams.from_dict({"sample_rate": sr, "channels": ch or 1,
                                   "encoding": (enc or b"pcm_s16le").decode(errors="replace")})


class RedisBus(RedisKeys, Bus):
    """:class:`~worker.bus.Bus` over Redis streams (module docstring; keys in
    :mod:`worker.redis_keys`).

    Parameters
    ----------
    url : str
        ``redis://host:port/db``; ignored when ``client`` is given.
    prefix : str
        First part of every key, so several deployments can share one Redis.
    lease_ms : int
        A session whose owner has not renewed for this long is claimable by any worker; a worker
        whose heartbeat is older counts as dead. Owners renew every ``lease_ms / 3`` or so.
    retain_s : float
        Audio kept per session, s of stream time (what a new owner rebuilds from).
    max_results : int
        Results kept per session (approximately, ``MAXLEN ~``) for resuming clients.
    session_ttl_s : float
        Session keys expire this long after the last gateway activity.
    result_ttl_s : float
        A finished session's results stay readable this long.
    timeout_s : float
        Socket (read, write and connect) timeout of the client made from ``url``: a call Redis
        does not answer within it raises ``BusError`` ``redis_unavailable``. Blocking reads block
        for at most half of it.
    client : redis.asyncio.Redis | None
        An existing client (``decode_responses=False``); one is made from ``url`` otherwise.

    The defaults are :class:`~worker.settings.BusSettings`'s; a process builds its bus with
    :meth:`from_settings`, so gateways and workers use the same values.
    """

    def __init__(self, url: str = "redis://localhost:6379/0", *,
                 prefix: str = _DEFAULTS.redis_prefix,
                 lease_ms: int = _DEFAULTS.lease_ms, retain_s: float = _DEFAULTS.retain_s,
                 max_results: int = _DEFAULTS.max_results,
                 session_ttl_s: float = _DEFAULTS.session_ttl_s,
                 result_ttl_s: float = _DEFAULTS.result_ttl_s,
                 timeout_s: float = _DEFAULTS.redis_timeout_s,
                 client: aioredis.Redis | None = None) -> None:
        if lease_ms <= 0 or retain_s <= 0 or max_results <= 0 or not timeout_s > 0:
            raise BusError("lease_ms, retain_s, max_results and timeout_s must be positive",
                           reason="bad_settings")
        # A dropped connection (Redis restarted, a network blip) is retried on a new one, so
        # the first call after an outage does not fail. The audio, lease and finish scripts are
        # safe to repeat (by seq, by ownership), and so is a publish whose first reply was lost:
        # the script compares it with the last result stored (and stores one final only). A
        # repeated create answers ``session_exists``; a repeated attach or adopt counts twice.
        # A timeout is not retried: Redis did not answer for ``timeout_s``, so the call fails
        # after that long (not four times that).
        self.timeout_s = float(timeout_s)
        self.r = client or aioredis.Redis.from_url(
            url, decode_responses=False, socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3,
                        supported_errors=(RedisConnectionError,)),
            retry_on_error=[RedisConnectionError])
        self.url = url
        self.prefix, self.lease_ms, self.retain_s = prefix, int(lease_ms), float(retain_s)
        self.max_results = int(max_results)
        self.session_ttl_ms = int(session_ttl_s * 1000)
        self.result_ttl_ms = int(result_ttl_s * 1000)
        self._push = self.r.register_script(lua.PUSH)
        self._renew = self.r.register_script(lua.RENEW)
        self._release = self.r.register_script(lua.RELEASE)
        self._finish = self.r.register_script(lua.FINISH)
        self._adopt = self.r.register_script(lua.ADOPT)
        self._create = self.r.register_script(lua.CREATE)
        self._publish = self.r.register_script(lua.PUBLISH)
        self._attach = self.r.register_script(lua.ATTACH)
        # every read_results of this client; its XREAD blocks well within the socket timeout
        self.dispatcher = ResultsDispatcher(self.r, block_ms=min(BLOCK_MS, self._block_ms(1.0)))
        self.audio = AudioReader(self.r)  # every read_audio of this client
        self.registry = WorkerRegistry(self.r, self, self.lease_ms)
        self._group_ready = False

    @classmethod
    def from_settings(cls, settings: BusSettings, *, client: aioredis.Redis | None = None
                      ) -> RedisBus:
        """The bus ``settings`` describe (``redis_url`` must be set unless ``client`` is)."""
        if settings.redis_url is None and client is None:
            raise BusError("no Redis URL in the bus settings", reason="bad_settings")
        return cls(settings.redis_url or "", prefix=settings.redis_prefix,
                   lease_ms=settings.lease_ms, retain_s=settings.retain_s,
                   max_results=settings.max_results, session_ttl_s=settings.session_ttl_s,
                   result_ttl_s=settings.result_ttl_s, timeout_s=settings.redis_timeout_s,
                   client=client)

    # ------------------------------------------------------------------ gateway side
    async def create_session(self, params: StreamParams, session_id: str | None = None) -> str:
        sid = session_id or new_session_id()
        with _redis_errors():
            made = await self._create(
                keys=[self.meta_key(sid), self.sessions_key, self.active_key],
                args=[sid, params.sample_rate, params.channels, params.encoding,
                      self.session_ttl_ms])
        if not made:
            raise BusError(f"session {sid!r} exists", reason="session_exists")
        return sid

    async def session_params(self, session_id: str) -> StreamParams | None:
        with _redis_errors():
            m = await self.r.hmget(self.meta_key(session_id), "sr", "ch", "enc")
        return None if m[0] is None else _params(*m)

    async def _push_entry(self, session_id: str, seq: int, t_s: float, pcm: bytes,
                          is_end: bool, attach: int | None = None) -> tuple[int, int]:
        t_ms = int(t_s * 1000)
        cut_ms = max(0, t_ms - int(self.retain_s * 1000))
        with _redis_errors():
            code, n = await self._push(
                keys=self.session_keys(session_id),
                args=[seq, t_ms, pcm, cut_ms, self.session_ttl_ms, int(is_end), repr(t_s),
                      "" if attach is None else int(attach)])
        return int(code), int(n)

    async def push_audio(self, session_id: str, chunk: AudioChunk) -> bool:
        if chunk.seq < 0 or chunk.t_s < 0:
            raise BusError(f"seq and t_s must be ≥ 0, got {chunk.seq}, {chunk.t_s}",
                           reason="bad_seq")
        code, n = await self._push_entry(session_id, chunk.seq, chunk.t_s, chunk.pcm, False)
        if code == -1:
            raise BusError(f"unknown session {session_id!r}", reason="unknown_session")
        if code == -2:
            raise BusError(f"session {session_id!r} has ended", reason="ended")
        if code == -3:
            raise BusError(f"chunk seq {chunk.seq} skips ahead: expected {n}", reason="bad_seq")
        if code == -4:
            raise BusError(f"chunk t_s {chunk.t_s} is before the previous chunk's ({n} ms)",
                           reason="bad_seq")
        return code == 1

    async def end_session(self, session_id: str) -> None:
        await self._push_entry(session_id, 0, 0.0, b"", True)

    async def attach(self, session_id: str) -> int:
        with _redis_errors():
            n = int(await self._attach(keys=[self.meta_key(session_id)]))
        if n < 0:
            raise BusError(f"unknown session {session_id!r}", reason="unknown_session")
        return n

    async def end_detached(self, session_id: str, attach: int) -> bool:
        code, _ = await self._push_entry(session_id, 0, 0.0, b"", True, attach=attach)
        return code == 1

    async def last_seq(self, session_id: str) -> int:
        with _redis_errors():
            async with self.r.pipeline(transaction=False) as p:
                p.exists(self.meta_key(session_id))
                p.xrevrange(self.audio_key(session_id), count=1)
                exists, last = await p.execute()
        if not exists:
            raise BusError(f"unknown session {session_id!r}", reason="unknown_session")
        if not last:
            return -1
        seq = seq_of(last[0][0])
        return seq - 1 if b"e" in last[0][1] else seq

    async def read_results(self, session_id: str, after: str = "0",
                           timeout_s: float = 1.0) -> list[tuple[str, dict]]:
        key = self.results_key(session_id)
        after = after or "0"
        result_id_key(after)  # validates
        with _redis_errors():
            exists, got = await self.dispatcher.look(self.meta_key(session_id), key, after)
            if not got:
                if not exists:
                    raise BusError(f"unknown session {session_id!r}", reason="unknown_session")
                if timeout_s > 0:
                    got = await self.dispatcher.wait(key, after, timeout_s)
        return [(eid.decode(), json.loads(f[b"r"])) for eid, f in got]

    async def capacity(self) -> Capacity:
        with _redis_errors():
            alive = await self.registry.alive()
            active = [s.decode() for s in await self.r.smembers(self.active_key)]
            async with self.r.pipeline(transaction=False) as p:
                for sid in active:
                    p.exists(self.meta_key(sid))
                exist = await p.execute()
            gone = [s for s, e in zip(active, exist, strict=True) if not e]
            if gone:
                await self.r.srem(self.active_key, *gone)
        return Capacity(alive.workers, len(active) - len(gone), alive.capacity, alive.notes,
                        alive.calibrations)

    # ------------------------------------------------------------------ worker side
    async def heartbeat(self, worker_id: str, max_sessions: int,
                        notes: tuple[str, ...] = (), calibration: dict | None = None) -> None:
        with _redis_errors():
            await self.registry.heartbeat(worker_id, max_sessions, notes, calibration)

    async def workload(self) -> Workload:
        # The hand-out stream holds one entry per session waiting or held (stale entries of
        # expired sessions linger until a claim drops them): cheap, and close enough.
        with _redis_errors():
            capacity = await self.registry.capacity()
            waiting_or_held = await self.r.xlen(self.sessions_key)
        return Workload(int(waiting_or_held), capacity)

    async def retire(self, worker_id: str) -> None:
        with _redis_errors():
            await self.registry.retire(worker_id)

    async def reap(self, idle_s: float) -> int:
        with _redis_errors():
            return await self.registry.reap(idle_s)

    async def _ensure_group(self, force: bool = False) -> None:
        if self._group_ready and not force:
            return
        try:
            await self.r.xgroup_create(self.sessions_key, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def _block_ms(self, block_s: float) -> int:
        """A blocking read's block, ms: ``block_s``, at most half the socket timeout (a block
        longer than the timeout would fail as an outage while Redis is fine)."""
        return max(1, int(min(block_s, self.timeout_s / 2) * 1000))

    async def _take(self, worker_id: str, max_n: int, block_s: float) -> list[tuple[bytes, str]]:
        """Hand-out entries (id, session id) for this worker: lapsed ones, then new ones."""
        got: list[tuple[bytes, str]] = []
        start = "0-0"
        for _ in range(8):  # XAUTOCLAIM scans ≤ 10 × COUNT entries per call
            nxt, entries, *_ = await self.r.xautoclaim(
                self.sessions_key, GROUP, worker_id, self.lease_ms, start, count=max_n - len(got))
            got += [(eid, f[b"s"].decode()) for eid, f in entries if f]
            start = nxt.decode() if isinstance(nxt, bytes) else nxt
            if start == "0-0" or len(got) >= max_n:
                break
        if len(got) < max_n:
            block = self._block_ms(block_s) if block_s > 0 and not got else None
            res = await self.r.xreadgroup(GROUP, worker_id, {self.sessions_key: ">"},
                                          count=max_n - len(got), block=block)
            got += [(eid, f[b"s"].decode()) for _, entries in (res or []) for eid, f in entries
                    if f]
        return got

    async def claim(self, worker_id: str, max_n: int, block_s: float = 0.0) -> list[Claim]:
        if max_n <= 0:
            return []
        with _redis_errors():
            await self._ensure_group()
            try:
                entries = await self._take(worker_id, max_n, block_s)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                await self._ensure_group(force=True)  # Redis restarted empty
                entries = await self._take(worker_id, max_n, block_s)
            claims = []
            for eid, sid in entries:  # each on its own: one bad session holds up no other
                try:
                    n, *stored = await self._adopt(keys=[self.sessions_key, self.meta_key(sid)],
                                                   args=[GROUP, eid, worker_id])
                except OutOfMemoryError:
                    if not claims:
                        raise
                    # Redis is full: the rest would be refused too. They stay pending on this
                    # worker, untouched, and are claimed again once their lease lapses.
                    logger.warning("Redis is full: adopted %d of %d claimed sessions; the others "
                                   "are claimed again after the lease", len(claims), len(entries))
                    break
                except ResponseError as e:
                    if "WRONGTYPE" not in str(e):
                        raise
                    logger.warning("session %s: its meta key is not a hash; dropping it", sid)
                    await self.r.xack(self.sessions_key, GROUP, eid)
                    await self.r.xdel(self.sessions_key, eid)
                    continue
                if not int(n):
                    continue
                self.audio.forget(sid)
                try:
                    claims.append(Claim(sid, _params(*stored), reclaimed=int(n) > 1))
                except BusError as e:
                    claims.append(Claim(sid, None, reclaimed=int(n) > 1, error=e))
        return claims

    async def read_audio(self, session_id: str, after_seq: int, max_chunks: int = 256
                         ) -> AudioBatch:
        with _redis_errors():
            return await self.audio.read(session_id, self.meta_key(session_id),
                                         self.audio_key(session_id), after_seq, max_chunks)

    async def publish_result(self, session_id: str, result: dict,
                             owner: str | None = None) -> str | None:
        with _redis_errors():
            eid = await self._publish(
                keys=[self.sessions_key, self.meta_key(session_id),
                      self.results_key(session_id)],
                args=[GROUP, owner or "", json.dumps(result, separators=(",", ":")),
                      self.max_results, self.session_ttl_ms, int(bool(result.get("final")))])
        return eid.decode() if eid else None

    async def renew(self, worker_id: str, session_ids: list[str]) -> list[str]:
        if not session_ids:
            return []
        with _redis_errors():
            lost = await self._renew(keys=[self.sessions_key]
                                     + [self.meta_key(s) for s in session_ids],
                                     args=[GROUP, worker_id])
        out = [session_ids[int(i) - 1] for i in lost]
        for sid in out:
            self.audio.forget(sid)
        return out

    async def release(self, worker_id: str, session_ids: list[str]) -> None:
        with _redis_errors():
            for sid in session_ids:
                await self._release(keys=[self.sessions_key, self.meta_key(sid)],
                                    args=[GROUP, worker_id, sid])
                self.audio.forget(sid)

    async def finish(self, worker_id: str, session_id: str) -> None:
        with _redis_errors():
            await self._finish(keys=[self.sessions_key, *self.session_keys(session_id),
                                     self.active_key],
                               args=[GROUP, worker_id, session_id, self.result_ttl_ms])
        self.audio.forget(session_id)

    async def ping(self) -> bool:
        """True when Redis answers (for readiness probes)."""
        try:
            return bool(await self.r.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        await self.dispatcher.close()  # its waiters get BusError ``closed``
        await self.r.aclose()

