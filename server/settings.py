"""The gateway's settings: one frozen object per process, from the environment and CLI flags.

Every field can be set by an environment variable ``MIDIMATCH_<FIELD>`` (upper case), and
``midimatch serve`` flags override the environment. ``model/`` and ``index/`` never read the
environment; this module is where the service does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from model.env import settings_from_env
from model.errors import MidimatchError

MAX_PORT = 65535


class SettingsError(MidimatchError):
    """A setting with a value that cannot be used."""

    reason = "bad_setting"


@dataclass(frozen=True)
class Settings:
    """What one gateway process needs to know.

    Attributes
    ----------
    host, port : str, int
        Where to listen.
    redis_url : str or None
        ``None``: the worker runs in this process (embedded mode); else the gateway only.
    index_dir : Path or None
        The index: the embedded worker's, and the demo collection (titles, MIDI paths).
        ``MIDIMATCH_INDEX_DIR``, or ``MIDIMATCH_INDEX`` as the worker calls it.
    auth_token : str or None
        When set, clients must send ``Authorization: Bearer <token>`` or ``?token=<token>``
        (server/auth.py says what it protects). Set but empty is an error, not "no auth".
    max_message_bytes : int
        Largest websocket message accepted, bytes (one PCM chunk or one JSON message).
    max_session_s : float
        Longest audio one session may send, s.
    max_sessions_per_address : int
        Concurrent websockets from one client address.
    max_connections : int
        Open TCP connections to this gateway, all addresses together (HTTP and websockets,
        finished requests or not); past it a new connection is closed at once.
    max_connections_per_address : int
        Open TCP connections from one address, unfinished HTTP requests included.
    idle_timeout_s : float
        A websocket that sends no audio for this long (pings and pongs do not count; the start
        and the stop do) is closed with ``timeout``.
    handshake_timeout_s : float
        Longest wait for a complete HTTP request (the websocket handshake included) on a
        connection, from its opening or from the previous response on it, s.
    resume_grace_s : float
        A dropped session stays resumable this long; after it, its stream is ended.
    result_poll_s : float
        Longest wait of one ``read_results`` call (bounds how late a close is noticed), s.
    capacity_cache_s : float
        How long this gateway reuses the workers' capacity (alive workers, sessions active) for
        ``/readyz`` and for a ``start``'s ``busy`` check, s; concurrent callers share one
        computation. Counting the active sessions costs Redis work per session, and ``/readyz``
        is open without the token. 0: computed on every call (tests).
    demo_seconds : float
        Length of a rendered demo excerpt, s.
    redis_prefix : str
        First part of every Redis key (the workers' ``MIDIMATCH_REDIS_PREFIX`` too).

    The embedded worker reads its own settings (``worker.settings``: ``MIDIMATCH_MAX_SESSIONS``,
    ``MIDIMATCH_DEVICE``...) from the same environment.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    index_dir: Path | None = None
    auth_token: str | None = None
    max_message_bytes: int = 1 << 20
    max_session_s: float = 3600.0
    max_sessions_per_address: int = 8
    max_connections: int = 1024
    max_connections_per_address: int = 32
    idle_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    resume_grace_s: float = 30.0
    result_poll_s: float = 1.0
    capacity_cache_s: float = 1.0
    demo_seconds: float = 25.0
    redis_prefix: str = "mm"

    def __post_init__(self) -> None:
        for f in fields(self):  # nan passes every comparison below, inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{f.name} must be a finite number, got {value!r}")
        if not 1 <= self.port <= MAX_PORT:
            raise SettingsError(f"port must be 1-{MAX_PORT}, got {self.port!r}")
        positive = ("max_message_bytes", "max_session_s", "max_sessions_per_address",
                    "max_connections", "max_connections_per_address", "idle_timeout_s",
                    "handshake_timeout_s", "result_poll_s", "demo_seconds")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("resume_grace_s", "capacity_cache_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be ≥ 0, got {getattr(self, name)!r}")
        if self.max_message_bytes < 1024:
            raise SettingsError("max_message_bytes must be at least 1024 (one JSON message)")
        if self.auth_token is not None:
            check_token(self.auth_token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``MIDIMATCH_*`` variables, then ``overrides`` (``None`` = not given).

        Raises
        ------
        SettingsError
            A variable that does not parse as its field's type, or an out-of-range value.
        """
        env = os.environ if env is None else env
        if overrides.get("auth_token") is None and "MIDIMATCH_AUTH_TOKEN" in env:
            # settings_from_env reads an empty variable as unset: for the token that would turn
            # authentication off without a word.
            check_token(env["MIDIMATCH_AUTH_TOKEN"], "MIDIMATCH_AUTH_TOKEN")
        return settings_from_env(cls, env, overrides, error=SettingsError,
                                 aliases={"index_dir": "MIDIMATCH_INDEX"})  # the worker's name

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests, the CLI)."""
        return replace(self, **changes)

    @property
    def transport_max_message_bytes(self) -> int:
        """The websocket transport's own cap on a message (aiohttp's ``max_msg_size``): above
        ``max_message_bytes`` but bounded. Messages up to it get the protocol's ``too_large``
        error message; past it aiohttp closes with 1009 as soon as the frame's header says so."""
        return 2 * self.max_message_bytes + 65536



def check_token(token: str, name: str = "auth_token") -> None:
    """A usable token: not empty, printable ASCII (an HTTP header carries it), no spaces.

    Raises
    ------
    SettingsError
        Naming the setting, never showing the value.
    """
    if not token:
        raise SettingsError(f"{name} is set but empty: give a token, or unset it to serve "
                            "without authentication")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise SettingsError(f"{name} must be printable ASCII without spaces ({len(token)} "
                            "characters given)")
