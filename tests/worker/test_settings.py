"""The worker's and the bus's settings: non-finite floats are refused like out-of-range ones."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from worker.engine_settings import EngineSettings
from worker.session import EngineError
from worker.settings import BusSettings, WorkerSettings, WorkerSettingsError

NON_FINITE = ["nan", "inf", "-inf"]


def float_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.type in ("float", "float | None")]


def test_every_float_setting_is_covered():
    assert {"retain_s", "session_ttl_s", "result_ttl_s", "redis_timeout_s"} <= set(
        float_fields(BusSettings))
    assert {"poll_s", "claim_every_s", "stall_s", "reap_after_s", "tick_budget_s"} <= set(
        float_fields(WorkerSettings))
    assert {"tick_budget_s", "slack_s", "max_pending_s", "prune_wait_s", "prune_stale_s"} <= set(
        float_fields(EngineSettings))


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("cls, name", [(c, n) for c in (BusSettings, WorkerSettings)
                                       for n in float_fields(c)])
def test_a_non_finite_float_setting_is_refused(cls, name, value):
    """Review: nan passed every range check (it compares false both ways), inf most of them."""
    with pytest.raises(WorkerSettingsError, match=f"^{name} must be a finite number, got"):
        cls.from_env({f"MIDIMATCH_{name.upper()}": value})
    with pytest.raises(WorkerSettingsError, match=name):
        cls(**{name: float(value)})


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("name", float_fields(EngineSettings))
def test_a_non_finite_engine_setting_is_refused(name, value):
    with pytest.raises(EngineError, match=f"^bad engine settings: {name}=") as e:
        EngineSettings(**{name: float(value)})
    assert e.value.reason == "bad_settings"


def test_finite_settings_still_pass():
    assert math.isfinite(WorkerSettings(stall_s=1e6).stall_s)
    assert EngineSettings(slack_s=0.0).slack_s == 0.0


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("redis://default:s3cret@10.0.0.5/2", "redis://default:***@10.0.0.5/2"),
    ("rediss://u:p%40ss@[::1]:6380", "rediss://u:***@[::1]:6380"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://u:s3cret@host:notaport", "***@host:notaport"),
    (None, "-"),
])
def test_a_redis_url_is_logged_without_its_password(url, shown):
    from worker.settings import url_for_log

    assert url_for_log(url) == shown
