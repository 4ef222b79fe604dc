"""Pieces in worker processes, and the per-piece deadline."""

from __future__ import annotations

from pathlib import Path

from model.training.data import prepare
from tests.model.training.test_data import _write_collection


def test_worker_processes_and_the_piece_timeout(tmp_path: Path) -> None:
    files = _write_collection(tmp_path / "midi", n=2)[:2]
    report = prepare(tmp_path / "pool", files, renderers=("sine",), heldout="sine",
                     workers=2, split=(1, 0, 0), max_piece_s=8.0, progress=False)
    assert report["splits"]["train"]["pairs"] == 4 and report["skipped"] == {}
    slow = prepare(tmp_path / "slow", files, renderers=("sine",), heldout="sine", workers=0,
                   split=(1, 0, 0), progress=False, piece_timeout_s=1e-3)
    assert slow["skipped"] == {"timeout": 2} and slow["splits"]["train"]["pairs"] == 0
    assert not list((tmp_path / "slow").rglob("*.npz"))
