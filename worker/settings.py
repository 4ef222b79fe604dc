"""The worker's settings: one frozen object per process, from the environment and CLI flags.

Every field ``f`` is read from ``MIDIMATCH_<F>`` (upper case): ``MIDIMATCH_INDEX``,
``MIDIMATCH_REDIS_URL``, ``MIDIMATCH_DEVICE``, ``MIDIMATCH_WORKER_ID``, ``MIDIMATCH_METRICS_PORT``,
``MIDIMATCH_MAX_SESSIONS``, ``MIDIMATCH_LEASE_MS``, ``MIDIMATCH_RETAIN_S``... The index may also
be given as ``MIDIMATCH_INDEX_DIR`` (the gateway's name for it), so one deployment environment
serves both. ``midimatch worker`` flags override the environment.

:class:`BusSettings` are the bus's part (Redis URL and prefix, lease, audio retention, result
retention, expiries): the same variables, read the same way by the gateway and by the worker, so
a gateway's ``RedisBus`` trims audio and expires sessions exactly as the workers expect
(``RedisBus.from_settings(BusSettings.from_env(...))``). ``WorkerSettings.bus`` gives the
worker's; their defaults are :class:`BusSettings`'s, written once.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from model.env import settings_from_env
from model.errors import MidimatchError

DEVICES = ("auto", "cpu", "cuda")


class WorkerSettingsError(MidimatchError):
    """A worker setting with a value that cannot be used."""

    reason = "bad_setting"


def check_finite(settings: object) -> None:
    """Every float field of the dataclass ``settings`` is a finite number (``nan`` passes every
    range check, ``inf`` most of them). Raises :class:`WorkerSettingsError`."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise WorkerSettingsError(f"{f.name} must be a finite number, got {value!r}")


def url_for_log(url: str | None) -> str:
    """``url`` with its password (``redis://user:PASSWORD@host``) replaced by ``***``, for log
    lines and banners: a Redis URL from a Secret must not reach the pods' logs."""
    if url is None:
        return "-"
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    except ValueError:  # unparsable (a bad port): hide everything before the last '@'
        return "***@" + url.rsplit("@", 1)[1] if "@" in url else url
    return urlunsplit(parts._replace(netloc=netloc))


def default_worker_id() -> str:
    """``host-pid-xxxx``: unique per process, readable in Redis and in logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass(frozen=True)
class BusSettings:
    """What a gateway and a worker must agree on about the bus (every field ``MIDIMATCH_<F>``).

    Attributes
    ----------
    redis_url : str or None
        ``redis://host:port/db``.
    redis_prefix : str
        First part of every Redis key.
    lease_ms : int
        A session whose owner has not renewed for this long goes to another worker, ms; a worker
        whose heartbeat is older counts as dead.
    retain_s : float
        Audio retained per session, s of stream time (what a takeover rebuilds from; a worker
        further behind than this loses audio, and says so).
    max_results : int
        Results retained per session for resuming clients.
    session_ttl_s, result_ttl_s : float
        Expiry of an abandoned session, and of a finished session's results, s.
    redis_timeout_s : float
        A Redis command (or connection attempt) not answered within this long fails as
        ``BusError`` ``redis_unavailable`` (a frozen Redis hangs nothing for ever), s. Blocking
        reads block for less than this.
    """

    redis_url: str | None = None
    redis_prefix: str = "mm"
    lease_ms: int = 5000
    retain_s: float = 20.0
    max_results: int = 120
    session_ttl_s: float = 300.0
    result_ttl_s: float = 120.0
    redis_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("lease_ms", "retain_s", "max_results", "session_ttl_s", "result_ttl_s",
                     "redis_timeout_s"):
            if getattr(self, name) <= 0:
                raise WorkerSettingsError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lease_ms < 300:
            raise WorkerSettingsError(f"lease_ms must be ≥ 300 (renewed every third), got "
                                      f"{self.lease_ms!r}")
        if not self.redis_prefix:
            raise WorkerSettingsError("redis_prefix must not be empty")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> BusSettings:
        """Settings from ``MIDIMATCH_*`` variables, then ``overrides`` (``None`` = not given).

        Raises
        ------
        WorkerSettingsError
            A variable that does not parse, an unknown override, or an out-of-range value.
        """
        return settings_from_env(cls, env, overrides, error=WorkerSettingsError)


_BUS = BusSettings()


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker process needs to know.

    Attributes
    ----------
    index : Path or None
        The index folder (required to run a worker).
    redis_url : str or None
        ``redis://host:port/db`` (required for ``midimatch worker``; the embedded worker uses
        the gateway's in-process bus instead).
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    weights : Path or None
        Model weights; None: the shipped model.
    worker_id : str
        This worker's consumer name; unique per process.
    metrics_port : int
        Port of the Prometheus ``/metrics`` endpoint; 0: none.
    max_sessions : int
        Sessions this worker holds at once (its advertised capacity).
    lease_ms, retain_s, max_results, session_ttl_s, result_ttl_s, redis_prefix, redis_timeout_s
        The bus's settings (:class:`BusSettings`, :attr:`bus`).
    window_s, result_every_s, tick_budget_s : float
        The engine's query window, result period and per-tick time budget, s.
    prune_parts : int
        Parts of the query window the prune uses beside it (``EngineSettings.prune_parts``):
        2, the halves, by default; 0 trades some identification for about half the prune's CPU.
    poll_s : float
        Wait between two looks at the bus when nothing arrived, s (bounds the added latency).
    claim_every_s : float
        How often a worker holding sessions looks for more (one without waits this long in a
        blocking claim), s.
    stall_s : float
        A tick that made no progress (no round of the engine ended) for this long counts as
        hung: the worker stops renewing its leases (other workers take its sessions over) and
        advertises no capacity until the tick progresses again, s. Well above any honest round
        (a tick is budgeted ``tick_budget_s``; a cold start's first rounds compile kernels).
    reap_after_s : float
        A dead worker's consumer in the group, holding nothing, is deleted this long after its
        last interaction with Redis, s (every worker looks about every fifth of it).
    """

    index: Path | None = None
    redis_url: str | None = None
    device: str = "auto"
    weights: Path | None = None
    worker_id: str = field(default_factory=default_worker_id)
    metrics_port: int = 9101
    max_sessions: int = 64
    lease_ms: int = _BUS.lease_ms
    retain_s: float = _BUS.retain_s
    max_results: int = _BUS.max_results
    session_ttl_s: float = _BUS.session_ttl_s
    result_ttl_s: float = _BUS.result_ttl_s
    redis_prefix: str = _BUS.redis_prefix
    redis_timeout_s: float = _BUS.redis_timeout_s
    window_s: float = 10.0
    result_every_s: float = 1.0
    tick_budget_s: float = 0.5
    prune_parts: int = 2
    poll_s: float = 0.05
    claim_every_s: float = 0.25
    stall_s: float = 30.0
    reap_after_s: float = 300.0

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise WorkerSettingsError(f"device must be one of {DEVICES}, got {self.device!r}")
        check_finite(self)
        self.bus  # noqa: B018 - validates the bus's part
        positive = ("max_sessions", "window_s", "result_every_s", "tick_budget_s", "poll_s",
                    "claim_every_s", "stall_s", "reap_after_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise WorkerSettingsError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.prune_parts < 0:
            raise WorkerSettingsError(f"prune_parts must be >= 0, got {self.prune_parts!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise WorkerSettingsError(f"metrics_port must be in 0..65535, got "
                                      f"{self.metrics_port!r}")
        if not self.worker_id or any(c.isspace() for c in self.worker_id):
            raise WorkerSettingsError(f"worker_id must be non-empty without spaces, got "
                                      f"{self.worker_id!r}")

    @property
    def bus(self) -> BusSettings:
        """The bus's part of these settings."""
        return BusSettings(self.redis_url, self.redis_prefix, self.lease_ms, self.retain_s,
                           self.max_results, self.session_ttl_s, self.result_ttl_s,
                           self.redis_timeout_s)

    @property
    def renew_s(self) -> float:
        """How often leases are renewed and the heartbeat sent: a third of the lease, s."""
        return self.lease_ms / 3000.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from ``MIDIMATCH_*`` variables, then ``overrides`` (``None`` = not given).

        Raises
        ------
        WorkerSettingsError
            A variable that does not parse as its field's type, an unknown override, or an
            out-of-range value.
        """
        return settings_from_env(cls, env, overrides, error=WorkerSettingsError,
                                 aliases={"index": "MIDIMATCH_INDEX_DIR"})  # the gateway's name

    def with_(self, **changes: Any) -> WorkerSettings:
        """A copy with some fields changed."""
        return replace(self, **changes)

