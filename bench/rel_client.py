"""Recording protocol-v1 clients and a bus tap, for the reliability harness and tests.

:func:`run_stream` streams int16 PCM to one of several gateways at real-time pace (or faster),
resumes through the next gateway when its connection drops, and records everything: each
chunk's send time, each result with its arrival time, errors, close codes, resumes. The checks
(:func:`stream_problems`) are the protocol's promises (docs/protocol.md): results in order, none
twice, one at least every second of audio, a final one covering all the audio sent.

:class:`BusTap` reads every session's audio stream and meta hash in Redis while the streams run
(the key layout is in worker/redis_bus.py): each chunk the gateway stored must be the client's
next chunk, byte for byte (sequence numbers end to end: none lost, none twice), and the
session's owner is sampled (which worker holds it; the consumer whose pending list holds its
hand-out entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

RETRYABLE = ("unavailable", "busy")  # error codes a client may retry (docs/protocol.md)


def rid_key(rid: str) -> tuple[int, int]:
    a, _, b = rid.partition("-")
    return int(a), int(b or 0)


@dataclass
class StreamLog:
    """What one client saw. Times are ``time.monotonic()``."""

    name: str
    total_s: float = 0.0
    session: str | None = None
    chunk_end_s: list[float] = field(default_factory=list)  # stream time at each chunk's end
    sent_at: dict[int, float] = field(default_factory=dict)  # chunk index → last send time
    results: list[tuple[float, dict]] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    retried: list[dict] = field(default_factory=list)  # retryable errors, then a resume
    closes: list[int | None] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)  # URL of each connection
    resumes: int = 0
    resent_chunks: int = 0  # chunks sent again after a resume (the gateway ignores them)
    started_at: float = 0.0
    stop_at: float | None = None
    done_at: float | None = None
    exception: str | None = None

    @property
    def final(self) -> dict | None:
        return self.results[-1][1] if self.results and self.results[-1][1].get("final") else None

    def latencies(self) -> list[float]:
        """Per periodic result: arrival − send time of the chunk that completed it, s; per final
        result: arrival − the ``stop``'s send time. Results replayed after a resume count from
        the chunk's last sending."""
        out = []
        ends = np.asarray(self.chunk_end_s)
        for t, r in self.results:
            if r.get("final"):
                if self.stop_at is not None:
                    out.append(t - self.stop_at)
                continue
            k = int(np.searchsorted(ends, float(r["audio_s"]) - 1e-6))
            if k < len(ends) and k in self.sent_at:
                out.append(t - self.sent_at[k])
        return out

    def lags(self) -> list[float]:
        return [float(r.get("lag_s", 0.0)) for _, r in self.results]

    def longest_gap_s(self) -> float:
        """Longest wall-clock wait between two results (or the start and the first)."""
        times = [self.started_at] + [t for t, _ in self.results]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def stream_problems(log: StreamLog, result_every_s: float = 1.0) -> list[str]:
    """Broken promises of one stream; [] when it was served as the protocol says."""
    p = []
    if log.exception:
        p.append(f"client exception: {log.exception}")
    for e in log.errors:
        p.append(f"error {e.get('code')}/{e.get('reason')}: {e.get('message')}")
    if log.final is None:
        return p + [f"no final result ({len(log.results)} results, closes {log.closes})"]
    if log.final.get("error"):
        p.append(f"final result carries an error: {log.final['error']}")
    ids = [rid_key(r["result_id"]) for _, r in log.results]
    if ids != sorted(set(ids)):
        p.append("result ids repeated or out of order")
    audio = [float(r["audio_s"]) for _, r in log.results]
    periodic = audio[:-1]
    if periodic != sorted(set(periodic)):
        p.append(f"a result twice or out of order: {periodic}")
    if abs(audio[-1] - log.total_s) > 1e-3:
        p.append(f"final result covers {audio[-1]} s of {log.total_s} s sent")
    edges = [0.0, *audio]
    gaps = [b - a for a, b in zip(edges, edges[1:], strict=False)]
    if gaps and max(gaps) > result_every_s + 1e-3:
        k = int(np.argmax(gaps))
        p.append(f"no result for {max(gaps):.2f} s of audio ({edges[k]:.2f} → {edges[k + 1]:.2f})")
    return p


async def run_stream(urls: list[str], pcm: np.ndarray, rate: int, *, name: str = "",
                     chunk_s: float = 0.25, speed: float = 1.0, max_resumes: int = 10,
                     local_addr: str | None = None, timeout_s: float = 300.0,
                     before_stop: Callable[[str, int], Awaitable[None]] | None = None,
                     on_ready: Callable[[StreamLog], None] | None = None,
                     retry_busy: bool = False) -> StreamLog:
    """Stream mono int16 ``pcm`` (shape (n,)) at ``rate`` Hz to ``urls[0]``; on a dropped
    connection resume through the next URL (``start`` with ``session`` and ``after``), sending
    from the byte the gateway says it has. Pace: ``speed`` × real time, kept from the first
    start (a resumed client sends what it buffered meanwhile at once, as a microphone would).
    ``local_addr``: the client's source address (127.0.0.x: one "client address" each)."""
    import aiohttp

    step = max(1, int(chunk_s * rate))
    chunks = [pcm[i:i + step].astype("<i2").tobytes() for i in range(0, len(pcm), step)]
    log = StreamLog(name, total_s=round(len(pcm) / rate, 4))
    ends = np.minimum(np.arange(1, len(chunks) + 1) * step, len(pcm)) / rate
    log.chunk_end_s = [float(e) for e in ends]
    bytes_per_s = 2 * rate
    after: str | None = None
    attempt = 0
    connector = aiohttp.TCPConnector(local_addr=(local_addr, 0) if local_addr else None,
                                     force_close=True)
    log.started_at = time.monotonic()
    deadline = log.started_at + timeout_s
    t0 = log.started_at
    try:
        async with asyncio.timeout(timeout_s), aiohttp.ClientSession(connector=connector) as http:
            while log.final is None and time.monotonic() < deadline:
                url = urls[attempt % len(urls)]
                attempt += 1
                retry = False
                try:
                    async with http.ws_connect(url, max_msg_size=1 << 22, autoping=True,
                                               timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                        log.gateways.append(url)
                        start = {"type": "start", "v": 1, "sample_rate": rate, "channels": 1,
                                 "encoding": "pcm_s16le"}
                        if log.session:
                            start["session"] = log.session
                            if after:
                                start["after"] = after
                        await ws.send_str(json.dumps(start))
                        m = await ws.receive(timeout=30)
                        if m.type != aiohttp.WSMsgType.TEXT:
                            log.closes.append(ws.close_code)
                            retry = log.session is not None or retry_busy
                            raise ConnectionError(f"closed before ready ({ws.close_code})")
                        ready = json.loads(m.data)
                        if ready.get("type") == "error":
                            log.errors.append(ready)
                            log.closes.append((await ws.receive(timeout=5)).data
                                              if not ws.closed else ws.close_code)
                            if ready.get("code") in RETRYABLE and (retry_busy or log.session):
                                log.retried.append(log.errors.pop())
                                retry = True
                                raise ConnectionError("retryable")
                            return log
                        if log.session is None:
                            log.session = ready["session"]
                            if on_ready:
                                on_ready(log)
                        else:
                            log.resumes += 1
                        have = int(ready.get("audio_bytes", 0))
                        first = have // (2 * step)
                        sender = asyncio.create_task(_send(ws, chunks, first, log, t0, speed,
                                                           bytes_per_s, step, before_stop))
                        try:
                            async for m in ws:
                                if m.type != aiohttp.WSMsgType.TEXT:
                                    break
                                data = json.loads(m.data)
                                if data.get("type") == "result":
                                    log.results.append((time.monotonic(), data))
                                    after = data["result_id"]
                                elif data.get("type") == "error":
                                    log.errors.append(data)
                        finally:
                            sender.cancel()
                            await asyncio.gather(sender, return_exceptions=True)
                        log.closes.append(ws.close_code)
                        if log.final is not None:
                            log.done_at = time.monotonic()
                            return log
                        if log.errors:
                            if log.errors[-1].get("code") not in RETRYABLE:
                                return log
                            log.retried.append(log.errors.pop())
                        retry = True
                except (aiohttp.ClientError, ConnectionError, OSError,
                        asyncio.TimeoutError) as e:
                    if not retry and log.session is None and not retry_busy:
                        log.exception = f"{type(e).__name__}: {e}"
                        return log
                    retry = True
                if retry:
                    if attempt > max_resumes + 1:
                        log.exception = f"gave up after {attempt} connections"
                        return log
                    await asyncio.sleep(min(2.0, 0.1 * attempt))
    except TimeoutError:
        log.exception = f"no final result within {timeout_s:g} s"
    except Exception as e:  # noqa: BLE001 - recorded: the harness reports it
        log.exception = f"{type(e).__name__}: {e}"
    return log


async def _send(ws, chunks: list[bytes], first: int, log: StreamLog, t0: float, speed: float,
                bytes_per_s: int, step: int, before_stop) -> None:
    if first < len(log.sent_at) and log.resumes:
        log.resent_chunks += len([k for k in log.sent_at if k >= first])
    for k in range(first, len(chunks)):
        due = t0 + k * step * 2 / bytes_per_s / speed
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send_bytes(chunks[k])
        log.sent_at[k] = time.monotonic()
    if before_stop is not None and log.session:
        await before_stop(log.session, len(chunks))
    log.stop_at = time.monotonic()
    await ws.send_str(json.dumps({"type": "stop", "v": 1}))


# -------------------------------------------------------------------------------------- tap
@dataclass
class TapSession:
    chunks: list[bytes]
    next_seq: int = 0
    last_eid: bytes = b"0-0"
    problems: list[str] = field(default_factory=list)
    owners: list[tuple[float, str]] = field(default_factory=list)  # (time, owner) on change
    done: bool = False


class BusTap:
    """Reads each tracked session's audio stream and owner in Redis every ``every_s``.

    Checks, per stored chunk: its sequence number is the next one (``{t_ms}-{seq + 1}`` entry
    ids, worker/redis_bus.py), its bytes are the client's chunk of that number. The owner
    (meta ``o``) is recorded whenever it changes.
    """

    def __init__(self, redis_url: str, prefix: str = "mm", every_s: float = 0.2) -> None:
        from worker.redis_bus import RedisBus

        self.keys = RedisBus(redis_url, prefix=prefix)  # the key names; its client is ours
        self.r = self.keys.r
        self.every_s = every_s
        self.sessions: dict[str, TapSession] = {}
        self.errors = 0  # polls that failed (Redis down during a fault)
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one poll at a time: each reads after the last entry seen

    def track(self, sid: str, pcm: np.ndarray, rate: int, chunk_s: float) -> None:
        step = max(1, int(chunk_s * rate))
        self.sessions[sid] = TapSession([pcm[i:i + step].astype("<i2").tobytes()
                                         for i in range(0, len(pcm), step)])

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - Redis restarting: counted, the next poll tries
                self.errors += 1

    async def poll(self, only: str | None = None) -> None:
        async with self._lock:
            await self._poll(only)

    async def _poll(self, only: str | None) -> None:
        sids = [only] if only else [s for s, t in self.sessions.items() if not t.done]
        if not sids:
            return
        async with self.r.pipeline(transaction=False) as p:
            for sid in sids:
                p.xrange(self.keys.audio_key(sid), min=b"(" + self.sessions[sid].last_eid)
                p.hmget(self.keys.meta_key(sid), "o", "d")
            got = await p.execute()
        now = time.monotonic()
        for i, sid in enumerate(sids):
            t, entries, (owner, finished) = self.sessions[sid], got[2 * i], got[2 * i + 1]
            for eid, f in entries:
                t.last_eid = eid
                if b"e" in f:
                    continue
                seq = int(eid.split(b"-")[1]) - 1
                if seq != t.next_seq:
                    t.problems.append(f"stored chunk {seq} where {t.next_seq} was next")
                elif seq >= len(t.chunks) or bytes(f[b"p"]) != t.chunks[seq]:
                    t.problems.append(f"stored chunk {seq} is not the client's chunk {seq}")
                t.next_seq = max(t.next_seq, seq + 1)
            o = owner.decode() if owner else ""
            if o and (not t.owners or t.owners[-1][1] != o):
                t.owners.append((now, o))
            if finished:
                t.done = True

    async def flush(self, sid: str, n_chunks: int, timeout_s: float = 2.0) -> None:
        """Read ``sid`` until its ``n_chunks`` chunks are seen, for at most ``timeout_s`` (a
        client about to send ``stop`` waits for it: the worker deletes the audio when it
        finishes, and the last chunk sent may not be stored yet)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                await self.poll(sid)
            if self.sessions[sid].next_seq >= n_chunks:
                return
            await asyncio.sleep(0.005)

    def problems(self, sid: str, sent_chunks: int) -> list[str]:
        t = self.sessions[sid]
        out = list(t.problems)
        if t.next_seq != sent_chunks:
            out.append(f"the bus holds chunks 0..{t.next_seq - 1}, the client sent "
                       f"{sent_chunks}")
        return out

    async def pending_by_consumer(self) -> dict[str, int]:
        """Hand-out entries each worker holds now (XINFO CONSUMERS of the group)."""
        info = await self.r.xinfo_consumers(self.keys.sessions_key, "workers")
        return {c["name"].decode() if isinstance(c["name"], bytes) else c["name"]:
                int(c["pending"]) for c in info}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.r.aclose()


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None
