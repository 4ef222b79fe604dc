"""The bus over Redis streams: any number of gateways and workers. Every Redis key is named here.

Key layout (``P`` is the prefix, ``mm`` by default; ``{id}`` a session id)
----------------------------------------------------------------------------
``P:sessions``            stream, the hand-out queue; consumer group ``workers``, one consumer
                          per worker id. Entry ``{s: id}``. A session's current entry id is in
                          its meta hash (``x``); while a worker owns the session the entry sits
                          in that worker's pending list (PEL).
``P:s:{id}:meta``         hash: ``sr ch enc`` (stream parameters), ``x`` (hand-out entry),
                          ``n`` (times claimed: > 1 means reclaimed), ``o`` (last owner),
                          ``e`` (ended), ``d`` (done: finished, results kept for resuming).
``P:s:{id}:audio``        stream of chunks. Entry id ``{t_ms}-{seq + 1}`` (stream time in ms,
                          then the sequence number), fields ``t`` (t_s, exact) and ``p`` (PCM);
                          trimmed with ``MINID ~`` to the last ``retain_s`` of *stream* time,
                          whatever the chunk size. The end marker is one more entry, field ``e``.
``P:s:{id}:results``      stream of results, field ``r`` (JSON), ``MAXLEN ~ max_results``; the
                          Redis entry ids are the result ids a reconnecting client resumes from.
``P:active``              set of session ids created and not finished (pruned of expired ones).
``P:workers``             set of worker ids; ``P:w:{worker}`` their heartbeat, value = capacity,
                          expiring after ``lease_ms`` (Redis's clock, so no skew between hosts);
                          beside it, with the same expiry, ``P:w:{worker}:notes`` (JSON list of
                          notes for the operator) and ``P:w:{worker}:calibration`` (JSON: the
                          calibration it decides with), both read by ``/readyz``.

Leases. The lease is the PEL entry's idle time: the owner resets it with ``XCLAIM … 0 … JUSTID``
(``renew``, a Lua script that first checks the entry is still in *its* PEL, so a worker whose
lease lapsed and was taken over can never steal it back). A worker that stops renewing loses the
entry to the next ``claim`` by anyone (``XAUTOCLAIM`` with min-idle ``lease_ms``). ``release``
acks the entry and queues a fresh one so another worker claims it at once; ``finish`` acks and
deletes it. Ownership checks and their effects run in one Lua script each, atomically
(:mod:`worker.redis_scripts`).

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
reconnects by itself once it is back.

Result reads (gateway side). ``read_results`` does not hold a connection per waiting session:
its first look (``EXISTS`` meta + ``XRANGE`` results) is batched with every other look made at
the same time into one pipeline, and a call that has to wait registers with the bus's
:class:`~worker.redis_results.ResultsDispatcher`, whose one background task issues a single
short ``XREAD BLOCK`` (100 ms) over every watched results key (1000 keys per XREAD, chunks read
concurrently) and hands each waiter the entries after its own ``after``. So a gateway's result
reads use one connection for looks and one per 1000 waiting streams (redis-py 8's pool holds
at most 100 by default); the task stops when nothing is watched and ``close`` ends it (waiters
get ``closed``). A Redis error in it reaches its waiters as ``redis_unavailable``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import redis_scripts as lua
from worker.bus import (
    AudioBatch,
    AudioChunk,
    Bus,
    BusError,
    Capacity,
    Claim,
    StreamParams,
    distinct,
    new_session_id,
    result_id_key,
)
from worker.redis_results import ResultsDispatcher

GROUP = "workers"
_MAX_BACKWARD = 4096  # entries fetched newest-first to find a chunk without a cursor
_MAX_CURSORS = 4096  # sessions whose read position this client remembers


@contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except BusError:
        raise
    except RedisError as e:
        raise BusError(f"Redis failed: {type(e).__name__}: {e}",
                       reason="redis_unavailable") from e


def _seq_of(entry_id: bytes | str) -> int:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(s.split("-")[1]) - 1


class RedisBus(Bus):
    """:class:`~worker.bus.Bus` over Redis streams (layout in the module docstring).

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
    client : redis.asyncio.Redis | None
        An existing client (``decode_responses=False``); one is made from ``url`` otherwise.
    """

    def __init__(self, url: str = "redis://localhost:6379/0", *, prefix: str = "mm",
                 lease_ms: int = 5000, retain_s: float = 20.0, max_results: int = 1000,
                 session_ttl_s: float = 300.0, result_ttl_s: float = 120.0,
                 client: aioredis.Redis | None = None) -> None:
        if lease_ms <= 0 or retain_s <= 0 or max_results <= 0:
            raise BusError("lease_ms, retain_s and max_results must be positive",
                           reason="bad_settings")
        # A dropped connection (Redis restarted, a network blip) is retried on a new one, so
        # the first call after an outage does not fail. The audio, lease and finish scripts are
        # safe to repeat; a repeated publish whose first reply was lost stores a result twice.
        self.r = client or aioredis.Redis.from_url(
            url, decode_responses=False, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError])
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
        self.dispatcher = ResultsDispatcher(self.r)  # every read_results of this client
        self._group_ready = False
        self._cursor: dict[str, tuple[int, bytes]] = {}  # session → (last seq read, entry id)

    # ------------------------------------------------------------------ key names
    @property
    def sessions_key(self) -> str:
        return f"{self.prefix}:sessions"

    @property
    def active_key(self) -> str:
        return f"{self.prefix}:active"

    @property
    def workers_key(self) -> str:
        return f"{self.prefix}:workers"

    def worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}:w:{worker_id}"

    def notes_key(self, worker_id: str) -> str:
        return f"{self.prefix}:w:{worker_id}:notes"

    def calibration_key(self, worker_id: str) -> str:
        return f"{self.prefix}:w:{worker_id}:calibration"

    def meta_key(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:meta"

    def audio_key(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:audio"

    def results_key(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:results"

    def session_keys(self, sid: str) -> list[str]:
        """Every key of one session."""
        return [self.meta_key(sid), self.audio_key(sid), self.results_key(sid)]

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
        if m[0] is None:
            return None
        return StreamParams.from_dict({"sample_rate": m[0], "channels": m[1] or 1,
                                       "encoding": (m[2] or b"pcm_s16le").decode()})

    async def _push_entry(self, session_id: str, seq: int, t_s: float, pcm: bytes,
                          is_end: bool) -> tuple[int, int]:
        t_ms = int(t_s * 1000)
        cut_ms = max(0, t_ms - int(self.retain_s * 1000))
        with _redis_errors():
            code, n = await self._push(
                keys=self.session_keys(session_id),
                args=[seq, t_ms, pcm, cut_ms, self.session_ttl_ms, int(is_end), repr(t_s)])
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
        seq = _seq_of(last[0][0])
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
            workers = [w.decode() for w in await self.r.smembers(self.workers_key)]
            caps = await self.r.mget([self.worker_key(w) for w in workers]) if workers else []
            said = await self.r.mget([self.notes_key(w) for w in workers]) if workers else []
            cals = (await self.r.mget([self.calibration_key(w) for w in workers])
                    if workers else [])
            dead = [w for w, c in zip(workers, caps, strict=True) if c is None]
            active = [s.decode() for s in await self.r.smembers(self.active_key)]
            async with self.r.pipeline(transaction=False) as p:
                for sid in active:
                    p.exists(self.meta_key(sid))
                alive = await p.execute()
            gone = [s for s, a in zip(active, alive, strict=True) if not a]
            async with self.r.pipeline(transaction=False) as p:
                if dead:
                    p.srem(self.workers_key, *dead)
                if gone:
                    p.srem(self.active_key, *gone)
                await p.execute()
        live = [int(c) for c in caps if c is not None]
        notes = tuple(dict.fromkeys(n for c, raw in zip(caps, said, strict=True)
                                    if c is not None and raw for n in json.loads(raw)))
        calibrations = distinct(json.loads(raw) for c, raw in zip(caps, cals, strict=True)
                                if c is not None and raw)
        return Capacity(len(live), len(active) - len(gone), sum(live), notes, calibrations)

    # ------------------------------------------------------------------ worker side
    async def heartbeat(self, worker_id: str, max_sessions: int,
                        notes: tuple[str, ...] = (), calibration: dict | None = None) -> None:
        with _redis_errors():
            async with self.r.pipeline(transaction=False) as p:
                p.set(self.worker_key(worker_id), int(max_sessions), px=self.lease_ms)
                if notes:
                    p.set(self.notes_key(worker_id), json.dumps(list(notes)), px=self.lease_ms)
                if calibration:
                    p.set(self.calibration_key(worker_id), json.dumps(calibration),
                          px=self.lease_ms)
                p.sadd(self.workers_key, worker_id)
                await p.execute()

    async def _ensure_group(self, force: bool = False) -> None:
        if self._group_ready and not force:
            return
        try:
            await self.r.xgroup_create(self.sessions_key, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

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
            block = int(block_s * 1000) if block_s > 0 and not got else None
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
            for eid, sid in entries:
                n = await self._adopt(keys=[self.sessions_key, self.meta_key(sid)],
                                      args=[GROUP, eid, worker_id])
                params = await self.session_params(sid) if n else None
                if params is None:
                    continue
                self._cursor.pop(sid, None)
                claims.append(Claim(sid, params, reclaimed=int(n) > 1))
        return claims

    async def read_audio(self, session_id: str, after_seq: int, max_chunks: int = 256
                         ) -> AudioBatch:
        key = self.audio_key(session_id)
        cur = self._cursor.get(session_id)
        hit = cur is not None and cur[0] == after_seq
        chunks: list[AudioChunk] = []
        ended, last_eid = False, b""
        with _redis_errors():
            async with self.r.pipeline(transaction=False) as p:  # one round trip when idle
                p.exists(self.meta_key(session_id))
                if hit:
                    p.xrange(key, min=b"(" + cur[1], count=max_chunks + 1)
                elif after_seq < 0:
                    p.xrange(key, min="-", count=max_chunks + 1)
                else:
                    p.xrevrange(key, count=1)
                exists, page = await p.execute()
            if not exists:
                raise BusError(f"unknown session {session_id!r}", reason="unknown_session")
            if not hit and after_seq >= 0:
                page = await self._page_after(key, after_seq, page, max_chunks)
            while True:
                for eid, f in page:
                    if b"e" in f:
                        ended = True
                        break
                    seq = _seq_of(eid)
                    if seq > after_seq:
                        if len(chunks) == max_chunks:
                            break
                        chunks.append(AudioChunk(seq, float(f[b"t"]), bytes(f[b"p"])))
                        last_eid = eid
                if ended or len(chunks) >= max_chunks or len(page) <= max_chunks:
                    break
                page = await self.r.xrange(key, min=b"(" + page[-1][0], count=max_chunks + 1)
        if chunks:
            self._remember(session_id, chunks[-1].seq, last_eid)
        return AudioBatch(chunks, ended)

    async def _page_after(self, key: str, after_seq: int, newest: list, max_chunks: int) -> list:
        """Entries from the first chunk after ``after_seq`` on, found from the newest entry
        (chunks are contiguous, so they are the newest ``last seq − after_seq``): a reader
        without a cursor (a gateway resuming, another process) fetches only what it needs."""
        if not newest:
            return []
        has_end = int(b"e" in newest[0][1])
        last_chunk = _seq_of(newest[0][0]) - has_end  # the end marker takes the next seq
        n = last_chunk - after_seq + has_end  # entries after chunk ``after_seq``
        if last_chunk <= after_seq:
            return newest if has_end else []
        if n <= _MAX_BACKWARD:
            return list(reversed(await self.r.xrevrange(key, count=n)))
        return await self.r.xrange(key, min="-", count=max(max_chunks + 1, _MAX_BACKWARD))

    def _remember(self, session_id: str, seq: int, eid: bytes) -> None:
        self._cursor.pop(session_id, None)
        self._cursor[session_id] = (seq, eid)
        if len(self._cursor) > _MAX_CURSORS:  # a gateway reads many sessions once: bound it
            del self._cursor[next(iter(self._cursor))]

    async def publish_result(self, session_id: str, result: dict) -> str:
        key = self.results_key(session_id)
        with _redis_errors():
            async with self.r.pipeline(transaction=True) as p:
                p.xadd(key, {"r": json.dumps(result, separators=(",", ":"))},
                       maxlen=self.max_results, approximate=True)
                p.pexpire(key, self.session_ttl_ms)
                p.pexpire(self.meta_key(session_id), self.session_ttl_ms)
                eid = (await p.execute())[0]
        return eid.decode()

    async def renew(self, worker_id: str, session_ids: list[str]) -> list[str]:
        if not session_ids:
            return []
        with _redis_errors():
            lost = await self._renew(keys=[self.sessions_key]
                                     + [self.meta_key(s) for s in session_ids],
                                     args=[GROUP, worker_id])
        out = [session_ids[int(i) - 1] for i in lost]
        for sid in out:
            self._cursor.pop(sid, None)
        return out

    async def release(self, worker_id: str, session_ids: list[str]) -> None:
        with _redis_errors():
            for sid in session_ids:
                await self._release(keys=[self.sessions_key, self.meta_key(sid)],
                                    args=[GROUP, worker_id, sid])
                self._cursor.pop(sid, None)

    async def finish(self, worker_id: str, session_id: str) -> None:
        with _redis_errors():
            await self._finish(keys=[self.sessions_key, *self.session_keys(session_id),
                                     self.active_key],
                               args=[GROUP, worker_id, session_id, self.result_ttl_ms])
        self._cursor.pop(session_id, None)

    async def ping(self) -> bool:
        """True when Redis answers (for readiness probes)."""
        try:
            return bool(await self.r.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        await self.dispatcher.close()  # its waiters get BusError ``closed``
        await self.r.aclose()
