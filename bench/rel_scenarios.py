"""The reliability harness's scenarios, each against a running :class:`~bench.rel_cluster.Cluster`.

Every scenario returns a report dict: ``name``, ``problems`` (broken promises, each a sentence;
empty when the scenario passed) and its figures. ``bench/reliability.py`` runs them all at full
size and prints the table; ``tests/integration/test_reliability.py`` and ``test_scale_out.py``
run them small and assert ``problems == []``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.rel_client import BusTap, StreamLog, percentile, run_stream, stream_problems
from bench.rel_cluster import RATE, Cluster, synth_pcm

ADDRESS_BLOCK = "127.0.1."  # stream k connects from 127.0.1.(k % 250 + 1): "clients" apart


def pcm_pool(cluster: Cluster | None, midi: list[Path], seconds: float) -> list[np.ndarray]:
    """One excerpt of ``seconds`` per piece of the collection, int16 at :data:`RATE`."""
    return [synth_pcm(m, seconds) for m in midi]


def _progress(what: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def _address(k: int) -> str:
    return f"{ADDRESS_BLOCK}{k % 250 + 1}"


async def warm_up(cluster: Cluster, pcm: np.ndarray) -> None:
    """Two short streams per worker at 4 × real time (first ticks load numba's cached kernels);
    results ignored."""
    urls = [g.url for g in cluster.gateways]
    await asyncio.gather(*(run_stream(urls, pcm[: 4 * RATE], RATE, speed=4.0,
                                      local_addr="127.0.0.3", timeout_s=120)
                           for _ in range(2 * len(cluster.workers))))


def _worker_audio_s(cluster: Cluster) -> float:
    return sum(w.metrics().get("midimatch_worker_audio_seconds_total", 0.0)
               for w in cluster.workers if w.alive)


async def streams(cluster: Cluster, pool: list[np.ndarray], n: int, *, chunk_s: float = 0.25,
                  spread_s: float = 1.0, during=None, gateways: list[int] | None = None,
                  timeout_s: float = 300.0) -> tuple[list[StreamLog], BusTap, dict]:
    """``n`` real-time streams (stream k plays ``pool[k % len(pool)]``, starts spread over
    ``spread_s``, gateways round-robin over ``gateways``); ``during(logs, tap)`` is awaited
    alongside (the fault). Returns the logs, the tap (closed) and the tap's consumer counts
    sampled once every stream had its first result."""
    g_index = gateways if gateways is not None else list(range(len(cluster.gateways)))
    tap = BusTap(cluster.redis.url)
    tap.start()
    logs: list[StreamLog] = [StreamLog("") for _ in range(n)]
    spread: dict = {}

    def registered(log: StreamLog, k: int) -> None:
        tap.track(log.session, pool[k % len(pool)], RATE, chunk_s)
        logs[k] = log

    async def one(k: int) -> StreamLog:
        await asyncio.sleep(spread_s * k / max(1, n))
        first = g_index[k % len(g_index)]
        urls = [cluster.gateways[i].url for i in g_index[g_index.index(first):]
                + g_index[:g_index.index(first)]]
        return await run_stream(urls, pool[k % len(pool)], RATE, name=f"s{k}", chunk_s=chunk_s,
                                local_addr=_address(k), before_stop=tap.flush,
                                on_ready=lambda log, k=k: registered(log, k),
                                timeout_s=timeout_s)

    async def sample_spread() -> None:
        while not all(log.results for log in logs) and not all(t.done() for t in tasks):
            await asyncio.sleep(0.2)
        spread.update(await tap.pending_by_consumer())

    tasks = [asyncio.create_task(one(k)) for k in range(n)]
    sampler = asyncio.create_task(sample_spread())
    if during is not None:
        await during(logs, tap)
    done = await asyncio.gather(*tasks)
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    await tap.close()
    return list(done), tap, spread


def _stream_figures(logs: list[StreamLog]) -> dict:
    lat = [x for log in logs for x in log.latencies()]
    lags = [x for log in logs for x in log.lags()]
    return {"streams": len(logs), "results": sum(len(log.results) for log in logs),
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "latency_max_s": max(lat, default=None), "lag_p50_s": percentile(lags, 50),
            "lag_p99_s": percentile(lags, 99),
            "longest_wait_s": max((log.longest_gap_s() for log in logs), default=None)}


def _check(logs: list[StreamLog], tap: BusTap, *, every_s: float | None = 1.0) -> list[str]:
    """Every stream's broken promises (``every_s`` None: the one-result-per-second promise is
    reported, not checked: a fault scenario)."""
    out = []
    for log in logs:
        probs = stream_problems(log, every_s if every_s is not None else 1e9)
        if log.session in tap.sessions:
            probs += tap.problems(log.session, len(log.chunk_end_s))
        out += [f"{log.name} ({log.session}): {p}" for p in probs]
    return out


def _owners(tap: BusTap, logs: list[StreamLog]) -> dict[str, list[str]]:
    return {log.session: [o for _, o in tap.sessions[log.session].owners]
            for log in logs if log.session in tap.sessions}


# ------------------------------------------------------------------------------- load
async def load(cluster: Cluster, pool: list[np.ndarray], n: int) -> dict:
    """``n`` concurrent real-time streams, no fault: every promise checked, figures."""
    before = _worker_audio_s(cluster)
    t0 = time.monotonic()
    logs, tap, spread = await streams(cluster, pool, n)
    problems = _check(logs, tap)
    sent_s = sum(log.total_s for log in logs)
    processed = _worker_audio_s(cluster) - before
    if abs(processed - sent_s) > 0.01 * n:
        problems.append(f"workers processed {processed:.2f} s of audio, clients sent "
                        f"{sent_s:.2f} s (a chunk lost or applied twice)")
    owners = _owners(tap, logs)
    return {"name": f"load {n} streams", "problems": problems, **_stream_figures(logs),
            "audio_s_sent": round(sent_s, 2), "audio_s_processed": round(processed, 2),
            "sessions_per_worker": spread, "reowned": sum(len(o) > 1 for o in owners.values()),
            "wall_s": round(time.monotonic() - t0, 1), "load_avg": os.getloadavg()[0]}


async def sweep(cluster: Cluster, pool: list[np.ndarray], levels: list[int]) -> dict:
    """Streams at each level until p99 result latency passes 250 ms (the knee)."""
    rows, knee = [], None
    for n in levels:
        r = await load(cluster, pool, n)
        rows.append({k: r[k] for k in ("streams", "latency_p50_s", "latency_p99_s", "lag_p99_s",
                                       "load_avg")} | {"problems": len(r["problems"])})
        if (r["latency_p99_s"] or 0) > 0.25:
            knee = n
            break
    return {"name": "sweep", "problems": [], "levels": rows, "knee_streams": knee}


# ----------------------------------------------------------------------------- faults
async def worker_fault(cluster: Cluster, pool: list[np.ndarray], n: int, *, kind: str,
                       after_s: float = 5.0, pause_s: float | None = None) -> dict:
    """Once every one of ``n`` streams has a result (and ``after_s`` in), ``kind`` the worker
    owning the most sessions: ``kill`` (SIGKILL: a crash), ``stop`` (SIGSTOP for ``pause_s``,
    then SIGCONT: a hang) or ``term`` (SIGTERM: scaled in, it hands its sessions back).
    Expected: every session finishes on another worker with all its audio, no result twice (no
    second owner publishing), no client error, the next result within lease + 4 s (``term``:
    within the lease, since nothing waits for it to lapse; exit status 0)."""
    info: dict = {}
    lease_s = cluster.lease_ms / 1000

    async def fault(logs: list[StreamLog], tap: BusTap) -> None:
        t0 = time.monotonic()
        while (not all(log.results for log in logs) and time.monotonic() - t0 < 30.0
               or time.monotonic() - t0 < after_s):
            await asyncio.sleep(0.1)
        info["unserved_at_fault"] = sum(not log.results for log in logs)
        owners = {s: t.owners[-1][1] for s, t in tap.sessions.items() if t.owners}
        counts: dict[str, int] = {}
        for o in owners.values():
            counts[o] = counts.get(o, 0) + 1
        info["owners_at_fault"] = counts
        info["pending_at_fault"] = await tap.pending_by_consumer()
        victim = next(w for w in cluster.workers
                      if w.worker_id == max(counts, key=counts.get))
        info.update(victim=victim.worker_id, orphans=[s for s, o in owners.items()
                                                       if o == victim.worker_id])
        info["t"] = time.monotonic()
        if kind == "kill":
            cluster.retire(victim)
            victim.kill()
        elif kind == "term":
            cluster.retire(victim)
            info["exit"] = await asyncio.to_thread(victim.terminate, 30.0)
            info["exit_s"] = time.monotonic() - info["t"]
        else:
            victim.pause()
            await asyncio.sleep(pause_s if pause_s is not None else 3 * lease_s)
            victim.resume()

    logs, tap, _ = await streams(cluster, pool, n, during=fault)
    problems = _check(logs, tap, every_s=None)
    recover = []
    for log in logs:
        if log.session not in info["orphans"]:
            continue
        later = [t for t, r in log.results if t > info["t"]]
        recover.append(later[0] - info["t"] if later else float("inf"))
        new = [o for t, o in tap.sessions[log.session].owners if t > info["t"]]
        if kind in ("kill", "term") and (not new or new[-1] == info["victim"]):
            problems.append(f"{log.session}: not taken over from {info['victim']} (owners "
                            f"{_owners(tap, [log])[log.session]})")
    limit = lease_s + (1.0 if kind == "term" else 4.0)
    if recover and max(recover) > limit:
        problems.append(f"a session waited {max(recover):.1f} s for its next result after the "
                        f"SIG{kind.upper()} (limit {limit:g} s, the lease being {lease_s:g} s)")
    if info["unserved_at_fault"]:
        problems.append(f"{info['unserved_at_fault']} of {n} streams had no result 30 s in")
    victim = next(w for w in cluster.workers if w.worker_id == info["victim"])
    if kind == "stop" and not victim.alive:
        problems.append(f"{victim.worker_id} exited after SIGCONT:\n{victim.tail(800)}")
    if kind == "term" and info.get("exit") != 0:
        problems.append(f"{victim.worker_id} exited {info.get('exit')} after SIGTERM "
                        "(None: killed after 30 s)")
    return {"name": f"worker SIG{kind.upper()} ({n} streams)", "problems": problems,
            "orphans": len(info.get("orphans", [])), "victim": info.get("victim"),
            "owners_at_fault": info.get("owners_at_fault"),
            "pending_at_fault": info.get("pending_at_fault"),
            "recovery_max_s": max(recover, default=None), "exit_s": info.get("exit_s"),
            "missing_result_audio_s": _missing_results(logs), **_stream_figures(logs)}


def _missing_results(logs: list[StreamLog]) -> float:
    """Longest run of audio without a result over all streams, s (1.0 when none is missing)."""
    worst = 0.0
    for log in logs:
        edges = [0.0, *(float(r["audio_s"]) for _, r in log.results)]
        worst = max([worst, *(b - a for a, b in zip(edges, edges[1:], strict=False))])
    return round(worst, 3)


async def gateway_restart(cluster: Cluster, pool: list[np.ndarray], n: int, *,
                          crash: bool = False, after_s: float = 4.0) -> dict:
    """``n`` streams through gateway 0 (the others are their fallback); gateway 0 is restarted
    (SIGTERM, or SIGKILL with ``crash``) ``after_s`` in. Expected: every client resumes through
    another gateway and gets every result once, in order, nothing lost."""
    assert len(cluster.gateways) >= 2, "a gateway restart needs a second gateway"

    async def fault(logs, tap) -> None:
        await asyncio.sleep(after_s)
        await asyncio.to_thread(cluster.gateways[0].restart, crash=crash)

    logs, tap, _ = await streams(cluster, pool, n, during=fault)
    problems = _check(logs, tap)
    resumed = sum(log.resumes > 0 for log in logs)
    on_g0 = sum(1 for log in logs if log.gateways and log.gateways[0] == cluster.gateways[0].url)
    if resumed < on_g0:
        problems.append(f"{on_g0} streams were on the restarted gateway, {resumed} resumed")
    return {"name": f"gateway {'SIGKILL' if crash else 'SIGTERM'} restart ({n} streams)",
            "problems": problems, "on_restarted_gateway": on_g0, "resumed": resumed,
            **_stream_figures(logs)}


async def redis_restart(cluster: Cluster, pool: list[np.ndarray], n: int, *,
                        after_s: float = 4.0, down_s: float = 2.0) -> dict:
    """Redis killed ``after_s`` into ``n`` streams, down ``down_s``, started again.

    Without persistence every session is gone: each client must get a retryable error
    (``unavailable``) or a clean protocol answer, never ``internal`` and never an address, and a
    new stream must be served once Redis is back. With AOF (``appendfsync everysec``; stopped
    with SIGTERM, so nothing is lost) sessions survive: every client resumes and finishes."""
    persistent = cluster.redis.persistence == "aof"

    async def fault(logs, tap) -> None:
        await asyncio.sleep(after_s)
        await asyncio.to_thread(cluster.redis.restart, crash=not persistent, down_s=down_s)

    logs, tap, _ = await streams(cluster, pool, n, during=fault)
    problems: list[str] = []
    for log in logs:
        for e in log.errors + log.retried:
            msg = str(e.get("message", ""))
            if e.get("code") == "internal":
                problems.append(f"{log.name}: internal error: {msg}")
            if "127.0.0.1" in msg or "Error 111" in msg or "redis://" in msg:
                problems.append(f"{log.name}: the error leaks an address: {msg}")
    if persistent:  # AOF, stopped cleanly: every session resumes and finishes
        problems += _check(logs, tap, every_s=None)
    else:  # gone: `unavailable` while Redis is down, then `unknown_session` (protocol.md)
        for log in logs:
            seen = {f"{e.get('code')}/{e.get('reason')}" for e in log.errors + log.retried}
            if log.final is None and not seen:
                problems.append(f"{log.name}: neither finished nor told why "
                                f"({log.exception}, closes {log.closes})")
            odd = {c for c in seen if not c.startswith("unavailable/")
                   and c != "bad_request/unknown_session"}
            if odd:
                problems.append(f"{log.name}: errors {sorted(odd)} (expected unavailable, then "
                                "unknown_session)")
    cluster.wait_workers(len([w for w in cluster.workers if w.alive]), 60)
    after, tap2, _ = await streams(cluster, pool, 1, timeout_s=120)
    problems += [f"after the restart: {p}" for p in _check(after, tap2, every_s=None)]
    codes: dict[str, int] = {}
    for log in logs:
        for e in log.errors + log.retried:
            codes[f"{e.get('code')}/{e.get('reason')}"] = codes.get(
                f"{e.get('code')}/{e.get('reason')}", 0) + 1
    return {"name": f"Redis restart, persistence {cluster.redis.persistence} ({n} streams)",
            "problems": problems, "finished": sum(log.final is not None for log in logs),
            "errors": codes, "resumed": sum(log.resumes > 0 for log in logs)}


# ---------------------------------------------------------------------------- hostile
async def hostile(cluster: Cluster, pool: list[np.ndarray], n_conversations: int, *,
                  normal_s: float = 20.0, idle_timeout_s: float, handshake_timeout_s: float,
                  seed: int = 0, concurrency: int = 6, rss_limit_mb: float = 100.0) -> dict:
    """Generated abuse, the explicit cases, a poison session on the bus, idle websockets and a
    slowloris client, all while a normal real-time stream of ``normal_s`` runs alongside (from
    its own address). Expected: 0 internal errors, 0 tracebacks in any log, the normal stream
    served on time with every promise kept, the gateway's RSS growth under ``rss_limit_mb``,
    idle and slowloris connections closed within their timeouts (+ 2 s)."""
    from bench import rel_hostile as H

    g = cluster.gateways[0]
    url = g.url
    t_gen = time.monotonic()
    convs = H.generate(n_conversations, seed=seed)
    gen_s = time.monotonic() - t_gen
    messages = sum(H.n_messages(c) for c in convs)
    rss0 = g.rss()
    problems: list[str] = []
    normal_pcm = pool[0][: int(normal_s * RATE)]

    async def abuse(logs, tap) -> None:
        idle = [asyncio.create_task(H.idle_websocket(url, start=s, address=f"127.0.0.{6 + s}",
                                                     limit_s=idle_timeout_s + 30))
                for s in (False, True)]
        slow = asyncio.create_task(asyncio.to_thread(H.slowloris, g.port,
                                                     limit_s=handshake_timeout_s + 30))
        cases = await H.explicit_cases(url)
        _progress(f"hostile: {len(cases)} explicit cases done")
        poison = await poison_session(cluster, pool[1])
        _progress("hostile: poison session done")
        outcomes = await H.run_generated(url, convs, concurrency=concurrency)
        _progress(f"hostile: {len(outcomes)} generated conversations done")
        idle_out = await asyncio.gather(*idle)
        slow_s = await slow
        _progress("hostile: idle and slowloris clients done")
        report.update(cases=cases, poison=poison, outcomes=outcomes, idle=idle_out,
                      slow_s=slow_s)

    report: dict = {}
    t0 = time.monotonic()
    logs, tap, _ = await streams(cluster, [normal_pcm], 1, during=abuse, timeout_s=normal_s + 120)
    wall = time.monotonic() - t0
    normal = logs[0]
    problems += [f"normal stream: {p}" for p in _check(logs, tap)]
    if normal.done_at is not None and normal.done_at - normal.started_at > normal_s + 3.0:
        problems.append(f"the normal stream took {normal.done_at - normal.started_at:.1f} s for "
                        f"{normal_s:g} s of audio")
    for c in report["cases"]:
        if not c.ok:
            problems.append(f"case {c.name!r}: {c.detail}")
    problems += report["poison"]["problems"]
    internal = [o for o in report["outcomes"] if o.problems()]
    for o in internal[:20]:
        problems.append(f"generated {o.name}: {'; '.join(o.problems())} (sent {o.sent}, got "
                        f"{[m.get('type') for m in o.received]}, close {o.close_code}, "
                        f"{o.seconds:.1f} s): {H.describe(convs[int(o.name[3:])])}")
    if len(internal) > 20:
        problems.append(f"... {len(internal) - 20} more generated connections with problems")
    for seconds, o in report["idle"]:
        if o.close_code != 4408 or seconds > idle_timeout_s + 2.0:
            problems.append(f"{o.name}: closed after {seconds:.1f} s with {o.close_code} "
                            f"(expected 4408 within {idle_timeout_s:g} + 2 s)")
    if report["slow_s"] > handshake_timeout_s + 2.0:
        problems.append(f"slowloris connection open {report['slow_s']:.1f} s (handshake timeout "
                        f"{handshake_timeout_s:g} s)")
    await asyncio.sleep(1.0)
    rss1 = g.rss()
    if rss1 - rss0 > rss_limit_mb * 2**20:
        problems.append(f"gateway RSS grew {(rss1 - rss0) / 2**20:.0f} MiB (limit "
                        f"{rss_limit_mb:g} MiB)")
    tracebacks = cluster.tracebacks()
    for log_name, tbs in tracebacks.items():
        problems.append(f"{len(tbs)} traceback(s) in {log_name}; the first: {tbs[0][-700:]}")
    codes: dict[str, int] = {}
    for o in report["outcomes"]:
        for m in o.received:
            if m.get("type") == "error":
                k = f"{m.get('code')}/{m.get('reason')}"
                codes[k] = codes.get(k, 0) + 1
    return {"name": f"hostile input ({messages} generated messages)", "problems": problems,
            "conversations": len(convs), "messages": messages, "generation_s": round(gen_s, 1),
            "wall_s": round(wall, 1), "error_codes": dict(sorted(codes.items())),
            "internal": sum(1 for o in report["outcomes"] for m in o.received
                            if m.get("code") == "internal"),
            "cases": [{"case": c.name, "ok": c.ok, "detail": c.detail} for c in report["cases"]],
            "idle_closed_s": [round(s, 1) for s, _ in report["idle"]],
            "slowloris_closed_s": round(report["slow_s"], 1),
            "gateway_rss_mb": [round(rss0 / 2**20), round(rss1 / 2**20)],
            "normal_stream_s": round((normal.done_at or float("nan")) - normal.started_at, 1),
            "poison": {k: v for k, v in report["poison"].items() if k != "problems"}}


async def poison_session(cluster: Cluster, pcm: np.ndarray, wait_s: float = 10.0) -> dict:
    """A session whose stored parameters do not parse (``ch`` = ``"1.0"``, as an older gateway
    wrote it), put on the bus by hand, then a normal stream. Expected: the worker fails the
    poison session alone (a final result with an error) and the normal stream gets its first
    result within 3 s of audio, as usual."""
    from worker.redis_bus import RedisBus

    bus = RedisBus(cluster.redis.url)
    sid = "poison" + os.urandom(13).hex()
    problems = []
    try:
        eid = await bus.r.xadd(bus.sessions_key, {"s": sid})
        await bus.r.hset(bus.meta_key(sid), mapping={"sr": 22050, "ch": "1.0",
                                                     "enc": "pcm_s16le", "n": 0, "x": eid})
        await bus.r.pexpire(bus.meta_key(sid), 60_000)
        await bus.r.sadd(bus.active_key, sid)
        t0 = time.monotonic()
        log = await run_stream([g.url for g in cluster.gateways], pcm[: 5 * RATE], RATE,
                               name="after poison", local_addr="127.0.0.4", timeout_s=60)
        first = log.results[0][0] - log.started_at if log.results else None
        if first is None or first > 3.0 or stream_problems(log):
            problems.append(f"a stream after the poison session: first result after {first} s,"
                            f" {stream_problems(log)}")
        final = None
        while time.monotonic() - t0 < wait_s and final is None:
            got = await bus.r.xrange(bus.results_key(sid))
            final = next((r for r in (json.loads(f[b"r"]) for _, f in got)
                          if r.get("final")), None)
            if final is None:
                await asyncio.sleep(0.2)
        if final is None or not final.get("error"):
            problems.append(f"the poison session got no error result in {wait_s:g} s "
                            f"(got {final})")
    finally:
        await bus.close()
    return {"problems": problems, "first_result_s": first,
            "poison_error": (final or {}).get("error")}


# -------------------------------------------------------------------------- index build
def _midimatch() -> str:
    from bench.rel_cluster import MIDIMATCH

    return str(MIDIMATCH)


def index_pool_kill(workdir: Path, midi: list[Path], *, kill_after_s: float = 3.0,
                    timeout_s: float = 240.0) -> dict:
    """``index build --rebuild`` over an existing index with 2 pool workers; one pool worker
    SIGKILLed ``kill_after_s`` in (an out-of-memory kill). Expected: the build finishes (exit 0)
    and the index loads with every file indexed or reported skipped."""
    from bench.rel_cluster import build_small_index, children
    from index.store import load_index

    out = workdir / "pool-kill-index"
    build_small_index(out, midi[:2])
    cmd = [_midimatch(), "index", "build", "--workers", "2", "--no-progress", "--rebuild",
           "--json", str(out), *map(str, midi)]
    t0 = time.monotonic()
    with open(workdir / "pool-kill.log", "wb") as logf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL)
    killed = None
    while time.monotonic() - t0 < kill_after_s + 30 and killed is None and p.poll() is None:
        kids = [c for c in children(p.pid) if b"resource_tracker" not in _cmdline(c)
                and b"forkserver" not in _cmdline(c)]
        if len(kids) >= 2 and time.monotonic() - t0 >= kill_after_s:
            killed = kids[-1]
            os.kill(killed, 9)
        time.sleep(0.1)
    problems = []
    try:
        stdout, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        stdout, _ = p.communicate()
        problems.append(f"the build was still running {timeout_s:g} s after a pool worker "
                        "was killed (killed it)")
    if killed is None:
        problems.append("no pool worker to kill (the build ended first?)")
    if p.returncode != 0 and not problems:
        problems.append(f"the build exited {p.returncode}: "
                        + (workdir / "pool-kill.log").read_text(errors="replace")[-800:])
    n_refs = None
    try:
        n_refs = len(load_index(out).refs)
    except Exception as e:  # noqa: BLE001 - reported
        problems.append(f"the index does not load: {e}")
    if n_refs is not None and n_refs < len(midi) - 1:
        problems.append(f"{n_refs} of {len(midi)} files indexed (one may be skipped)")
    return {"name": "index build: pool worker SIGKILL", "problems": problems,
            "killed_pid": killed, "refs": n_refs, "files": len(midi),
            "wall_s": round(time.monotonic() - t0, 1), "exit": p.returncode}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def index_disk_full(workdir: Path, midi: list[Path], *, size_mb: int = 24,
                    fill_after_s: float = 2.0, timeout_s: float = 240.0) -> dict:
    """``index build --rebuild`` on a disk that fills up ``fill_after_s`` into the build.

    The disk is a ``size_mb`` tmpfs mounted for the purpose (root and CAP_SYS_ADMIN), else the
    build runs under RLIMIT_FSIZE (writes past the limit fail with EFBIG instead of ENOSPC).
    Expected: a non-zero exit with a clear message (no traceback), the old index intact."""
    import resource
    import shutil

    from bench.rel_cluster import build_small_index
    from index.store import load_index

    mnt = workdir / "small-disk"
    mnt.mkdir(parents=True, exist_ok=True)
    method = f"tmpfs {size_mb} MiB"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                              str(mnt)], capture_output=True).returncode == 0
    preexec = None
    if not mounted:
        method = "RLIMIT_FSIZE 64 KiB (EFBIG, not ENOSPC: no tmpfs could be mounted)"

        def preexec() -> None:  # noqa: F811 - the fallback
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    problems: list[str] = []
    try:
        out = mnt / "index"
        build_small_index(out, midi[:2])
        before = sorted(r["sha256"] for r in load_index(out).refs)
        cmd = [_midimatch(), "index", "build", "--workers", "1", "--no-progress", "--rebuild",
               str(out), *map(str, midi)]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, preexec_fn=preexec)
        filler = None
        if mounted:
            time.sleep(fill_after_s)
            filler = mnt / "filler"
            with open(filler, "wb") as f, _suppress_enospc():
                while True:
                    f.write(b"\0" * (1 << 16))
        try:
            stdout, stderr = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            problems.append(f"the build hung on a full disk (killed after {timeout_s:g} s)")
        err = stderr.decode(errors="replace")
        if p.returncode == 0:
            problems.append("the build succeeded on a full disk (the disk was not filled in "
                            "time?)")
        elif "Traceback" in err:
            problems.append(f"a traceback instead of a clear error: {err[-600:]}")
        elif not any(w in err.lower() for w in ("space", "enospc", "disk", "file too large",
                                                  "efbig")):
            problems.append(f"the error does not say the disk is full: {err[-400:]}")
        if filler is not None:
            filler.unlink()
        try:
            after = sorted(r["sha256"] for r in load_index(out).refs)
            if after != before:
                problems.append(f"the old index changed: {len(before)} → {len(after)} refs")
        except Exception as e:  # noqa: BLE001 - reported
            problems.append(f"the old index does not load: {e}")
        return {"name": "index build: disk full", "problems": problems, "method": method,
                "exit": p.returncode, "message": err.strip().splitlines()[-1][:200] if err.strip()
                else "", "wall_s": round(time.monotonic() - t0, 1)}
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


class _suppress_enospc:
    def __enter__(self):
        return self

    def __exit__(self, et, e, tb) -> bool:
        return et is not None and issubclass(et, OSError)
