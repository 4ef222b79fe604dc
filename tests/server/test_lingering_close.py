"""The lingering close (server/listen.py), over real TCP on loopback: a client still writing a
message past the transport's cap when the gateway closes reads its ``ready`` and the 1009 close;
the linger ends at the client's FIN, after ``linger_s`` or ``linger_bytes`` for a client that
never stops, and when the site stops; a lingering connection keeps its slot under the caps.

Issue #20's hostile run saw a client send ``start``, a small binary message and a 2,167,152-byte
one (past the cap of 2,162,688) and get nothing at all, closed 1006. The gateway closed the
socket while the client was still sending that message, so the kernel answered the client's next
bytes with a reset; the client's next write failed, and an asyncio client whose write fails
before its loop has read what arrived drops the connection with that unread (Linux itself keeps
the data readable after a reset: a blocking client that reads after the failed write still gets
it). The client here is that asyncio client with its reading paused while it writes: no timing
involved.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct

import pytest

from server.app import METRICS_KEY
from tests.server.conftest import FakeWorker, start_msg
from tests.server.test_listen import Gateway

pytestmark = pytest.mark.asyncio

LIMIT = 4096  # max_message_bytes: the transport's cap is 2 * LIMIT + 65536 = 73,728
TOO_LARGE = 2 * LIMIT + 65536 + 4464  # past the cap as issue #20's message was past its own
PIECE = 16384


def client_frame(opcode: int, payload: bytes, length: int | None = None) -> bytes:
    """A masked client frame; ``length`` (declared) with a shorter ``payload``: its start."""
    n = len(payload) if length is None else length
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked server frames in ``data``."""
    out, i = [], 0
    while i + 2 <= len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = struct.unpack("!H", data[i:i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack("!Q", data[i:i + 8])[0], i + 8
        out.append((opcode, data[i:i + n]))
        i += n
    return out


class RawClient(asyncio.Protocol):
    """A websocket client on an asyncio transport, frame by frame."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.data = bytearray()
        self.upgraded = loop.create_future()
        self.lost = loop.create_future()  # the exception the connection was lost with, or None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if not self.upgraded.done() and b"\r\n\r\n" in self.data:
            end = self.data.index(b"\r\n\r\n") + 4
            self.upgraded.set_result(bytes(self.data[:end]))
            del self.data[:end]

    def eof_received(self) -> bool:
        self.eof = True
        return True  # half open: the test closes its side when it wants

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        _, c = await asyncio.get_running_loop().create_connection(cls, "127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        c.transport.write(f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(c.upgraded, 5.0)
        assert head.startswith(b"HTTP/1.1 101"), head
        return c


async def wait_for(condition, seconds: float = 5.0, what: str = "") -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {seconds} s: {what}")


async def too_large_after_start(g: Gateway) -> RawClient:
    """A client that sent ``start``, 4 bytes of audio and the first piece of a message past the
    transport's cap, reading nothing (paused), once the gateway has refused that message."""
    c = await RawClient.connect(g.settings.port)
    c.transport.pause_reading()  # a client busy writing: what arrives waits in its socket
    c.transport.write(client_frame(1, start_msg().encode()))
    c.transport.write(client_frame(2, b"\0" * 4))
    c.transport.write(client_frame(2, b"\0" * PIECE, length=TOO_LARGE))
    reg = g.runner.app[METRICS_KEY].registry
    await wait_for(lambda: reg.get_sample_value("midimatch_gateway_errors_total",
                                                {"code": "too_large"}) == 1,
                   what="the gateway refused the message")
    await asyncio.sleep(0.05)  # its socket is closed (or lingering) on the next loop turn
    return c


async def test_a_client_still_sending_a_too_large_message_gets_ready_and_the_1009_close():
    """Fails without the lingering close: the client's writes after the close are reset, its
    transport is lost with BrokenPipeError/ConnectionResetError and it never reads anything."""
    async with Gateway(max_message_bytes=LIMIT) as g:
        async with FakeWorker(g.bus):
            c = await too_large_after_start(g)
            for sent in range(PIECE, TOO_LARGE, PIECE):  # the rest of the message, then more
                c.transport.write(b"\0" * min(PIECE, TOO_LARGE - sent))
                await asyncio.sleep(0.005)
            c.transport.write(client_frame(1, json.dumps({"type": "stop", "v": 1}).encode()))
            await asyncio.sleep(0.1)
            assert not c.lost.done(), f"the connection was lost: {c.lost.result()!r}"
            c.transport.resume_reading()
            await wait_for(lambda: c.eof, what="the gateway's FIN")
            frames = server_frames(bytes(c.data))
            assert [op for op, _ in frames] == [1, 8], frames  # a text message, a close
            assert json.loads(frames[0][1])["type"] == "ready"
            assert struct.unpack("!H", frames[1][1][:2])[0] == 1009  # too_large's close code
            assert g.site.guard.lingered == 1
            assert g.site.guard.total == 1  # still counted under the caps while it lingers
            c.transport.close()
            # the client's FIN ends the linger at once (not after linger_s): its slot comes back
            await wait_for(lambda: g.site.guard.total == 0 and not g.site.guard.lingering,
                           g.site.guard.linger_s / 2, "the slot released at the client's FIN")


async def test_lingering_is_bounded_in_time_and_bytes():
    """A client that never stops sending is closed (reset) after ``linger_s``, or once it sent
    ``linger_bytes`` more, whichever comes first; its slot is released then."""
    for linger_s, linger_bytes in ((0.3, 1 << 30), (30.0, 256 * 1024)):
        async with Gateway(max_message_bytes=LIMIT) as g:
            g.site.guard.linger_s, g.site.guard.linger_bytes = linger_s, linger_bytes
            async with FakeWorker(g.bus):
                c = await too_large_after_start(g)
                loop = asyncio.get_running_loop()
                t0 = next(iter(g.site.guard.lingering)).started
                while not c.lost.done() and loop.time() - t0 < 10.0:
                    c.transport.write(b"\0" * PIECE)
                    await asyncio.sleep(0.002)
                assert isinstance(c.lost.result(), (ConnectionResetError, BrokenPipeError))
                if linger_s < 1:
                    assert linger_s <= loop.time() - t0 < linger_s + 2.0
                else:
                    assert loop.time() - t0 < 5.0  # the byte cap, long before linger_s
                await wait_for(lambda: g.site.guard.total == 0 and not g.site.guard.lingering,
                               what="the slot released")


async def test_stopping_the_site_ends_lingering_connections():
    async with Gateway(max_message_bytes=LIMIT) as g:
        async with FakeWorker(g.bus):
            c = await too_large_after_start(g)
            assert len(g.site.guard.lingering) == 1
            await g.site.stop()
            assert not g.site.guard.lingering and g.site.guard.total == 0
            c.transport.close()
