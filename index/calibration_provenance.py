"""A calibration's provenance: how each of its thresholds was fitted (:mod:`index.calibration`).

:class:`Fit` says on what audio (renderers, conditions), how much of it (in- and
out-of-collection queries or streams), against how large an index, when and by which command one
threshold was fitted; :class:`Provenance` holds the single-query threshold's (``queries``,
``midimatch eval --save-calibration``) and the stream threshold's (``streams``,
``bench/time_to_identify.py --save-calibration``). ``None`` anywhere means unknown: a calibration
file saved before provenance was recorded loads with both parts unknown. :func:`describe` is what
a worker's heartbeat carries to the gateway's ``/readyz``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from index.calibration import Calibration

__all__ = ["UNKNOWN", "Fit", "Provenance", "describe"]

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Fit:
    """How one threshold was fitted; ``None`` is unknown.

    Attributes
    ----------
    renderers : tuple of str
        The renderers (synthesis engines) that made the audio, e.g. ``("timidity-freepats",)``.
    conditions : tuple of str
        Its conditions (``clean``, ``room_noise``, ...).
    n_in, n_out : int
        In- and out-of-collection queries (single-query threshold) or streams (stream threshold).
    index_refs : int
        References in the index they were searched against.
    date_utc : str
        When it was fitted, ``YYYY-MM-DDTHH:MM:SSZ``.
    command : str
        The command that fitted and saved it.
    note : str
        Anything else worth knowing (e.g. that the record was written after the fact).
    """

    renderers: tuple[str, ...] | None = None
    conditions: tuple[str, ...] | None = None
    n_in: int | None = None
    n_out: int | None = None
    index_refs: int | None = None
    date_utc: str | None = None
    command: str | None = None
    note: str | None = None

    @classmethod
    def now(cls, **kw) -> Fit:
        """A fit made now (``date_utc`` set); lists of names become sorted tuples."""
        for name in ("renderers", "conditions"):
            if kw.get(name) is not None:
                kw[name] = tuple(sorted({str(x) for x in kw[name]}))
        return cls(date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **kw)

    @classmethod
    def from_dict(cls, d: dict | None) -> Fit | None:
        if d is None:
            return None
        known = {f.name for f in fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)

    def describe(self, unit: str) -> str:
        """One line: ``renderers; conditions; N in / M out UNIT; R-reference index; date;
        `command```, each part ``unknown`` when it is."""
        def known(x, fmt=str):
            return UNKNOWN if x is None else fmt(x)

        return "; ".join([
            "renderers " + known(self.renderers, ", ".join),
            "conditions " + known(self.conditions, ", ".join),
            f"{known(self.n_in)} in / {known(self.n_out)} out-of-collection {unit}",
            f"index of {known(self.index_refs)} references",
            f"fitted {known(self.date_utc)}",
            "by " + known(self.command, lambda c: f"`{c}`")]
            + ([self.note] if self.note else []))


@dataclass(frozen=True)
class Provenance:
    """Where a calibration's thresholds come from: ``queries`` the single-query threshold's fit,
    ``streams`` the stream threshold's (None: unknown, or not fitted)."""

    queries: Fit | None = None
    streams: Fit | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> Provenance:
        d = d or {}
        return cls(Fit.from_dict(d.get("queries")), Fit.from_dict(d.get("streams")))


def describe(calibration: Calibration) -> dict:
    """What a worker tells ``/readyz`` of the calibration it decides with: the model, the
    thresholds (and the evidence rule's shape, ``evidence_params``), whether it is calibrated,
    its ``provenance`` (a part is ``"unknown"`` when the file did not record it, ``"not
    fitted"`` for a stream part never fitted on streams) and ``summary``, all of it in words."""
    cal = calibration
    d = cal.to_dict()
    parts, words = {}, {}
    for part, fitted, unit in (("queries", cal.calibrated, "queries"),
                               ("streams", cal.stream_threshold is not None, "streams")):
        fit = getattr(cal.provenance, part)
        if fit is not None:
            parts[part] = {k: list(v) if isinstance(v, tuple) else v  # as JSON gives it back
                           for k, v in d["provenance"][part].items()}
            words[part] = fit.describe(unit)
        elif fitted:
            parts[part] = UNKNOWN
            words[part] = f"provenance {UNKNOWN} (saved before provenance was recorded)"
        else:
            parts[part] = words[part] = "not fitted"
    if not cal.calibrated:
        summary = f"uncalibrated: {cal.source}"
    else:
        fixed = f"{cal.stream_cut:.3f} × {cal.stable_results} results"
        streams = (f"Stream threshold {fixed}" if cal.evidence_threshold is None else
                   f"Stream evidence threshold {cal.evidence_threshold:.2f} (index.evidence; the "
                   f"fixed-count rule's: {fixed})")
        summary = (f"threshold {cal.threshold:.3f}: {words['queries']}. "
                   f"{streams}: {words['streams']}")
    return {"model_id": cal.model_id, "calibrated": cal.calibrated,
            "threshold": d["threshold"], "stream_threshold": d["stream_threshold"],
            "stable_results": cal.stable_results, "evidence_threshold": d["evidence_threshold"],
            "evidence_params": cal.evidence_shape, "provenance": parts, "summary": summary}
