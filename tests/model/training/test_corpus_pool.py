from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from model.training.corpus import SUBDIR, convert_music21_corpus, corpus_midi_files, read_manifest
from tests.model.training.test_corpus import TUNE, _scripted, _write


def test_hung_and_crashed_workers_are_killed_recorded_and_replaced(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sources = [
        _write(src, "sleep.abc", TUNE.format(title="a")),
        _write(src, "crash.abc", TUNE.format(title="b")),
        _write(src, "fine.abc", TUNE.format(title="c")),
    ]
    out = tmp_path / "out"
    t0 = time.monotonic()
    report = convert_music21_corpus(
        out, sources=sources, workers=2, timeout_s=3.0, progress=False, convert_fn=_scripted
    )
    assert time.monotonic() - t0 < 30  # the sleeper was killed, not waited for (60 s)
    assert report["failed_by_reason"] == {"timeout": 1, "worker_died": 1}
    assert report["converted"] == 1  # the pool went on with fresh workers
    by_name = {Path(r["source"]).name: r for r in read_manifest(out).values()}
    assert by_name["sleep.abc"]["reason"] == "timeout"
    assert by_name["crash.abc"]["reason"] == "worker_died"
    assert by_name["fine.abc"]["status"] == "done"
    assert not mp.active_children()
    assert not list((out / SUBDIR).glob(".*.tmp"))
    assert [p.name for p in corpus_midi_files(out)] == [by_name["fine.abc"]["midi"]]
