"""The project's exception hierarchy.

Every error a user can cause (a bad file, a bad flag, an index built by another model) is a
subclass of :class:`MidimatchError` and carries a short machine-readable ``reason`` beside the
human message. This module imports nothing heavy so that the gateway can use it too.
"""

from __future__ import annotations


class MidimatchError(Exception):
    """Base of every error midimatch raises on purpose.

    Parameters
    ----------
    message : str
        What went wrong, for a human.
    reason : str
        A short stable code (``"not_midi"``, ``"truncated"``...) for programs and reports.
    """

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class MidiError(MidimatchError):
    """A MIDI file that cannot be used (not MIDI, truncated, no notes, absurd tempo...)."""

    reason = "bad_midi"


class AudioError(MidimatchError):
    """Audio that cannot be used (unreadable, silent, unsupported rate or layout)."""

    reason = "bad_audio"


class RenderError(MidimatchError):
    """A MIDI → audio renderer failed or ran past its time or length bound."""

    reason = "render_failed"


class IndexFormatError(MidimatchError):
    """An index folder that is missing, half-written, or of an unknown format version."""

    reason = "bad_index"


class ModelMismatchError(MidimatchError):
    """An index used with a different model from the one that built it."""

    reason = "model_mismatch"


def why_cannot_bind(e: OSError | OverflowError) -> tuple[str, str]:
    """Why a socket could not be bound, for a one-line error: ``(kind, words)`` with ``kind``
    ``"in_use"``, ``"denied"`` or ``"other"`` (the caller adds what to do about it)."""
    import errno

    code = e.errno if isinstance(e, OSError) else None
    if code == errno.EADDRINUSE:
        return "in_use", "address already in use"
    if code == errno.EACCES:
        return "denied", "permission denied (ports below 1024 need privileges)"
    return "other", (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) \
        or type(e).__name__
