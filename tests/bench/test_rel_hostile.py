"""bench/rel_hostile.py: issue #20's unanswered connection (``start``, 4 bytes of audio, a message
past the transport's cap, more text) played by the harness's own client against a gateway on
loopback gets its ``ready`` and the 1009 close; and a connection that gets no answer is reported
with how its client's side failed."""

from __future__ import annotations

import aiohttp
import pytest

from bench import rel_hostile as H
from tests.server.conftest import FakeWorker
from tests.server.test_listen import Gateway

ISSUE_20 = [H._start(channels=1), ("bin", b"\0" * 4),
            ("zeros", 2 * H.MAX_MESSAGE_BYTES + 70_000), ("text", "more")]


@pytest.mark.asyncio
async def test_a_message_past_the_cap_gets_ready_and_the_1009_close():
    async with Gateway(max_message_bytes=H.MAX_MESSAGE_BYTES) as g:
        async with FakeWorker(g.bus), aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{g.settings.port}/v1/stream"
            for i in range(3):
                o = await H.run_conversation(http, url, ISSUE_20, f"issue20-{i}")
                assert [m.get("type") for m in o.received] == ["ready"], o
                assert o.close_code == 1009 and o.problems() == [], o


def test_an_unanswered_start_says_how_the_clients_side_failed():
    lost = "ClientConnectionResetError: Cannot write to closing transport"
    assert H.Outcome("gen1", started=True, close_code=1006, lost=lost).problems() == [
        f"a start got no answer (the client's connection failed first: {lost})"]
    assert H.Outcome("gen2", started=True).problems() == ["a start got no answer"]
