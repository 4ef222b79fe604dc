"""How the workers get the index, checked against the code: the index-build Job writes where
the workers' init container copies from, the containers' arguments are commands the CLI
accepts, and the init container's script (run here with sh, as the pod runs it) waits for an
index and leaves a copy that ``index.store.load_index`` opens, even when a build switches the
source to a new generation while it copies."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from index import store
from tests.k8s.conftest import ROOT, one, render

META = {"model_id": "m1", "n_bits": 32, "embed_dim": 4, "render_method": "fast"}


def _index(n: int):
    rng = np.random.default_rng(n)
    parts = [({"path": f"/x/{k}.mid", "title": f"t{k}", "duration_s": 1.0},
              rng.integers(0, 2**32, size=5, dtype=np.uint64).astype(np.uint32),
              rng.standard_normal((2, 4)).astype(np.float16), np.arange(2, dtype=np.int32))
             for k in range(n)]
    return store.concat(META, parts, np.dtype(np.uint32))


def _spec(docs, kind: str, name: str) -> dict:
    return one(docs, kind, name)["spec"]["template"]["spec"]


def _claim_path(spec: dict, container: dict, path: str, claim: str) -> PurePosixPath:
    """``path`` (inside ``container``) as a path on the volume of PVC ``claim``."""
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
               for v in spec["volumes"]}
    for m in container["volumeMounts"]:
        if volumes.get(m["name"]) == claim and PurePosixPath(path).is_relative_to(m["mountPath"]):
            return PurePosixPath(path).relative_to(m["mountPath"])
    raise AssertionError(f"{path} is not on the volume of {claim}")


def _init(docs) -> dict:
    spec = _spec(docs, "Deployment", "midimatch-worker")
    return next(c for c in spec["initContainers"] if c["name"] == "index")


def test_the_job_writes_where_the_workers_copy_from():
    job_docs, docs = render("jobs/index-build"), render("overlays/prod")
    job_spec = _spec(job_docs, "Job", "midimatch-index-build")
    job = job_spec["containers"][0]
    out = {e["name"]: e["value"] for e in job["env"]}["INDEX_OUT"]
    assert "$(INDEX_OUT)" in job["args"]
    source = one(docs, "ConfigMap", "midimatch-config")["data"]["INDEX_SOURCE"]
    spec = _spec(docs, "Deployment", "midimatch-worker")
    init = _init(docs)
    assert (_claim_path(job_spec, job, out, "midimatch-index")
            == _claim_path(spec, init, source, "midimatch-index"))
    # and the worker loads what the init container copied
    dest = _copy_destination(init)
    worker = next(c for c in spec["containers"] if c["name"] == "worker")
    assert {e["name"]: e.get("value") for e in worker["env"]}["MIDIMATCH_INDEX"] == dest
    assert any(m["mountPath"] == dest for m in worker["volumeMounts"])


def _expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


@pytest.mark.parametrize("target_", ["overlays/dev", "overlays/prod", "jobs/index-build"])
def test_container_arguments_are_commands_the_cli_accepts(target_):
    """The images' entrypoint is ``python -m server.cli``: their args must parse."""
    from server.cli import build_parser

    docs = render(target_)
    config = next((d["data"] for d in docs if d["kind"] == "ConfigMap"
                   and d["metadata"]["name"].startswith("midimatch-config")), {})
    checked = 0
    for d in docs:
        if d["kind"] not in ("Deployment", "Job"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            if not c["image"].split("/")[-1].startswith(("midimatch-", "gateway", "worker")):
                continue
            assert "command" not in c, f"{c['name']}: the image's entrypoint is replaced"
            env = dict(config, **{e["name"]: e.get("value", "x") for e in c.get("env", [])})
            args = [_expand(a, env) for a in c["args"]]
            build_parser().parse_args(args)  # argparse exits (SystemExit) on a bad one
            checked += 1
    assert checked


def _copy_destination(init: dict) -> str:
    dests = {m["mountPath"] for m in init["volumeMounts"] if m["name"] == "index"}
    assert len(dests) == 1
    return dests.pop()


def _script(dest: Path) -> tuple[str, str]:
    """The init container's script with its destination moved to ``dest``, and the shell."""
    init = _init(render("overlays/dev"))
    shell, flags, script = init["command"]
    assert shell == "sh" and flags.startswith("-")
    return f"{flags}", script.replace(_copy_destination(init), str(dest))


def _run(src: Path, dest: Path, path_dirs: list[Path] = (), **kw) -> subprocess.Popen:
    flags, script = _script(dest)
    env = dict(os.environ, INDEX_SOURCE=str(src),
               PATH=os.pathsep.join([*map(str, path_dirs), os.environ["PATH"]]))
    return subprocess.Popen(["sh", flags, script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_the_init_container_waits_for_an_index_and_copies_one_that_loads(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (dest / "stale").write_text("from a previous start of the pod")
    proc = _run(src, dest)
    time.sleep(1.5)
    assert proc.poll() is None, "the init container gave up before an index existed: " + (
        proc.communicate()[0])
    store.write_index(src, _index(3))
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "waiting for an index" in out
    assert len(store.load_index(dest)) == 3
    assert not (dest / "stale").exists()


CP_THEN_SWITCH = """#!/bin/sh
# cp, and after the first copy a build switches the source to a new generation
{cp} "$@" || exit $?
if [ ! -e "{mark}" ]; then
    : > "{mark}"
    "{python}" -c 'from index import store; from tests.k8s.test_index_wiring import _index; \
store.write_index("{src}", _index(5))'
fi
"""


def test_a_build_switching_generations_during_the_copy_leaves_a_consistent_index(tmp_path):
    """Generation 1 is copied, then a build makes generation 2 live (and removes 1): the copy
    must still name generation 1, which it holds (a copy of the source's CURRENT named 2, which
    it lacks, and the worker could not start until the pod was recreated)."""
    src, dest, bin_ = tmp_path / "src", tmp_path / "dest", tmp_path / "bin"
    for d in (src, dest, bin_):
        d.mkdir()
    store.write_index(src, _index(3))
    cp = bin_ / "cp"
    cp.write_text(CP_THEN_SWITCH.format(
        cp=subprocess.run(["sh", "-c", "command -v cp"], capture_output=True, text=True,
                          check=True).stdout.strip(),
        mark=tmp_path / "switched", python=sys.executable, src=src))
    cp.chmod(cp.stat().st_mode | stat.S_IXUSR)
    proc = _run(src, dest, [bin_], cwd=ROOT)
    out = proc.communicate(timeout=60)[0]
    assert (tmp_path / "switched").exists(), out
    assert (src / "CURRENT").read_text().strip() == "gen-000002"
    assert proc.returncode == 0, out
    assert len(store.load_index(dest)) == 3  # generation 1, whole
