"""Shared helpers for the deployment tests: render the kustomizations with ``kubectl kustomize``.

``kubectl`` (>= 1.27, kustomize v5: components, labels) is not a Python package: the tests that
render skip, saying so, when it is missing. Debian's ``kubernetes-client`` (1.20, kustomize v2)
is too old to render components, so .ci/run cannot install it; install kubectl from the
Kubernetes project's packages.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# every kustomization a user applies: the two overlays and the index-build Job
TARGETS = ("overlays/dev", "overlays/prod", "jobs/index-build")


@cache
def kubectl() -> str | None:
    """Path of a kubectl whose embedded kustomize is v4 or later, else None."""
    exe = shutil.which("kubectl")
    if exe is None:
        return None
    out = subprocess.run([exe, "version", "--client"], capture_output=True, text=True,
                         timeout=60).stdout
    m = re.search(r"Kustomize Version: v(\d+)", out)
    return exe if m and int(m.group(1)) >= 4 else None


@cache
def _render(target: str) -> tuple[dict, ...]:
    exe = kubectl()
    if exe is None:
        pytest.skip("kubectl with kustomize >= v4 is not installed: the manifests are not "
                    "rendered (install kubectl >= 1.27 from the Kubernetes project's packages)")
    out = subprocess.run([exe, "kustomize", str(K8S / target)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(target: str) -> list[dict]:
    """The resources ``kubectl kustomize k8s/<target>`` outputs (a fresh list each call)."""
    return list(_render(target))


MANAGED_OVERLAY = ("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                   "resources: [../prod]\ncomponents: [../../components/managed-redis]\n")


@cache
def _render_managed() -> tuple[dict, ...]:
    import tempfile

    exe = kubectl()
    if exe is None:
        _render("overlays/dev")  # skips, saying why
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "k8s"
        shutil.copytree(K8S, copy)
        (copy / "overlays" / "managed").mkdir()
        (copy / "overlays" / "managed" / "kustomization.yaml").write_text(MANAGED_OVERLAY)
        out = subprocess.run([exe, "kustomize", str(copy / "overlays" / "managed")],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"prod + components/managed-redis failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render_managed() -> list[dict]:
    """overlays/prod with components/managed-redis, as docs/deploy.md tells users to add it."""
    return list(_render_managed())


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    """Resources of ``kind`` (and ``name``: a generated ConfigMap matches its base name)."""
    out = []
    for d in docs:
        if d.get("kind") != kind:
            continue
        n = d["metadata"]["name"]
        if name is None or n == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", n):
            out.append(d)
    return out


def one(docs: list[dict], kind: str, name: str) -> dict:
    got = find(docs, kind, name)
    assert len(got) == 1, f"expected one {kind}/{name}, found {len(got)}"
    return got[0]


def dockerfile_env(name: str) -> dict[str, str]:
    """The ENV values a Dockerfile of k8s/images sets (KEY=VALUE form)."""
    text = (K8S / "images" / name).read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line[4:]))
    return env


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every workload."""
    out = []
    for d in docs:
        spec = d.get("spec") or {}
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", spec["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((f"CronJob/{d['metadata']['name']}",
                        spec["jobTemplate"]["spec"]["template"]["spec"]))
    return out


@pytest.fixture(params=TARGETS)
def target(request) -> str:
    return request.param
