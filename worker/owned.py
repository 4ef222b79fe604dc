"""What :class:`~worker.runner.Worker` knows of one session it holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.bus import StreamParams


@dataclass
class Owned:
    """What the runner knows of one session it holds."""

    params: StreamParams
    reclaimed: bool = False  # another worker held it before
    applied_seq: int = -1  # last chunk fed to the engine
    opened: bool = False
    ended: bool = False  # engine.end() called
    resume_after_s: float = -1.0  # results up to this audio_s were published by a previous owner
    audio_s: float = 0.0  # stream time after the last chunk read
    published_s: float = -1.0  # audio_s of the last result published
    skipped_s: float = 0.0  # stream time trimmed before this worker read it, s
    unsent: list[dict] = field(default_factory=list)  # results to publish, in order
    finishing: bool = False  # its final went out: finish it

    @property
    def closing(self) -> bool:
        """No more audio to read: ended, failed, or its final is out or queued."""
        return self.ended or self.finishing or any(r.get("final") for r in self.unsent)
