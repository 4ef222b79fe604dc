"""The short version of bench/reliability.py (issue #20), in `make test`: real processes.

One redis-server, a gateway (``midimatch serve --redis``, idle timeout 4 s, handshake timeout
3 s, resume grace 2 s) and two ``midimatch worker``\\s on loopback. Each test runs one scenario of
bench/rel_scenarios.py small and asserts it found no problem (a problem is a broken promise of
docs/protocol.md or docs/reliability.md, each a sentence in the assertion message):

* concurrent real-time streams: every chunk stored once, in order, byte for byte (a tap reads
  Redis as they run), the workers processed exactly the audio sent, a result per second of
  audio, none twice, a final one covering all the audio;
* hostile input: the issue's regression cases, a poison session put on the bus by hand, a few
  hundred hypothesis-generated messages, idle websockets that answer pings and a slowloris
  client, while a normal stream runs alongside and must finish on time; no internal error, no
  traceback in any log, gateway memory bounded;
* a worker SIGKILLed under load (last: it leaves one worker).
"""

from __future__ import annotations

import pytest

from bench import rel_scenarios as S
from tests.integration.conftest import audio_pool, no_problems

pytestmark = pytest.mark.asyncio
IDLE_TIMEOUT_S, HANDSHAKE_TIMEOUT_S = 4.0, 3.0
CLUSTER = {"gateways": 1, "workers": 2,
           "gateway_env": {"MIDIMATCH_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
                           "MIDIMATCH_HANDSHAKE_TIMEOUT_S": str(HANDSHAKE_TIMEOUT_S),
                           "MIDIMATCH_RESUME_GRACE_S": "2"}}


async def test_concurrent_streams_lose_and_repeat_nothing(cluster, index_and_audio) -> None:
    report = await S.load(cluster, audio_pool(index_and_audio[1], 4, 8.0), 4)
    assert report["problems"] == [], no_problems(report)
    assert report["results"] >= 4 * 8  # a result per second of audio, the final included


async def test_hostile_input_hurts_no_one(cluster, index_and_audio) -> None:
    report = await S.hostile(cluster, audio_pool(index_and_audio[1], 2, 12.0), 80,
                             normal_s=12.0, idle_timeout_s=IDLE_TIMEOUT_S,
                             handshake_timeout_s=HANDSHAKE_TIMEOUT_S, seed=20)
    assert report["messages"] >= 200
    assert report["problems"] == [], no_problems(report)


async def test_a_worker_killed_under_load(cluster, index_and_audio) -> None:
    report = await S.worker_fault(cluster, audio_pool(index_and_audio[1], 4, 10.0), 4,
                                  kind="kill", after_s=2.0)
    assert report["orphans"] >= 1
    assert report["problems"] == [], no_problems(report)
