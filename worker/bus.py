"""The transport contract between gateways and workers, and its in-process implementation.

A *session* is one audio stream. The gateway creates it, appends numbered PCM chunks, marks its
end, and reads the results the owning worker publishes. A worker claims sessions (new ones, and
ones whose previous owner stopped renewing its lease), reads their audio in order, publishes
results, renews its leases, and releases or finishes the sessions it holds.

Two implementations share this interface:

* :class:`~worker.local_bus.InProcessBus` (``worker/local_bus.py``, also importable from
  here): asyncio queues in one process, for the embedded single-process
  mode (``midimatch serve`` without ``--redis``) and for unit tests;
* ``worker.redis_bus.RedisBus``: Redis streams, a consumer group and leases, for any number of
  gateways and workers (every Redis key name lives in that module).

This module imports only the standard library and numpy, so the gateway can use it without
pulling in torch or numba.

Result messages
---------------
Workers publish plain dicts, the body of the protocol's ``result`` message (docs/protocol.md)
without ``type``, ``v`` and ``session``, which the gateway adds::

    {"audio_s": 12.0, "lag_s": 0.1, "final": False,
     "matches": [{"id", "title", "confidence", "score", "position_s"}, ...],
     "decision": {"id", "title", "confidence", "position_s"} | None}

Every published result gets a *result id*: a string ``"<int>-<int>"`` (a Redis stream id; the
in-process bus uses the same form) that orders results within a session by
:func:`result_id_key`, not as text; ``read_results(after=...)`` returns those strictly after it,
and ``"0"`` means "from the start".

Audio sequence numbers
----------------------
``push_audio`` appends only the next ``seq`` of a session (0, 1, 2...): a chunk already stored
is ignored (``push_audio`` returns False, so a client re-sending after a reconnect is harmless),
one that skips ahead raises ``BusError`` ``bad_seq``. ``last_seq`` tells a resuming gateway where
the stream is.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np

from model.errors import MidimatchError

PROTOCOL_VERSION = 1
ENCODINGS = {"pcm_s16le": (np.dtype("<i2"), 32768.0), "pcm_f32le": (np.dtype("<f4"), 1.0)}
MIN_RATE, MAX_RATE = 8_000, 96_000


class BusError(MidimatchError):
    """The transport failed or was used wrongly (unknown session, bad parameters...)."""

    reason = "bus"


@dataclass(frozen=True)
class StreamParams:
    """What the client said about its audio in the ``start`` message."""

    sample_rate: int
    channels: int = 1
    encoding: str = "pcm_s16le"

    def __post_init__(self) -> None:
        if (not isinstance(self.sample_rate, int) or isinstance(self.sample_rate, bool)
                or not MIN_RATE <= self.sample_rate <= MAX_RATE):
            raise BusError(f"sample_rate must be an integer in {MIN_RATE}..{MAX_RATE} Hz, "
                           f"got {self.sample_rate!r}", reason="bad_sample_rate")
        if type(self.channels) is not int or self.channels not in (1, 2):  # not 1.0, not True
            raise BusError(f"channels must be 1 or 2, got {self.channels!r}",
                           reason="bad_channels")
        if not isinstance(self.encoding, str) or self.encoding not in ENCODINGS:
            raise BusError(f"encoding must be one of {sorted(ENCODINGS)}, got {self.encoding!r}",
                           reason="bad_encoding")

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample frame (all channels)."""
        return ENCODINGS[self.encoding][0].itemsize * self.channels

    def seconds(self, n_bytes: int) -> float:
        """Duration of ``n_bytes`` of PCM, s."""
        return n_bytes / self.bytes_per_frame / self.sample_rate

    def decode(self, pcm: bytes) -> np.ndarray:
        """PCM bytes → float32 samples in [-1, 1], shape (n, channels).

        Raises
        ------
        BusError
            ``odd_length`` when the bytes are not a whole number of sample frames.
        """
        if len(pcm) % self.bytes_per_frame:
            raise BusError(f"{len(pcm)} bytes is not a whole number of {self.bytes_per_frame}-"
                           f"byte sample frames ({self.encoding}, {self.channels} ch)",
                           reason="odd_length")
        dtype, scale = ENCODINGS[self.encoding]
        x = np.frombuffer(pcm, dtype=dtype).astype(np.float32)
        if scale != 1.0:
            x /= scale
        return x.reshape(-1, self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StreamParams:
        try:
            return cls(int(d["sample_rate"]), int(d.get("channels", 1)),
                       str(d.get("encoding", "pcm_s16le")))
        except (KeyError, TypeError, ValueError) as e:
            raise BusError(f"bad stream parameters {d!r}: {e}", reason="bad_params") from e


@dataclass(frozen=True)
class AudioChunk:
    """One binary message of a session's audio.

    Attributes
    ----------
    seq : int
        0, 1, 2... per session, assigned by the gateway; a worker applies each exactly once, in
        order, and after a takeover resumes from the first chunk it has not applied.
    t_s : float
        Stream time at the chunk's first sample, s (total audio before it / sample rate), so a
        worker that rebuilds from the retained window knows where that window starts.
    pcm : bytes
        Raw PCM in the session's encoding.
    """

    seq: int
    t_s: float
    pcm: bytes


@dataclass(frozen=True)
class Claim:
    """A session a worker has just taken.

    ``reclaimed`` is True when another worker held it before (it died or handed it back): the
    new owner rebuilds its state from the retained audio (``read_audio(after_seq=-1)``).

    ``error`` is set (and ``params`` is None) when the session cannot be served: its stored
    parameters do not parse (``bad_params``). It is claimed all the same, so that one bad
    session never holds up the others of the batch: the worker fails it with an error result
    to its client and finishes it (which acks its hand-out entry).
    """

    session_id: str
    params: StreamParams | None
    reclaimed: bool = False
    error: BusError | None = None


@dataclass(frozen=True)
class Capacity:
    """What the gateway needs for readiness and for answering ``busy``."""

    workers: int  # workers alive (heartbeat within the lease)
    sessions_active: int  # sessions created and not finished
    sessions_max: int  # sum of the alive workers' advertised capacity
    notes: tuple[str, ...] = ()  # what alive workers want an operator to know (uncalibrated...)
    # the calibrations alive workers decide with, each once (index.calibration.describe)
    calibrations: tuple[dict, ...] = ()

    @property
    def saturated(self) -> bool:
        return self.workers == 0 or self.sessions_active >= self.sessions_max


@dataclass(frozen=True)
class Workload:
    """What a worker needs for its fair share of the sessions (``worker.runner.fair_share``)."""

    sessions: int  # sessions held or waiting for a worker (approximately: expired ones linger)
    capacity: int  # sum of the alive workers' advertised capacity


@dataclass(frozen=True)
class AudioBatch:
    """What :meth:`Bus.read_audio` returns: chunks in ``seq`` order and whether the stream ended
    after the last of them (the client said stop, or its grace period ran out).

    ``missing`` counts the chunks after ``after_seq`` that are no longer retained: the reader
    fell more than the retained window behind (a client sending faster than real time), so
    ``chunks`` starts later than asked. Always 0 for ``after_seq=-1`` (reading what is retained
    is the point of it)."""

    chunks: list[AudioChunk]
    ended: bool
    missing: int = 0


def missing_after(after_seq: int, chunks: list[AudioChunk]) -> int:
    """Chunks between ``after_seq`` and the first of ``chunks`` (read after it) that are gone."""
    if after_seq < 0 or not chunks:
        return 0
    return max(0, chunks[0].seq - after_seq - 1)


class Bus(ABC):
    """The transport between gateways and workers (see the module docstring)."""

    # ------------------------------------------------------------------ gateway side
    @abstractmethod
    async def create_session(self, params: StreamParams, session_id: str | None = None) -> str:
        """Register a new session and queue it for a worker; returns its id."""

    @abstractmethod
    async def session_params(self, session_id: str) -> StreamParams | None:
        """The parameters of a live session (for resuming), None when unknown or expired."""

    @abstractmethod
    async def push_audio(self, session_id: str, chunk: AudioChunk) -> bool:
        """Append one chunk to the session's audio (bounded: the oldest beyond the retained
        window are dropped). Returns False, storing nothing, for a ``seq`` already stored.

        Raises
        ------
        BusError
            ``unknown_session``; ``ended``; ``bad_seq`` when ``seq`` skips ahead of the next
            one or ``t_s`` goes back.
        """

    @abstractmethod
    async def last_seq(self, session_id: str) -> int:
        """The ``seq`` of the last chunk stored (-1: none yet); the next push must be one more.
        Raises ``BusError`` ``unknown_session``."""

    @abstractmethod
    async def end_session(self, session_id: str) -> None:
        """No more audio will come; the owner flushes and publishes a ``final`` result."""

    @abstractmethod
    async def attach(self, session_id: str) -> int:
        """A gateway gave the session a client connection (``start`` or a resume): bump the
        session's *attach generation* atomically and return it (1 at the first attach). A
        gateway whose detached session's grace period runs out ends it with
        :meth:`end_detached` and the generation of its own last attach, so a session resumed
        through another gateway meanwhile (which attached it later) is not ended under it.

        Raises
        ------
        BusError
            ``unknown_session``.
        """

    @abstractmethod
    async def end_detached(self, session_id: str, attach: int) -> bool:
        """:meth:`end_session`, only if ``attach`` is still the session's latest attach
        generation, in the same atomic step. True when this call ended the stream; False when
        another attach came since, or the session had already ended or is unknown."""

    @abstractmethod
    async def read_results(self, session_id: str, after: str = "0",
                           timeout_s: float = 1.0) -> list[tuple[str, dict]]:
        """Results published after result id ``after``, waiting up to ``timeout_s`` for one."""

    @abstractmethod
    async def capacity(self) -> Capacity:
        """Workers alive and sessions active, for ``/readyz`` and ``busy``."""

    # ------------------------------------------------------------------ worker side
    @abstractmethod
    async def heartbeat(self, worker_id: str, max_sessions: int,
                        notes: tuple[str, ...] = (), calibration: dict | None = None) -> None:
        """Say this worker is alive, how many sessions it can hold, any ``notes`` for the
        operator, and the ``calibration`` it decides with (a JSON-able dict: its thresholds and
        provenance, :func:`index.calibration.describe`); both shown by the gateway's ``/readyz``
        while the worker is alive."""

    @abstractmethod
    async def claim(self, worker_id: str, max_n: int, block_s: float = 0.0) -> list[Claim]:
        """Take up to ``max_n`` sessions: ones whose lease lapsed (their owner died), and new
        ones; waits up to ``block_s`` when there are none."""

    @abstractmethod
    async def read_audio(self, session_id: str, after_seq: int, max_chunks: int = 256
                         ) -> AudioBatch:
        """Chunks with ``seq > after_seq`` still retained, in order (-1: all retained)."""

    @abstractmethod
    async def workload(self) -> Workload:
        """Sessions to serve and the alive workers' capacity, cheaply (every claim asks)."""

    @abstractmethod
    async def publish_result(self, session_id: str, result: dict,
                             owner: str | None = None) -> str | None:
        """Publish one result; returns its result id. With ``owner`` (a worker always gives
        it) the result is published only while that worker owns the session, checked in the
        same atomic step: None when it does not (its lease lapsed and another worker took the
        session, or it was finished), and nothing is stored. A session has one final result:
        once it is stored nothing more is, and the call returns the final's id; a result equal
        to the last one stored (the same call repeated) returns that one's id, stored once."""

    @abstractmethod
    async def renew(self, worker_id: str, session_ids: list[str]) -> list[str]:
        """Extend this worker's leases; returns the sessions it no longer owns (drop them)."""

    @abstractmethod
    async def release(self, worker_id: str, session_ids: list[str]) -> None:
        """Hand sessions back at once (shutdown) so another worker claims them immediately."""

    @abstractmethod
    async def finish(self, worker_id: str, session_id: str) -> None:
        """The session is over and its final result published: forget it (results stay
        readable for the resume grace period)."""

    async def retire(self, worker_id: str) -> None:  # noqa: B027 - nothing to do in process
        """A worker shutting down cleanly, after ``release``: forget it (its consumer in the
        group) unless it still holds something."""

    async def reap(self, idle_s: float) -> int:
        """Forget workers dead for over ``idle_s`` that hold nothing; returns how many."""
        return 0

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to do in process
        """Release connections."""


def new_session_id() -> str:
    return uuid.uuid4().hex


def result_id_key(result_id: str) -> tuple[int, int]:
    """Sort key of a result id (``"0"``, ``"17"`` or ``"1733043000123-0"``).

    Raises
    ------
    BusError
        ``bad_result_id`` when it is not one or two dash-separated non-negative integers.
    """
    try:
        a, _, b = str(result_id).partition("-")
        key = (int(a), int(b or 0))
    except ValueError as e:
        raise BusError(f"bad result id {result_id!r}", reason="bad_result_id") from e
    if key[0] < 0 or key[1] < 0:
        raise BusError(f"bad result id {result_id!r}", reason="bad_result_id")
    return key


def __getattr__(name: str) -> type:
    # InProcessBus lives in worker/local_bus.py (one job per module); importing it from here
    # keeps working, lazily, because local_bus imports this module.
    if name == "InProcessBus":
        from worker.local_bus import InProcessBus

        return InProcessBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def distinct(calibrations) -> tuple[dict, ...]:
    """The calibrations, each once (equal as JSON), in order."""
    seen: dict[str, dict] = {}
    for c in calibrations:
        if c:
            seen.setdefault(json.dumps(c, sort_keys=True), c)
    return tuple(seen.values())
