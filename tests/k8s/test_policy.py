"""Policy: the rendered workloads are locked down as docs/deploy.md says (non-root, read-only
root filesystem with every path the images write mounted, no privilege, requests and limits,
probes), checked here directly, and by checkov (``make test`` installs it in .venv/checkov)
with the skips below, each with its reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s.conftest import ROOT, dockerfile_env, pod_specs, render, render_managed

CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"
# checkov checks that do not fit, and why
CHECKOV_SKIPS = {
    "CKV_K8S_43": "image digests: the images are built by whoever deploys; pin them with "
                  "kustomize's images[].digest in your overlay (docs/deploy.md)",
    "CKV_K8S_15": "imagePullPolicy Always: tags are immutable releases; IfNotPresent lets dev "
                  "clusters run images loaded without a registry",
    "CKV_K8S_35": "secrets as env: the gateway and worker read their settings only from "
                  "MIDIMATCH_* variables (no *_FILE form), and Redis takes --requirepass",
    "CKV_K8S_21": "default namespace: the index-build Job is applied with -n NAMESPACE "
                  "into the namespace of the overlay it serves",
}


def _containers(spec: dict):
    for c in spec.get("initContainers", []):
        yield c, True
    for c in spec["containers"]:
        yield c, False


def _image_file(container: dict) -> str | None:
    image = container["image"]
    if "gateway" in image:
        return "gateway.Dockerfile"
    if "worker" in image:
        return "worker.Dockerfile"
    return None


@pytest.mark.parametrize("target_", ["overlays/dev", "overlays/prod", "jobs/index-build"])
def test_workloads_are_locked_down(target_):
    for name, spec in pod_specs(render(target_)):
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("runAsUser", 0) >= 10000, f"{name}: a high UID, away from the host's"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{name}: {key}"
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name
        for c, init in _containers(spec):
            what = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("readOnlyRootFilesystem") is True, what
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], what
            assert not sc.get("privileged"), what
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in c.get("resources", {}).get(part, {}), f"{what}: {part}.{res}"
            assert ":" in c["image"] and not c["image"].endswith(":latest"), what
            if not init and not name.startswith("Job/"):
                assert "livenessProbe" in c and "readinessProbe" in c, what


@pytest.mark.parametrize("target_", ["overlays/dev", "overlays/prod", "jobs/index-build"])
def test_every_path_the_images_write_is_a_volume(target_):
    """Read-only root filesystem: HOME, the caches and /tmp must be mounted volumes."""
    for name, spec in pod_specs(render(target_)):
        for c, _ in _containers(spec):
            dockerfile = _image_file(c)
            if dockerfile is None or c.get("command", ["python"])[0] != "python":
                continue  # not the image's own program (the index copy is a shell's cp)
            env = dockerfile_env(dockerfile)
            writes = {"/tmp"} | {env[k] for k in ("HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR",
                                                  "MIDIMATCH_CACHE") if k in env}
            mounts = [(m["mountPath"], m.get("readOnly", False))
                      for m in c.get("volumeMounts", [])]
            for path in sorted(writes):
                assert any(Path(path).is_relative_to(m) and not ro for m, ro in mounts), (
                    f"{name}/{c['name']}: {path} (written by the image) is on the read-only "
                    f"root filesystem")


def test_every_pod_has_a_network_policy():
    for target_ in ("overlays/dev", "overlays/prod"):
        docs = render(target_)
        selectors = [p["spec"]["podSelector"].get("matchLabels", {})
                     for p in docs if p["kind"] == "NetworkPolicy"]
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert any(s.items() <= labels.items() for s in selectors), d["metadata"]["name"]


def test_checkov(tmp_path):
    if not CHECKOV.exists():
        pytest.skip("checkov is not installed: `make test` installs it into .venv/checkov")
    for target_ in ("overlays/dev", "overlays/prod", "jobs/index-build"):
        out = tmp_path / (target_.replace("/", "-") + ".yaml")
        out.write_text(yaml.safe_dump_all(render(target_)))
    (tmp_path / "overlays-prod-managed-redis.yaml").write_text(yaml.safe_dump_all(
        render_managed()))
    run = subprocess.run(
        [str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "--compact", "--quiet",
         "--skip-check", ",".join(CHECKOV_SKIPS), "-o", "cli"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
