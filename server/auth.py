"""The bearer token: who may use the gateway, and keeping the token out of the logs.

With ``auth_token`` set, everything but ``/healthz`` and the page's static files needs it: the
websocket (checked *before* the upgrade: a wrong token gets HTTP 401, never a websocket), the
page, ``/v1/demo``, ``/v1/pieces/{id}``, ``/metrics``; ``/readyz`` answers anyone with its
status but shows its detail (sessions, workers, calibrations) only with the token. A client
sends ``Authorization: Bearer <token>``, or ``?token=<token>`` where it cannot set headers (a
browser's websocket; the page forwards the one in its own address). The query parameter would
land in the access log: :class:`RedactingAccessLogger` writes it as ``token=REDACTED``. It would
land in aiohttp's error log too (``aiohttp.server`` logs a malformed request with its raw request
line, and a traceback): :class:`RedactingServerLogFilter` redacts it there.
"""

from __future__ import annotations

import hmac
import logging
import re
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from server.settings import Settings

REDACTED = "REDACTED"


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token a client sent: ``Authorization: Bearer …`` or the ``token`` query parameter."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("token")


def authorized(settings: Settings, request: web.BaseRequest) -> bool:
    """No token configured, or the request carries it (compared in constant time)."""
    if settings.auth_token is None:
        return True
    sent = bearer_token(request)
    return sent is not None and hmac.compare_digest(sent.encode("utf-8", "surrogateescape"),
                                                    settings.auth_token.encode())


def unauthorized_response() -> web.Response:
    """HTTP 401 for a missing or wrong token (the same words whatever was sent)."""
    return web.json_response(
        {"error": "unauthorized", "message": "missing or wrong token: send 'Authorization: "
         "Bearer <token>' or ?token=<token>"},
        status=401, headers={"WWW-Authenticate": 'Bearer realm="midimatch"'})


def redacted_path(request: web.BaseRequest) -> str:
    """The request's path and query with the value of every ``token`` parameter (any case, as
    the query is decoded: ``%74oken`` too) replaced by ``REDACTED``."""
    if not request.query_string:
        return request.path
    query = [(k, REDACTED if k.lower() == "token" else v) for k, v in request.query.items()]
    return f"{request.path}?{urlencode(query)}"


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log line without secrets: the ``token`` query parameter redacted, no
    Referer (the page's address carries the token too) and no Authorization header.

    ``remote "METHOD /path?query HTTP/x.y" status bytes seconds "user agent"``
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        agent = request.headers.get("User-Agent", "-").replace('"', "'")
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %d %.3f "%s"', request.remote or "-",
                         request.method, redacted_path(request), request.version.major,
                         request.version.minor, response.status, response.body_length, time,
                         agent)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(20)  # logging.INFO: skip the work when nobody reads it


# ``token=<value>`` (the name in any case, any of its letters or the '=' percent-encoded, as a
# raw request line has it) and ``Bearer <value>``: the value up to the next separator.
_SECRET = re.compile(r"(?i)((?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)(?:=|%3d)|bearer\s+)"
                     r"[^&\s'\"#]*")


def redact(text: str) -> str:
    """``text`` with every ``token=…`` value and ``Bearer …`` credential replaced by
    ``REDACTED``."""
    return _SECRET.sub(lambda m: m.group(1) + REDACTED, text)


class RedactingServerLogFilter(logging.Filter):
    """For aiohttp's ``aiohttp.server`` logger, which logs a request it could not parse (a bad
    request line, header or URL: ``BadStatusLine``, ``InvalidURLError``...) as ``Error handling
    request`` with the exception, whose text holds the raw request line, ``?token=…`` included.

    Every record's message is redacted (:func:`redact`). A client's protocol error
    (``HttpProcessingError``: aiohttp answered it 400) loses its traceback, which says nothing
    about the service: the record keeps one line, the exception's type and redacted text. Any
    other exception keeps its traceback, with its text redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = redact(record.getMessage())
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            text += f": {type(exc).__name__}: {redact(str(exc))}"
            record.exc_info, record.exc_text = None, None
        elif record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        record.msg, record.args = text, ()
        return True


def install_log_redaction() -> None:
    """Put a :class:`RedactingServerLogFilter` on the ``aiohttp.server`` logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RedactingServerLogFilter) for f in logger.filters):
        logger.addFilter(RedactingServerLogFilter())
