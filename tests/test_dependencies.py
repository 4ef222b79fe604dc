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
