"""Hostile clients for the reliability harness: generated protocol abuse and explicit cases.

:func:`generate` draws whole conversations (one websocket each) with hypothesis: messages of
every JSON type where the protocol wants a number or a string, versions ``1.0``/``true``/``"1"``,
rates in and out of 8–96 kHz, channels ``1.0``, encodings as lists and objects, resume ids past
2^64, deep nesting, binary before ``start``, odd lengths, NaN floats, messages at and past the
size limit, several ``start``\\s, ``stop`` before ``start``, bursts and pauses.
:func:`run_conversation` plays one and records what came back.

The explicit cases (:data:`CASES`) are the issue's findings, each with the answer the protocol
(docs/protocol.md) says it gets. The expectations of every run: no ``internal`` error, no close
1011, every error code one of the protocol's with its close code, every ``start`` answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import dataclass, field

import numpy as np

# The protocol's error codes and close codes (docs/protocol.md); ``unavailable`` is the
# retryable one for an outage of the service's own dependencies.
CLOSE_CODES = {"bad_request": 4400, "unauthorized": 4401, "timeout": 4408, "too_large": 1009,
               "busy": 1013, "internal": 1011, "unavailable": 1013}
MAX_MESSAGE_BYTES = 1 << 20
HANG_S = 30.0  # a conversation still going after this long is a hang


# --------------------------------------------------------------------------- generation
def strategies():
    """The hypothesis strategy of one conversation: a list of actions (see module doc)."""
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
    junk = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), c,
                                                                     max_size=4)),
                        max_leaves=12)
    version = st.one_of(st.just(1), st.sampled_from([1.0, True, "1", 2, 0, -1, None, 1e308]), junk)
    rate = st.one_of(st.integers(8000, 96000), st.sampled_from([
        44100, 22050, 16000, 91403, 8000, 96000, 7999, 96001, 0, -44100, 2**63, 2**64]),
        st.integers(-2**70, 2**70), st.floats(), junk)
    channels = st.one_of(st.sampled_from([1, 2]), st.sampled_from([1.0, 2.0, True, 0, 3, -1, "1",
                                                                   2**64]), junk)
    encoding = st.one_of(st.sampled_from(["pcm_s16le", "pcm_f32le"]),
                         st.sampled_from(["PCM_S16LE", "", "pcm_u8", "pcm_s16le\x00"]),
                         st.lists(st.sampled_from(["pcm_s16le", "pcm_f32le"]), max_size=3),
                         st.dictionaries(st.text(max_size=5), scalars, max_size=3), junk)
    after = st.one_of(st.sampled_from(["0", "1-0", f"{2**64}-0", f"{2**64}-{2**64}", "-1",
                                       "a-b", "1-", "99999999999999999999999"]),
                      st.text(max_size=30), junk)
    session = st.one_of(st.text(max_size=40), st.sampled_from(["0" * 32, "x" * 2000]), junk)
    start = st.fixed_dictionaries(
        {"type": st.just("start"), "v": version},
        optional={"sample_rate": rate, "channels": channels, "encoding": encoding,
                  "session": session, "after": after, "extra": junk})
    good_start = st.fixed_dictionaries(
        {"type": st.just("start"), "v": st.just(1),
         "sample_rate": st.one_of(st.sampled_from([16000, 44100, 91403]),
                                  st.integers(8000, 96000)),
         "channels": st.sampled_from([1, 2]),
         "encoding": st.sampled_from(["pcm_s16le", "pcm_f32le"])})
    other = st.fixed_dictionaries({"type": st.one_of(st.sampled_from(
        ["stop", "result", "ready", "error", "ping", "", "START"]), junk), "v": version},
        optional={"extra": junk})
    text = st.one_of(
        start.map(lambda m: ("json", m)), other.map(lambda m: ("json", m)),
        st.text(max_size=200).map(lambda s: ("text", s)),
        st.integers(1000, 100_000).map(lambda k: ("text", "[" * k + "]" * k)),
        st.integers(1000, 20_000).map(
            lambda k: ("text", '{"type":"start","v":1,"sample_rate":16000,"x":'
                       + "[" * k + "]" * k + "}")),
        st.sampled_from(["1e999999", '"start"', "null", "[]", '{"v":1}', "{" * 3]).map(
            lambda s: ("text", s)))
    binary = st.one_of(
        st.binary(max_size=4096).map(lambda b: ("bin", b)),
        st.sampled_from([0, 1, 3, 4095, 8000, 32_000, 64_001, 0, 2, 6, MAX_MESSAGE_BYTES,
                         MAX_MESSAGE_BYTES + 1, 2 * MAX_MESSAGE_BYTES + 70_000]).map(
            lambda n: ("zeros", n)),
        st.integers(1, 2000).map(lambda n: ("nan", n)))
    pause = st.sampled_from([0.0, 0.01, 0.05, 0.2]).map(lambda s: ("sleep", s))
    action = st.one_of(text, binary, pause, st.just(("stop",)))
    free = st.lists(action, min_size=1, max_size=8)
    started = st.tuples(good_start.map(lambda m: ("json", m)),
                        st.lists(st.one_of(binary, pause, text, st.just(("stop",))),
                                 max_size=8)).map(lambda t: [t[0], *t[1]])
    return st.one_of(free, started)


def generate(n_conversations: int, seed: int = 0) -> list[list[tuple]]:
    """``n_conversations`` conversations drawn by hypothesis (generation only: nothing fails,
    so nothing shrinks; the seed makes a run repeatable)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list[list[tuple]] = []

    @hseed(seed)
    @settings(max_examples=n_conversations, phases=[Phase.generate], database=None,
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategies())
    def draw(conv: list[tuple]) -> None:
        out.append(conv)

    draw()
    return out


def describe(conv: list[tuple], limit: int = 600) -> str:
    """A conversation in short: texts and sizes (to reproduce a failure by hand)."""
    parts = []
    for a in conv:
        if a[0] == "json":
            parts.append(json.dumps(a[1], allow_nan=True)[:200])
        elif a[0] == "text":
            parts.append(f"text({len(a[1])}): {a[1][:60]!r}")
        elif a[0] == "bin":
            parts.append(f"bin({len(a[1])})")
        else:
            parts.append(f"{a[0]}({a[1] if len(a) > 1 else ''})")
    return " | ".join(parts)[:limit]


def n_messages(conv: list[tuple]) -> int:
    return sum(a[0] not in ("sleep",) for a in conv)


# ---------------------------------------------------------------------------- playing
@dataclass
class Outcome:
    """What one hostile connection got back."""

    name: str
    sent: int = 0
    received: list[dict] = field(default_factory=list)
    close_code: int | None = None
    refused: str | None = None  # the connection or upgrade was refused (HTTP status or error)
    started: bool = False  # a well-formed start was sent first
    hung: bool = False  # the server neither finished the exchange nor closed in time
    seconds: float = 0.0
    # The client's side failed before the server's close was read: a write or the reader
    # failed with this (a reset: the client may have dropped answers it had not read yet).
    lost: str | None = None

    def problems(self) -> list[str]:
        p = []
        for m in self.received:
            if m.get("type") == "error":
                code = m.get("code")
                if code == "internal":
                    p.append(f"internal error: {m.get('message')}")
                elif code not in CLOSE_CODES:
                    p.append(f"undocumented error code {code!r}")
                elif self.close_code not in (None, CLOSE_CODES[code]) and code != "too_large":
                    p.append(f"error {code} closed with {self.close_code}, not "
                             f"{CLOSE_CODES[code]}")
        if self.hung:
            p.append(f"the connection hung (no close within {HANG_S:g} s)")
        if self.close_code == 1011:
            p.append("closed with 1011 (internal)")
        if self.started and not self.received and self.refused is None:
            p.append("a start got no answer" + (f" (the client's connection failed first: "
                                                f"{self.lost})" if self.lost else ""))
        return p


def _payload(a: tuple) -> tuple[str, str | bytes] | None:
    kind = a[0]
    if kind == "json":
        return "text", json.dumps(a[1], allow_nan=True)
    if kind == "text":
        return "text", a[1]
    if kind == "bin":
        return "bin", a[1]
    if kind == "zeros":
        return "bin", bytes(a[1])
    if kind == "nan":
        return "bin", np.full(a[1], np.nan, "<f4").tobytes()
    if kind == "stop":
        return "text", json.dumps({"type": "stop", "v": 1})
    return None


async def run_conversation(http, url: str, conv: list[tuple], name: str = "",
                           linger_s: float = 0.3, answer_s: float = 3.0) -> Outcome:
    """Play ``conv`` on a new websocket; collect the answers until the server closes, or for
    ``linger_s`` after the last message (``answer_s`` when nothing came back yet)."""
    import aiohttp

    out = Outcome(name)
    first = conv[0] if conv else None
    out.started = bool(first and first[0] == "json" and first[1].get("type") == "start")
    t0 = time.monotonic()
    try:
        async with http.ws_connect(url, max_msg_size=1 << 22, autoclose=False,
                                   timeout=aiohttp.ClientWSTimeout(ws_close=3)) as ws:
            reader = asyncio.create_task(_read(ws, out))
            for a in conv:
                if ws.closed or reader.done():
                    break
                if a[0] == "sleep":
                    await asyncio.sleep(a[1])
                    continue
                kind, data = _payload(a)
                try:
                    if kind == "text":
                        await ws.send_str(data)
                    else:
                        await ws.send_bytes(data)
                except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
                    out.lost = f"writing message {out.sent + 1}: {type(e).__name__}: {e}"
                    break
                out.sent += 1
            wait = answer_s if not out.received else linger_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), wait)
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                await ws.close()
            out.close_code = out.close_code or ws.close_code
            exc = ws.exception()
            if out.lost is None and exc is not None:
                out.lost = f"{type(exc).__name__}: {exc}"
    except aiohttp.WSServerHandshakeError as e:
        out.refused = f"HTTP {e.status}"
    except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, OSError) as e:
        out.refused = f"{type(e).__name__}: {e}"
    out.seconds = time.monotonic() - t0
    return out


async def _read(ws, out: Outcome) -> None:
    import aiohttp

    async for m in ws:
        if m.type == aiohttp.WSMsgType.TEXT:
            with contextlib.suppress(ValueError):
                out.received.append(json.loads(m.data))
        elif m.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
            out.close_code = ws.close_code if ws.close_code is not None else m.data
            break
    if out.close_code is None:
        out.close_code = ws.close_code


async def run_generated(url: str, convs: list[list[tuple]], *, concurrency: int = 6,
                        first_address: int = 10) -> list[Outcome]:
    """Play ``convs``, ``concurrency`` at a time, each lane from its own 127.0.0.x address
    (so the per-address limits see several clients, as they would in the wild)."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for i, c in enumerate(convs):
        queue.put_nowait((i, c))
    outcomes: list[Outcome] = []

    async def lane(k: int) -> None:
        addr = f"127.0.0.{first_address + k}"
        conn = aiohttp.TCPConnector(local_addr=(addr, 0), force_close=True)
        async with aiohttp.ClientSession(connector=conn) as http:
            while not queue.empty():
                i, c = queue.get_nowait()
                outcomes.append(await bounded(run_conversation(http, url, c, name=f"gen{i}"),
                                              f"gen{i}"))

    await asyncio.gather(*(lane(k) for k in range(concurrency)))
    return outcomes


async def bounded(coro, name: str, limit_s: float = HANG_S) -> Outcome:
    """``coro``'s outcome, or a hung one after ``limit_s``."""
    try:
        return await asyncio.wait_for(coro, limit_s)
    except TimeoutError:
        return Outcome(name, hung=True, seconds=limit_s)


# ------------------------------------------------------------------------ explicit cases
@dataclass
class CaseResult:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


def _error_of(o: Outcome) -> dict | None:
    return next((m for m in o.received if m.get("type") == "error"), None)


def _expect_error(name: str, o: Outcome, code: str, reasons: tuple[str, ...] = (),
                  *, or_too_large: bool = False) -> CaseResult:
    """The case got ``code`` (with one of ``reasons``) and its close code, and no ``ready``;
    ``or_too_large``: ``too_large``/``message_too_large`` is as good (a message refused by its
    size before it is parsed)."""
    e = _error_of(o)
    if e is None:
        return CaseResult(name, False, f"no error message; got {o.received[:3]}, close "
                          f"{o.close_code}, refused {o.refused}", o.seconds)
    if or_too_large and e.get("code") == "too_large":
        code, reasons = "too_large", ("message_too_large",)
    ok = (e.get("code") == code and (not reasons or e.get("reason") in reasons)
          and not any(m.get("type") == "ready" for m in o.received)
          and o.close_code == CLOSE_CODES[code])
    return CaseResult(name, ok, f"{e.get('code')}/{e.get('reason')} close {o.close_code}: "
                      f"{str(e.get('message'))[:120]}", o.seconds)


def _start(**kw) -> tuple:
    return ("json", {"type": "start", "v": 1, "sample_rate": 16000, **kw})


BAD_START_CASES = {
    # name: (start message fields, expected reason(s))
    "channels 1.0": ({"channels": 1.0}, ("bad_channels",)),
    "channels true": ({"channels": True}, ("bad_channels",)),
    "v true": ({"v": True}, ("bad_version",)),
    "v 1.0": ({"v": 1.0}, ("bad_version",)),
    "v '1'": ({"v": "1"}, ("bad_version",)),
    "sample_rate 44100.0": ({"sample_rate": 44100.0}, ("bad_sample_rate",)),
    "sample_rate 2^64": ({"sample_rate": 2**64}, ("bad_sample_rate",)),
    "encoding list": ({"encoding": ["pcm_s16le"]}, ("bad_encoding",)),
    "encoding dict": ({"encoding": {"pcm_s16le": 1}}, ("bad_encoding",)),
    "session 2000 chars": ({"session": "x" * 2000}, ("bad_session", "unknown_session")),
    "session list": ({"session": ["a"]}, ("bad_session",)),
}


async def explicit_cases(url: str, *, rate_audio_s: float = 3.0) -> list[CaseResult]:
    """The issue's findings as regression cases (each on its own connection and address)."""
    import aiohttp

    results: list[CaseResult] = []
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.5", 0), force_close=True)
    async with aiohttp.ClientSession(connector=conn) as http:
        for name, (fields, reasons) in BAD_START_CASES.items():
            o = await bounded(run_conversation(http, url, [_start(**fields)], name), name)
            results.append(_expect_error(name, o, "bad_request", reasons))
        for deep in (1500, 5000):  # 1500 fits in a 4096-byte text message, 5000 does not
            o = await bounded(run_conversation(
                http, url, [("text", '{"type":"start","v":1,"sample_rate":16000,"x":'
                             + "[" * deep + "]" * deep + "}")], f"start nested {deep} deep"),
                "start nested")
            results.append(_expect_error(o.name, o, "bad_request", ("bad_json",),
                                         or_too_large=True))
        o = await bounded(run_conversation(http, url, [("text", "[" * 100_000 + "]" * 100_000)],
                                           "JSON nested 100000 deep"), "JSON nested")
        results.append(_expect_error(o.name, o, "bad_request", ("bad_json",), or_too_large=True))
        results.append(await _after_past_2_64(http, url))
        results.append(await _odd_rate(http, url, 91403, rate_audio_s))
    return results


async def _after_past_2_64(http, url: str) -> CaseResult:
    """A real session, dropped, then resumed with ``after`` = 2^64-0: bad_after, not internal."""
    t0 = time.monotonic()
    async with http.ws_connect(url) as ws:
        await ws.send_str(json.dumps(_start()[1]))
        ready = json.loads((await ws.receive(timeout=10)).data)
    sid = ready.get("session")
    if not sid:
        return CaseResult("resume after 2^64", False, f"no session: {ready}")
    o = await bounded(run_conversation(http, url, [_start(session=sid, after=f"{2**64}-0")],
                                       "resume after 2^64"), "resume after 2^64")
    r = _expect_error(o.name, o, "bad_request", ("bad_after",))
    r.seconds = time.monotonic() - t0
    return r


async def _odd_rate(http, url: str, rate: int, seconds: float) -> CaseResult:
    """A stream at an odd rate the protocol promises (8–96 kHz): served, with a final result
    and no error."""
    t0 = time.monotonic()
    tone = (np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate) * 8000
            ).astype("<i2").tobytes()
    step = int(0.25 * rate) * 2
    conv = [_start(sample_rate=rate), *[("bin", tone[i:i + step])
                                        for i in range(0, len(tone), step)], ("stop",)]
    o = await bounded(run_conversation(http, url, conv, f"sample rate {rate}", linger_s=15.0),
                      f"sample rate {rate}")
    final = next((m for m in o.received if m.get("type") == "result" and m.get("final")), None)
    err = _error_of(o)
    ok = final is not None and err is None and not final.get("error") and abs(
        float(final.get("audio_s", -1)) - len(tone) / 2 / rate) < 1e-3
    detail = (f"final at {final.get('audio_s')} s, answer {final.get('answer')}" if final
              else f"no final result; error {err}, close {o.close_code}")
    return CaseResult(o.name, ok, detail, time.monotonic() - t0)


# ------------------------------------------------------------------- idle and slow clients
async def idle_websocket(url: str, *, start: bool, ping_every_s: float = 1.0,
                         limit_s: float = 60.0, address: str = "127.0.0.6"
                         ) -> tuple[float, Outcome]:
    """A websocket that sends no audio but answers the server's pings and sends its own every
    ``ping_every_s`` (a browser tab left open). Seconds until the server closed it (``limit_s``
    if it never did), and what it got."""
    import aiohttp

    out = Outcome(f"idle websocket ({'after start' if start else 'no start'})")
    conn = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=conn) as http:
        async with http.ws_connect(url, autoping=True) as ws:
            if start:
                await ws.send_str(json.dumps(_start()[1]))
            reader = asyncio.create_task(_read(ws, out))
            while not reader.done() and time.monotonic() - t0 < limit_s:
                with contextlib.suppress(Exception):
                    await ws.ping()
                await asyncio.wait([reader], timeout=ping_every_s)
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            out.close_code = out.close_code or ws.close_code
    out.seconds = time.monotonic() - t0
    return out.seconds, out


def slowloris(port: int, *, every_s: float = 1.0, limit_s: float = 60.0,
              address: str = "127.0.0.7") -> float:
    """A raw TCP client that sends an HTTP request one header line every ``every_s`` and never
    finishes it. Seconds until the server closed the connection (``limit_s`` if it never did).
    Blocking: run it in a thread."""
    t0 = time.monotonic()
    lines = [b"GET /v1/stream HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Upgrade: websocket\r\n",
             b"Connection: Upgrade\r\n"] + [b"X-Slow-%d: 1\r\n" % i for i in range(10_000)]
    with socket.create_connection(("127.0.0.1", port), source_address=(address, 0)) as s:
        s.settimeout(every_s)
        for line in lines:
            if time.monotonic() - t0 > limit_s:
                break
            try:
                s.sendall(line)
                if s.recv(4096) == b"":
                    break  # closed
            except TimeoutError:
                continue  # still open, nothing said: send the next line
            except OSError:
                break
    return time.monotonic() - t0
