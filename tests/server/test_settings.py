"""Settings: environment, overrides, validation."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from server.settings import Settings, SettingsError
from tests.server.test_serve_listen import assert_clean_failure, busy_port, run_serve

__all__ = ["busy_port"]  # a fixture, used by name


def test_environment_then_overrides():
    env = {"MIDIMATCH_PORT": "9000", "MIDIMATCH_AUTH_TOKEN": "t", "MIDIMATCH_MAX_SESSION_S": "60",
           "MIDIMATCH_INDEX": "~/idx", "MIDIMATCH_REDIS_URL": ""}
    s = Settings.from_env(env, port=9100, host=None)
    assert s.port == 9100 and s.host == "127.0.0.1"  # flag beats env; None = not given
    assert s.auth_token == "t" and s.max_session_s == 60.0 and s.redis_url is None
    assert s.index_dir == Path("~/idx").expanduser()
    assert Settings.from_env({"MIDIMATCH_INDEX_DIR": "/a", "MIDIMATCH_INDEX": "/b"}
                             ).index_dir == Path("/a")


@pytest.mark.parametrize("env, kw, match", [
    ({"MIDIMATCH_PORT": "eighty"}, {}, "MIDIMATCH_PORT"),
    ({}, {"max_message_bytes": 100}, "max_message_bytes"),
    ({}, {"idle_timeout_s": 0}, "idle_timeout_s"),
    ({}, {"resume_grace_s": -1}, "resume_grace_s"),
    ({}, {"nonsense": 1}, "unknown"),
])
def test_bad_settings(env, kw, match):
    with pytest.raises(SettingsError, match=match):
        Settings.from_env(env, **kw)


@pytest.mark.parametrize("env, kw", [
    ({"MIDIMATCH_AUTH_TOKEN": ""}, {}),
    ({}, {"auth_token": ""}),
    ({"MIDIMATCH_AUTH_TOKEN": "two words"}, {}),
    ({"MIDIMATCH_AUTH_TOKEN": "t\u00e9"}, {}),
])
def test_an_empty_or_unusable_token_is_a_startup_error(env, kw):
    with pytest.raises(SettingsError, match="auth_token|AUTH_TOKEN") as e:
        Settings.from_env(env, **kw)
    assert "two words" not in str(e.value)  # the value is never shown


def test_a_token_flag_beats_an_empty_variable():
    assert Settings.from_env({"MIDIMATCH_AUTH_TOKEN": ""}, auth_token="x").auth_token == "x"


FLOAT_SETTINGS = [f.name for f in fields(Settings) if f.type == "float"]


def test_every_float_setting_is_covered():
    assert {"idle_timeout_s", "resume_grace_s", "capacity_cache_s"} <= set(FLOAT_SETTINGS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "infinity"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_a_non_finite_float_setting_is_refused(name, value):
    """Review: MIDIMATCH_IDLE_TIMEOUT_S=nan, MIDIMATCH_RESUME_GRACE_S=inf... passed every range
    check (nan compares false both ways) and serve started."""
    with pytest.raises(SettingsError, match=f"^{name} must be a finite number, got"):
        Settings.from_env({f"MIDIMATCH_{name.upper()}": value})
    with pytest.raises(SettingsError, match=name):
        Settings(**{name: float(value)})


def test_serve_refuses_a_nan_setting_in_one_line(busy_port):
    """Before anything starts: the port is taken, so a serve that took nan fails on that."""
    r = run_serve("--port", str(busy_port), "--redis", "redis://127.0.0.1:1/0",
                  env={"MIDIMATCH_IDLE_TIMEOUT_S": "nan"})
    assert_clean_failure(r, "idle_timeout_s must be a finite number, got nan")
