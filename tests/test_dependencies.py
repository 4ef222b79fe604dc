"""Every third-party package the installed code imports is declared in pyproject.toml.

(``scipy`` was imported by the augmentations but only arrived through the dev extras, so a plain
``pip install .`` could not train.) ``bench/`` may use the dev extras too.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "index", "worker", "server")
OURS = (*PACKAGES, "bench", "tests")
DIST_OF = {"prometheus_client": "prometheus-client"}  # import name → distribution name


def declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    return {re.split(r"[\s<>=!~\[;]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def third_party_imports(folders: tuple[str, ...]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OURS:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_scan_sees_the_imports():
    found = third_party_imports(PACKAGES)
    assert {"numpy", "torch", "aiohttp", "scipy"} <= set(found)


def test_runtime_imports_are_declared_dependencies():
    deps = declared()
    missing = {name: sorted(files) for name, files in third_party_imports(PACKAGES).items()
               if DIST_OF.get(name, name).lower().replace("_", "-") not in deps}
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def test_bench_imports_are_declared_with_the_dev_extras():
    deps = declared("dev")
    missing = {name: sorted(files) for name, files in third_party_imports(("bench",)).items()
               if DIST_OF.get(name, name).lower().replace("_", "-") not in deps}
    assert not missing, f"bench/ imports packages nobody installs: {missing}"


def test_a_wheel_carries_every_data_file_the_code_reads(tmp_path):
    # a non-editable install (the gateway image) crashed at start: server/static was not in
    # the wheel, only in the checkout. Every non-Python file under the packages is data the
    # code reads (the page, the weights, the Csound orchestras): all must be in the wheel.
    import shutil
    import subprocess
    import zipfile

    # built from a copy of the tracked files: in the checkout, the editable install's
    # *.egg-info/SOURCES.txt would add files the configuration leaves out
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "pyproject.toml", "README.md",
                              *PACKAGES], check=True, capture_output=True, text=True).stdout.split()
    src = tmp_path / "src"
    for rel in tracked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = tmp_path.glob("midimatch-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    data = [p for p in tracked if p.startswith(tuple(f"{d}/" for d in PACKAGES))
            and not p.endswith(".py")]
    assert "server/static/index.html" in data and "model/weights/default.pt" in data
    assert [p for p in data if p not in inside] == []
