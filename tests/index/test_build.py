from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pytest

from index import store
from index.build import (
    BuildOptions,
    build_index,
    encode_file,
    find_midi_files,
    midi_title,
    piece_title,
    tidy_stem,
)
from model.encoder import Encoder
from model.errors import MidimatchError, ModelMismatchError
from server.cli import main
from tests.conftest import make_piece

OPTS = BuildOptions(workers=1, progress=False)  # in-process; one test covers the pool


def test_find_midi_files_walks_folders_and_reports_bad_arguments(midi_folder, tmp_path):
    files, problems = find_midi_files([midi_folder, midi_folder / "notes.txt",
                                       tmp_path / "missing"])
    names = sorted(f.name for f in files)
    assert names == ["empty.mid", "fake.mid", "other.midi", "piece0.mid", "piece1.mid",
                     "piece2.mid", "piece3.mid", "truncated.mid"]
    assert {p["reason"] for p in problems} == {"not_midi_suffix", "missing"}


def test_build_encodes_good_files_and_reports_every_bad_one(midi_folder, tmp_path):
    out = tmp_path / "idx"
    report = build_index(out, [midi_folder], BuildOptions(workers=2, progress=False))
    assert report["n_refs"] == 5 and report["encoded"] == 5
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"fake.mid", "truncated.mid", "empty.mid"}
    assert reasons["empty.mid"] == "no_notes" and reasons["fake.mid"] == "not_midi"
    idx = store.load_index(out, expected_model_id=Encoder.load().model_id)
    assert idx.report["skipped"] == report["skipped"]
    enc = Encoder.load()
    for k, ref in enumerate(idx.refs):
        hashes = idx.hash_sequence(k)
        assert hashes.shape == (ref["n_frames"] // 4,)
        emb, starts = idx.windows(k)
        assert emb.shape[1] == 128 and starts[0] == 0
        assert len(ref["sha256"]) == 64 and ref["duration_s"] > 10
    # what the worker processes stored equals encoding the file here
    ref0, h0, e0, s0 = encode_file(midi_folder / "piece0.mid", enc)
    k0 = [r["path"] for r in idx.refs].index(str((midi_folder / "piece0.mid").resolve()))
    np.testing.assert_array_equal(idx.hash_sequence(k0), h0)
    np.testing.assert_allclose(idx.windows(k0)[0].astype(np.float32), e0.astype(np.float32),
                               atol=1e-3)


def test_rebuild_skips_unchanged_adds_new_and_updates_changed(midi_folder, tmp_path):
    out = tmp_path / "idx"
    build_index(out, [midi_folder], OPTS)
    first = store.load_index(out)
    again = build_index(out, [midi_folder], OPTS)
    assert again["encoded"] == 0 and again["reused"] == 5 and again["n_refs"] == 5

    make_piece(99, duration_s=14).write(str(midi_folder / "new.mid"))
    make_piece(98, duration_s=13).write(str(midi_folder / "piece1.mid"))  # changed content
    third = build_index(out, [midi_folder], OPTS)
    assert third["encoded"] == 2 and third["updated"] == 1 and third["n_refs"] == 6
    idx = store.load_index(out)
    paths = [r["path"] for r in idx.refs]
    assert paths[:5] == [r["path"] for r in first.refs]  # reference numbers stay stable
    k1 = paths.index(str((midi_folder / "piece1.mid").resolve()))
    assert idx.refs[k1]["sha256"] != first.refs[k1]["sha256"]

    (midi_folder / "new.mid").unlink()
    kept = build_index(out, [midi_folder], OPTS)
    assert kept["n_refs"] == 6  # missing files are kept unless asked
    pruned = build_index(out, [midi_folder], BuildOptions(workers=1, progress=False,
                                                          prune_missing=True))
    assert pruned["n_refs"] == 5 and pruned["removed_missing"] == 1


def test_other_model_is_refused_unless_rebuild(midi_folder, tmp_path):
    out = tmp_path / "idx"
    build_index(out, [midi_folder / "piece0.mid"], OPTS)
    weights = tmp_path / "other.pt"
    other_id = Encoder.untrained(seed=7).save(weights)
    with pytest.raises(ModelMismatchError, match="--rebuild"):
        build_index(out, [midi_folder / "piece0.mid"], BuildOptions(weights=str(weights),
                                                                    progress=False))
    build_index(out, [midi_folder / "piece0.mid"],
                BuildOptions(weights=str(weights), rebuild=True, progress=False))
    assert store.load_index(out).model_id == other_id


def test_window_hop_makes_more_windows_and_an_index_keeps_its_own(midi_folder, tmp_path):
    from dataclasses import replace

    piece = [midi_folder / "piece0.mid"]
    a = build_index(tmp_path / "a", piece, OPTS)
    b = build_index(tmp_path / "b", piece, replace(OPTS, window_hop=27))
    ia, ib = store.load_index(tmp_path / "a"), store.load_index(tmp_path / "b")
    assert ia.meta["window"]["hop"] == 108 and ib.meta["window"]["hop"] == 27
    assert ib.embeddings.shape[0] > ia.embeddings.shape[0]
    assert a["n_refs"] == b["n_refs"] == 1
    # windows every 27 frames start where the encoder says they do
    starts = np.asarray(ib.embed_start)
    assert starts[0] == 0 and np.all(np.diff(starts[:-1]) == 27)
    with pytest.raises(ModelMismatchError, match="window"):
        build_index(tmp_path / "a", piece, replace(OPTS, window_hop=54))
    with pytest.raises(Exception, match="window hop"):
        build_index(tmp_path / "c", piece, replace(OPTS, window_hop=0))


def test_cli_build_and_info(midi_folder, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", str(out), str(midi_folder), "--no-progress",
                 "--workers", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_refs"] == 5 and report["bytes_per_ref"] > 0
    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["references"] == 5 and info["last_build"]["skipped"] == 3
    shutil.rmtree(out)
    assert main(["index", "info", str(out)]) == 2
    assert "no CURRENT" in capsys.readouterr().err


# ------------------------------------------------------------------- faults: dead workers, disk
def _bounded(fn, timeout_s: float):
    """fn() on a daemon thread; fail (instead of hanging the suite) past ``timeout_s``."""
    import threading

    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"still running after {timeout_s} s: hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _dies_on_poison(task):
    """Stands in for ``index.build_pool._encode_task`` in the pool's processes: SIGKILL, as the
    out-of-memory killer sends it, whenever it is handed poison.mid."""
    import os
    import signal

    from index import build_pool

    if task[0].endswith("poison.mid"):
        os.kill(os.getpid(), signal.SIGKILL)
    return build_pool._encode_task(task)


def _init_dies(opts, marks):  # noqa: ARG001
    import os

    os._exit(3)  # a worker that cannot even start (say, the model cannot be loaded)


def test_a_file_that_kills_its_worker_twice_is_skipped_and_the_build_ends(
        midi_folder, tmp_path, monkeypatch):
    from index import build_pool

    # A valid MIDI file, so only its worker's death can keep it out.
    (midi_folder / "poison.mid").write_bytes((midi_folder / "piece2.mid").read_bytes())
    monkeypatch.setattr(build_pool, "_encode_task", _dies_on_poison)
    out = tmp_path / "idx"
    report = _bounded(lambda: build_index(out, [midi_folder],
                                          BuildOptions(workers=2, progress=False)), 300)
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert reasons == {"fake.mid": "not_midi", "truncated.mid": reasons["truncated.mid"],
                       "empty.mid": "no_notes", "poison.mid": "worker_died"}
    # every good file, the ones in flight beside poison.mid included, is in
    assert report["n_refs"] == report["encoded"] == 5
    assert report["worker_deaths"] == 2  # once in the shared pool, once alone
    assert "died twice" in next(s["message"] for s in report["skipped"]
                                if s["reason"] == "worker_died")
    assert store.load_index(out).report == report


def test_workers_are_recycled_by_fresh_pools_without_hanging(midi_folder, tmp_path,
                                                             monkeypatch):
    # ProcessPoolExecutor(max_tasks_per_child=...) hangs on CPython 3.11-3.13 once its workers
    # retire (gh-115634): the eval set's build stopped at 1,000 of 2,133 files. Workers are
    # recycled by starting a fresh pool every workers x _MAX_TASKS_PER_CHILD files instead.
    from index import build_pool

    monkeypatch.setattr(build_pool, "_MAX_TASKS_PER_CHILD", 2)  # the old pool hung at this
    sizes = []
    real_pass = build_pool._pass
    monkeypatch.setattr(build_pool, "_pass", lambda tasks, *a: sizes.append(len(tasks))
                        or real_pass(tasks, *a))
    out = tmp_path / "idx"
    report = _bounded(lambda: build_index(out, [midi_folder],
                                          BuildOptions(workers=2, progress=False)), 300)
    assert report["n_refs"] == report["encoded"] == 5 and len(report["skipped"]) == 3
    assert sizes == [4, 4] and report["worker_deaths"] == 0  # 8 files, 2 x 2 per pool
    assert store.load_index(out).report == report


def test_workers_that_die_before_any_file_stop_the_build_with_a_clear_error(
        midi_folder, tmp_path, monkeypatch):
    from index import build_pool
    from model.errors import MidimatchError

    out = tmp_path / "idx"
    build_index(out, [midi_folder / "piece0.mid"], OPTS)
    monkeypatch.setattr(build_pool, "_init_worker", _init_dies)
    with pytest.raises(MidimatchError, match="without getting through any file") as e:
        _bounded(lambda: build_index(out, [midi_folder], BuildOptions(
            workers=2, rebuild=True, progress=False)), 300)
    assert e.value.reason == "workers_died"
    assert len(store.load_index(out)) == 1  # the previous index is still the live one


def _pool_workers(parent: int) -> list[int]:
    """Pids of ``parent``'s multiprocessing workers (its resource tracker left out)."""
    from pathlib import Path

    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmd:
            pids.append(int(stat.parent.name))
    return pids


def test_sigkill_of_a_pool_worker_mid_rebuild_is_survived(tmp_path):
    # The reproduction: `midimatch index build --rebuild` with a pool process killed
    # mid-build (as the out-of-memory killer would) ran forever at ~0 % CPU.
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    n = 60
    songs = tmp_path / "songs"
    songs.mkdir()
    for i in range(n):
        make_piece(300 + i, duration_s=20.0, drums=False).write(str(songs / f"s{i:03d}.mid"))
    out = tmp_path / "idx"
    cmd = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
           "index", "build", str(out), str(songs), "--rebuild", "--workers", "2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[2])
    err = bytearray()

    def read_stderr() -> None:
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            err.extend(chunk)

    threading.Thread(target=read_stderr, daemon=True).start()
    killed = None
    deadline = time.monotonic() + 240
    try:
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            done = [int(m) for m in re.findall(rb"(\d+)/%d" % n, bytes(err))]
            if done and max(done) >= 3:  # encoding is under way (tqdm's k/n)
                workers = _pool_workers(proc.pid)
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = workers[0]
            time.sleep(0.02)
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the build ended before a worker could be killed"
    assert proc.returncode == 0, bytes(err).decode(errors="replace")[-2000:]
    report = json.loads(stdout)
    assert report["worker_deaths"] == 1
    assert report["encoded"] == report["n_refs"] == n and report["skipped"] == []


_DISK_FULL_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from index import store
from index.build import BuildOptions, build_index
from server.cli import main

songs, disk = Path(sys.argv[1]), Path(sys.argv[2])
out = disk / "idx"
first = build_index(out, [songs / "s000.mid"], BuildOptions(workers=1, progress=False))
filler = open(disk / "filler", "wb", buffering=0)
try:  # fill the disk, then give back a little: the new generation starts and cannot finish
    while True:
        filler.write(b"\0" * 4096)
except OSError:
    pass
filler.close()
os.truncate(disk / "filler", os.path.getsize(disk / "filler") - 48 * 1024)
free = os.statvfs(disk).f_bavail
code = main(["index", "build", str(out), str(songs), "--rebuild", "--workers", "1",
             "--no-progress"])
idx = store.load_index(out)
print(json.dumps({"code": code, "first_refs": first["n_refs"], "refs": len(idx),
                  "gen": idx.path.name, "left": sorted(p.name for p in out.iterdir()),
                  "free_before": free, "free_after": os.statvfs(disk).f_bavail}))
"""


def test_a_full_disk_fails_the_build_clearly_and_keeps_the_previous_index(tmp_path):
    # A real ENOSPC from a small tmpfs, mounted in a user namespace of its own
    # (unshare -rm: no privileges needed where user namespaces are allowed).
    import shutil as sh
    import subprocess
    import sys
    from pathlib import Path

    if not sh.which("unshare") or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces here to mount a small tmpfs in")
    songs, disk = tmp_path / "songs", tmp_path / "disk"
    songs.mkdir()
    disk.mkdir()
    for i in range(12):
        make_piece(400 + i, duration_s=30.0).write(str(songs / f"s{i:03d}.mid"))
    script = tmp_path / "disk_full.py"
    script.write_text(_DISK_FULL_SCRIPT)
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c",
         f'mount -t tmpfs -o size=2m none "{disk}" && exec "{sys.executable}" "{script}" '
         f'"{songs}" "{disk}"'],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["code"] == 2  # the CLI's error exit, no traceback
    assert "midimatch: error: cannot write the index" in run.stderr
    assert "no space left on the device" in run.stderr and "Traceback" not in run.stderr
    assert res["refs"] == res["first_refs"] == 1 and res["gen"] == "gen-000001"
    # the partial generation is gone (.write.lock: the writers' lock, index/store.py)
    assert res["left"] == [".write.lock", "CURRENT", "gen-000001"]
    assert res["free_after"] >= res["free_before"]  # and its space given back


# ------------------------------------------------------------------------------------ titles
def _with_first_track_meta(src, dst, *metas: mido.MetaMessage, fmt: int | None = None):
    """``src`` (a pretty_midi file) with ``metas`` at tick 0 of its first track; ``fmt=0``
    merges every track into one, as a format 0 file has."""
    mid = mido.MidiFile(str(src))
    if fmt == 0:
        merged = mido.merge_tracks(mid.tracks)
        mid = mido.MidiFile(type=0, ticks_per_beat=mid.ticks_per_beat)
        mid.tracks.append(merged)
    for m in reversed(metas):
        mid.tracks[0].insert(0, m)
    mid.save(str(dst))
    return dst


def test_title_from_the_first_track_name_else_the_tidied_file_name(tmp_path):
    plain = tmp_path / "trecento__PMFC_06_Piero_1-All_onbra_d_un_perlato.xml.mid"
    make_piece(1, duration_s=12).write(str(plain))  # instruments named "lead", "bass"...
    # pretty_midi names the instruments' tracks, not the first one: no title of its own
    assert midi_title(plain.read_bytes()) is None
    assert piece_title(plain) == "PMFC 06 Piero 1-All onbra d un perlato (trecento)"

    named = _with_first_track_meta(plain, tmp_path / "bach__bwv379.mxl.mid",
                                   mido.MetaMessage("track_name", name="Greensleeves"))
    assert piece_title(named) == "Greensleeves"
    fmt0 = _with_first_track_meta(plain, tmp_path / "f0.mid",
                                  mido.MetaMessage("track_name", name="  Air  on a G string "),
                                  fmt=0)
    assert mido.MidiFile(str(fmt0)).type == 0
    assert piece_title(fmt0) == "Air on a G string"
    generic = _with_first_track_meta(plain, tmp_path / "song_00042.mid",
                                     mido.MetaMessage("track_name", name="Track 1"),
                                     mido.MetaMessage("text", text="song:pop:major:seed=1"))
    assert piece_title(generic) == "song 00042"  # neither is a title
    texted = _with_first_track_meta(plain, tmp_path / "t.mid",
                                    mido.MetaMessage("track_name", name="Untitled"),
                                    mido.MetaMessage("text", text="Title: The Parting Glass"))
    assert piece_title(texted) == "The Parting Glass"
    latin = _with_first_track_meta(plain, tmp_path / "l.mid",
                                   mido.MetaMessage("track_name", name="Für Elise"))
    assert piece_title(latin) == "Für Elise"  # mido writes latin-1


def test_title_of_malformed_data_is_none():
    assert midi_title(b"") is None
    assert midi_title(b"not midi at all") is None
    head = b"MThd" + (6).to_bytes(4, "big") + bytes([0, 1, 0, 1, 1, 224])
    assert midi_title(head + b"MTrk" + (100).to_bytes(4, "big") + b"\x00\xff\x03\x7f") is None
    assert midi_title(head + b"MTrk" + (7).to_bytes(4, "big") + b"\x00\xff\x03\x03Ave") == "Ave"


@pytest.mark.parametrize("stem, title", [
    ("trecento__PMFC_06_Piero_1-All_onbra_d_un_perlato.xml",
     "PMFC 06 Piero 1-All onbra d un perlato (trecento)"),
    ("airdsAirs__book1.abc__x176", "book1 #176 (airdsAirs)"),
    ("beethoven__opus59no1__movement4.mxl", "opus59no1 movement4 (beethoven)"),
    ("bach__bwv379.mxl", "bwv379 (bach)"),
    ("monteverdi__madrigal.4.4.mxl", "madrigal.4.4 (monteverdi)"),
    ("song_00042", "song 00042"),
    ("tune1", "tune1"),
    ("my_song.mid", "my song"),
    ("__", "__"),
])
def test_tidy_stem(stem, title):
    assert tidy_stem(stem) == title


def test_the_index_stores_the_title(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    make_piece(3, duration_s=12).write(str(songs / "bach__bwv379.mxl.mid"))
    _with_first_track_meta(songs / "bach__bwv379.mxl.mid", songs / "named.mid",
                           mido.MetaMessage("track_name", name="Jesu, meine Freude"))
    build_index(tmp_path / "idx", [songs], OPTS)
    refs = store.load_index(tmp_path / "idx").refs
    assert {r["path"].rsplit("/", 1)[-1]: r["title"] for r in refs} == {
        "bach__bwv379.mxl.mid": "bwv379 (bach)", "named.mid": "Jesu, meine Freude"}


# ------------------------------------------------------------------------------ tempo
def test_a_tempo_outside_track_0_sets_the_indexed_duration(tmp_path, capsys):
    # Tempo events count in any track, as players have them (solfege's fanfare.midi keeps its
    # 100 bpm in track 1): the same music with the tempo in track 0 or 1 indexes alike.
    src = tmp_path / "src.mid"
    make_piece(4, duration_s=12).write(str(src))  # 120 bpm, in track 0
    songs = tmp_path / "songs"
    songs.mkdir()
    for track in (0, 1):
        mid = mido.MidiFile(str(src))
        (k,) = [k for k, m in enumerate(mid.tracks[0]) if m.type == "set_tempo"]
        assert mid.tracks[0][k].time == 0
        del mid.tracks[0][k]
        mid.tracks[track].insert(0, mido.MetaMessage("set_tempo", tempo=600_000))  # 100 bpm
        mid.save(str(songs / f"tempo_in_track_{track}.mid"))
    assert main(["index", "build", str(tmp_path / "idx"), str(songs), "--no-progress",
                 "--workers", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_refs"] == 2
    refs = {r["path"].rsplit("/", 1)[-1]: r for r in store.load_index(tmp_path / "idx").refs}
    one, zero = refs["tempo_in_track_1.mid"], refs["tempo_in_track_0.mid"]
    assert one["duration_s"] == zero["duration_s"] == pytest.approx(1.2 * 12, abs=0.01)
    assert one["n_frames"] == zero["n_frames"]
    idx = store.load_index(tmp_path / "idx")
    ks = [[r["path"] for r in idx.refs].index(r["path"]) for r in (one, zero)]
    np.testing.assert_array_equal(idx.hash_sequence(ks[0]), idx.hash_sequence(ks[1]))


def test_sigterm_stops_the_build_and_its_pool_workers(tmp_path):
    """Found running `kill` on `midimatch index build` (and `eval prepare`): the parent died and
    its two pool workers, re-parented to init, kept encoding (seen for 50 minutes)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    songs = tmp_path / "songs"
    songs.mkdir()
    for i in range(60):
        make_piece(400 + i, duration_s=20.0, drums=False).write(str(songs / f"s{i:03d}.mid"))
    cmd = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
           "index", "build", str(tmp_path / "idx"), str(songs), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[2])
    workers: list[int] = []
    alive: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _pool_workers(proc.pid)
        assert len(workers) == 2, "the pool did not start"
        time.sleep(1.0)  # encoding under way
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        gone_by = time.monotonic() + 10
        while time.monotonic() < gone_by and any(running(w) for w in workers):
            time.sleep(0.1)
        alive = [w for w in workers if running(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # never leave them behind, whatever failed
            if running(w):
                os.kill(w, signal.SIGKILL)
    assert proc.returncode == 130 and b"interrupted" in err, err.decode(errors="replace")
    assert b"Traceback" not in err
    assert alive == [], "pool workers outlived the build"


# ------------------------------------------------------------------------ the per-file timeout
@pytest.mark.parametrize("when", ["arming", "encoding", "disarming", "1e-9 s"])
def test_the_timeout_skips_the_file_wherever_the_alarm_strikes(monkeypatch, when):
    # `index build --timeout 1e-9` stopped the build with _FileTimeout: the alarm was armed
    # before the `try` that caught it (and disarmed in its `finally`).
    import os
    import signal

    from index import build, build_pool

    def strike() -> None:  # the alarm, now: its handler runs as this call returns
        os.kill(os.getpid(), signal.SIGALRM)

    def encode(path, encoder, method):  # noqa: ARG001
        if when == "encoding":
            strike()
        return {"path": str(path)}, np.zeros(2, np.uint32), np.zeros((1, 128)), np.zeros(1)

    real_setitimer = signal.setitimer

    def setitimer(which, seconds):
        out = real_setitimer(which, seconds)
        if (when == "arming" and seconds) or (when == "disarming" and not seconds):
            strike()
        return out

    monkeypatch.setattr(build, "encode_file", encode)
    monkeypatch.setattr(signal, "setitimer", setitimer)
    monkeypatch.setattr(build_pool, "_OPTS", BuildOptions(
        workers=1, progress=False, file_timeout_s=1e-9 if when == "1e-9 s" else 30))
    handler = signal.getsignal(signal.SIGALRM)
    try:
        for _ in range(50 if when == "1e-9 s" else 1):
            res = build_pool._encode_task(("/songs/a.mid", "0" * 64, 10, 0.0))
            assert res[0] == "skip" and res[1]["reason"] == "timeout", res
    finally:  # whatever failed, no alarm left to strike the tests after this one
        real_setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# ------------------------------------------------------------ unreadable inputs, nothing to index
def test_a_file_that_cannot_be_read_when_hashed_is_skipped_and_the_build_finishes(
        midi_folder, tmp_path, monkeypatch):
    # Files going bad between the walk and the hashing: one deleted (stat fails), one replaced
    # by a folder (open fails). The OSError stopped the whole build with a traceback.
    from index import build

    out = tmp_path / "idx"
    assert build_index(out, [midi_folder], OPTS)["n_refs"] == 5
    real_find = build.find_midi_files

    def find_then_spoil(paths):
        found = real_find(paths)
        (midi_folder / "piece1.mid").unlink()
        (midi_folder / "piece2.mid").unlink()
        (midi_folder / "piece2.mid").mkdir()
        return found

    monkeypatch.setattr(build, "find_midi_files", find_then_spoil)
    report = build_index(out, [midi_folder], OPTS)
    unreadable = {s["path"].rsplit("/", 1)[-1]: s["message"] for s in report["skipped"]
                  if s["reason"] == "unreadable"}
    assert set(unreadable) == {"piece1.mid", "piece2.mid"}
    assert "Is a directory" in unreadable["piece2.mid"]
    # not kept from the previous build either: the index has what this build could read
    assert report["n_refs"] == 3 and len(store.load_index(out)) == 3


_BUILD_SCRIPT = "import sys; from server.cli import main; sys.exit(main())"


def _without_root_powers(*args: str) -> subprocess.CompletedProcess:
    """``midimatch ARGS`` in a process for which file modes hold even when run as root (setpriv
    drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so that a chmod 000 is unreadable."""
    cmd = [sys.executable, "-c", _BUILD_SCRIPT, *args]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root, and no setpriv to give up reading everything")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])


def test_unreadable_files_and_folders_are_skipped_as_unreadable(midi_folder, tmp_path):
    # The reviewer's repro: a chmod 000 file stopped the build with a PermissionError traceback,
    # and a chmod 000 folder was left out without a word (Path.rglob swallows the error).
    (midi_folder / "piece3.mid").chmod(0)
    (midi_folder / "sub").chmod(0)
    try:
        run = _without_root_powers("index", "build", str(tmp_path / "idx"), str(midi_folder),
                                   "--workers", "1", "--no-progress", "--json")
    finally:
        (midi_folder / "piece3.mid").chmod(0o644)
        (midi_folder / "sub").chmod(0o755)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    unreadable = sorted(s["path"].rsplit("/", 1)[-1] for s in report["skipped"]
                        if s["reason"] == "unreadable")
    assert unreadable == ["piece3.mid", "sub"]
    assert report["n_refs"] == 3  # piece0-2; sub/other.midi was in the unreadable folder


def test_nothing_to_index_is_an_error_and_writes_nothing(midi_folder, tmp_path, capsys):
    # A typo'd path, an empty folder or OUT and PATH swapped wrote an empty index (into the
    # MIDI folder, swapped) that loaded as valid, and exited 0.
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "idx"
    for args in ([str(out), str(tmp_path / "typo")], [str(out), str(empty)],
                 [str(midi_folder), str(out)]):
        assert main(["index", "build", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("midimatch: error: nothing to index: ")
        assert len(err.splitlines()) == 1
    assert not out.exists() and not (midi_folder / "CURRENT").exists()
    assert "no such file or folder" in str(
        pytest.raises(MidimatchError, build_index, out, [tmp_path / "typo"], OPTS).value)
    # an update finding nothing fails too, the index as it was
    build_index(out, [midi_folder / "piece0.mid"], OPTS)
    with pytest.raises(MidimatchError, match="nothing to index") as e:
        build_index(out, [empty], OPTS)
    assert e.value.reason == "no_midi_files"
    assert store.load_index(out).path.name == "gen-000001"


def test_a_prune_only_update_may_leave_the_index_empty(midi_folder, tmp_path):
    # What --prune-missing is for: every indexed file is gone; no MIDI file to add is no error.
    songs = tmp_path / "songs"
    songs.mkdir()
    shutil.copy(midi_folder / "piece0.mid", songs / "a.mid")
    out = tmp_path / "idx"
    build_index(out, [songs], OPTS)
    (songs / "a.mid").unlink()
    report = build_index(out, [songs], BuildOptions(workers=1, progress=False,
                                                    prune_missing=True))
    assert report["n_refs"] == 0 and report["removed_missing"] == 1
    assert len(store.load_index(out)) == 0
    with pytest.raises(MidimatchError, match="nothing to index"):  # but not a first build
        build_index(tmp_path / "new", [songs], BuildOptions(workers=1, progress=False,
                                                            prune_missing=True))


def test_an_out_that_cannot_be_written_fails_before_any_file_is_encoded(
        midi_folder, tmp_path, monkeypatch):
    # OUT was first tried after every file was encoded (minutes), with a misleading message.
    from index import build

    def no_encoding(*a):
        raise AssertionError("files encoded before OUT was checked")

    monkeypatch.setattr(build, "_run_pool", no_encoding)
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(store.IndexWriteError, match="it is a file, not a folder"):
        build_index(a_file, [midi_folder], OPTS)
    with pytest.raises(store.IndexWriteError, match="Not a directory"):
        build_index(a_file / "idx", [midi_folder], OPTS)
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "1e12"])
def test_a_timeout_out_of_range_is_a_clear_error(midi_folder, tmp_path, capsys, timeout):
    # -1, nan, inf, 1e12: tracebacks from signal.setitimer; 0 silently disarmed the timeout.
    with pytest.raises(MidimatchError, match="timeout must be > 0") as e:
        BuildOptions(file_timeout_s=float(timeout))
    assert e.value.reason == "bad_argument"
    assert main(["index", "build", str(tmp_path / "idx"), str(midi_folder / "piece0.mid"),
                 "--timeout", timeout, "--workers", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("midimatch: error: the per-file timeout")
    assert not (tmp_path / "idx").exists()
