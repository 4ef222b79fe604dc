"""Protocol v1's client messages, validated: text in, a typed message out, or a ProtocolError.

A pure function of the text (no I/O), so every input a client can send is checked here, before
the gateway acts on it or hands a byte of it to the bus (docs/protocol.md is the reference).
Types are exact: JSON ``true`` is not the integer 1 (Python's ``bool`` is an ``int``), ``1.0``
is not an integer, and a list is not an encoding. Size and nesting are bounded *before*
``json.loads`` runs, so no message can make the parser recurse deeply or work long.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from model.errors import MidimatchError
from worker.bus import ENCODINGS, MAX_RATE, MIN_RATE, PROTOCOL_VERSION, StreamParams

# One close code per error code; 4xxx mirror the HTTP status of the same meaning.
CLOSE_CODES = {
    "bad_request": 4400,
    "unauthorized": 4401,
    "timeout": 4408,
    "too_large": 1009,  # RFC 6455 "message too big"; aiohttp uses it past the transport cap too
    "busy": 1013,  # RFC 6455 "try again later"
    "unavailable": 1013,  # the same: the service cannot serve now, retrying later can work
    "internal": 1011,  # RFC 6455 "internal error"
}
# Errors a client should retry, and the first wait it is told (``retry_after_s``), s.
RETRY_AFTER_S = {"busy": 5.0, "unavailable": 2.0}
MAX_TEXT_BYTES = 4096  # a control message is under 400 bytes
MAX_DEPTH = 8  # nesting of JSON arrays and objects (a valid message has 1)
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_RESULT_ID = re.compile(r"(0|[1-9][0-9]{0,18})(?:-(0|[1-9][0-9]{0,18}))?")
_MAX_ID_PART = (1 << 63) - 1  # well inside Redis's 64-bit stream ids, even plus one


class ProtocolError(MidimatchError):
    """What a client did wrong (or what the service cannot do): becomes an ``error`` message.

    ``code`` is the protocol's error code (a key of :data:`CLOSE_CODES`), ``reason`` a finer
    stable detail (``odd_length``, ``binary_before_start``...), ``retry_after_s`` the wait a
    client is told before trying again (retryable codes only, else None).
    """

    def __init__(self, code: str, message: str, *, reason: str | None = None) -> None:
        if code not in CLOSE_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message, reason=reason or code)
        self.code = code
        self.retry_after_s = RETRY_AFTER_S.get(code)

    def to_message(self) -> dict:
        """The ``error`` message sent to the client."""
        out = {"type": "error", "v": PROTOCOL_VERSION, "code": self.code, "reason": self.reason,
               "message": self.message}
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        return out


@dataclass(frozen=True)
class Start:
    """A valid ``start``: the stream's parameters; ``session`` and ``after`` when resuming."""

    params: StreamParams
    session: str | None = None
    after: str | None = None


@dataclass(frozen=True)
class Stop:
    """A valid ``stop``."""


def bad(reason: str, message: str) -> ProtocolError:
    return ProtocolError("bad_request", message, reason=reason)


def _show(value: Any) -> str:
    """A client's value, quoted for an error message, at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float, not a subclass


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON ``text``, brackets inside strings not
    counted (any text: it need not be valid JSON)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_message(text: str) -> Start | Stop:
    """Validate one client text message.

    Parameters
    ----------
    text : str
        The websocket text frame, as received.

    Returns
    -------
    Start or Stop

    Raises
    ------
    ProtocolError
        ``too_large`` (over :data:`MAX_TEXT_BYTES`) or ``bad_request`` with the reason that
        names what is wrong: ``bad_json`` (not JSON, not an object, or nested deeper than
        :data:`MAX_DEPTH`), ``bad_version``, ``unknown_type``, ``bad_sample_rate``,
        ``bad_channels``, ``bad_encoding``, ``bad_session``, ``bad_after``. Nothing else.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ProtocolError("too_large", f"text message of {size} bytes; the limit is "
                            f"{MAX_TEXT_BYTES}", reason="message_too_large")
    # Cheap bound first (a count in C); the exact scan only for a text with many brackets.
    if text.count("[") + text.count("{") > MAX_DEPTH and json_depth(text) > MAX_DEPTH:
        raise bad("bad_json", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: unreachable after the bound
        raise bad("bad_json", f"text message is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise bad("bad_json", "a message must be a JSON object")
    v = msg.get("v")
    if not _is_int(v) or v != PROTOCOL_VERSION:
        raise ProtocolError("bad_request", f"unsupported protocol version {_show(v)}; this "
                            f"server speaks \"v\": {PROTOCOL_VERSION} (an integer)",
                            reason="bad_version")
    kind = msg.get("type")
    if kind == "start":
        return _start(msg)
    if kind == "stop":
        return Stop()
    raise bad("unknown_type", f"unknown message type {_show(kind)} (expected 'start' or 'stop')")


def _start(msg: dict) -> Start:
    rate = msg.get("sample_rate")
    if not _is_int(rate) or not MIN_RATE <= rate <= MAX_RATE:
        raise bad("bad_sample_rate", f"sample_rate must be an integer in {MIN_RATE}..{MAX_RATE}"
                  f" Hz, got {_show(rate)}")
    channels = msg.get("channels", 1)
    if not _is_int(channels) or channels not in (1, 2):
        raise bad("bad_channels", f"channels must be the integer 1 or 2, got {_show(channels)}")
    encoding = msg.get("encoding", "pcm_s16le")
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise bad("bad_encoding", f"encoding must be one of {sorted(ENCODINGS)}, got "
                  f"{_show(encoding)}")
    session = msg.get("session")
    if session is not None and (not isinstance(session, str)
                                or not _SESSION_ID.fullmatch(session)):
        raise bad("bad_session", f"'session' must be a session id as sent in 'ready', got "
                  f"{_show(session)}")
    after = msg.get("after")
    if after is not None and not valid_result_id(after):
        raise bad("bad_after", f"'after' must be a result id as sent in 'result_id', got "
                  f"{_show(after)}")
    return Start(StreamParams(rate, channels, encoding), session, after)


def valid_result_id(value: Any) -> bool:
    """``"0"``, ``"17"`` or ``"1733043000123-0"``: one or two dash-separated decimal integers
    without leading zeros, each below 2**63."""
    if not isinstance(value, str):
        return False
    m = _RESULT_ID.fullmatch(value)
    return m is not None and all(int(p) <= _MAX_ID_PART for p in m.groups() if p is not None)
