"""Scale-out on loopback (issue #19): one Redis, two gateways, three workers, real processes.

Thirty concurrent real-time sessions spread over all three workers (asserted from the bus: each
session's owner in its meta hash, each worker's pending hand-out entries in the consumer group);
the busiest worker SIGKILLed and its sessions continuing on the others with no client error;
one gateway restarted while its clients stream, and every one of them resuming through the other
gateway with nothing lost or repeated; a worker scaled in with SIGTERM handing its sessions back
(exit 0, the others carry on before its lease would have lapsed).

Sized for the 2-core machine `make test` runs on: sessions of 8 s of audio (a second excerpt
from the integration piece each), the later phases with 10 sessions on the two or one workers
left. Every phase asserts the scenario found no problem (bench/rel_scenarios.py: every chunk
stored once and in order, results in order and none twice, a final one with all the audio).
"""

from __future__ import annotations

import pytest

from bench import rel_scenarios as S
from tests.integration.conftest import audio_pool, no_problems

pytestmark = pytest.mark.asyncio
CLUSTER = {"gateways": 2, "workers": 3}
SESSIONS = 30


async def test_thirty_sessions_spread_and_survive_a_worker_crash(cluster,
                                                                 index_and_audio) -> None:
    pool = audio_pool(index_and_audio[1], 10, 8.0)
    report = await S.worker_fault(cluster, pool, SESSIONS, kind="kill", after_s=1.0)
    owners = report["owners_at_fault"]
    assert set(owners) == {"w1", "w2", "w3"}, no_problems(report)  # all three serve
    assert min(owners.values()) >= SESSIONS // 6, no_problems(report)  # half a fair share
    pending = report["pending_at_fault"]
    assert sum(pending.get(w, 0) for w in ("w1", "w2", "w3")) == SESSIONS, no_problems(report)
    assert report["orphans"] >= SESSIONS // 6
    assert report["problems"] == [], no_problems(report)


async def test_a_gateway_restart_resumes_through_the_other(cluster, index_and_audio) -> None:
    report = await S.gateway_restart(cluster, audio_pool(index_and_audio[1], 10, 8.0), 10,
                                     after_s=3.0)
    assert report["on_restarted_gateway"] >= 3
    assert report["problems"] == [], no_problems(report)


async def test_a_worker_scaled_in_hands_its_sessions_back(cluster, index_and_audio) -> None:
    report = await S.worker_fault(cluster, audio_pool(index_and_audio[1], 10, 8.0), 10,
                                  kind="term", after_s=2.0)
    assert report["orphans"] >= 1
    assert report["problems"] == [], no_problems(report)
