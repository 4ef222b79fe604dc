"""The import graph runs one way: server → worker → index → model, and the query path never
imports training or evaluation.

Read from the source (every ``import`` statement, at module level or inside a function), so a
lazy import inside a handler counts like any other.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "index", "worker", "server")  # lowest first
# Apart from the query path: only they, each other's users below, and the CLI modules that
# register their subcommands may import them.
APART = ("model.training", "index.evaluation")
CLI_MODULES = {"server.cli", "server.serve_cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else module_name(path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            # `from model import training` imports the sub-package
            folder = ROOT.joinpath(*mod.split("."))
            names.update(f"{mod}.{alias.name}" for alias in node.names
                         if (folder / alias.name).is_dir()
                         or (folder / f"{alias.name}.py").is_file())
    return names


def sources() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(path: Path) -> list[str]:
    me = module_name(path)
    rank = LAYERS.index(me.split(".")[0])
    found = []
    for name in sorted(imported_modules(path)):
        top = name.split(".")[0]
        if top in LAYERS and LAYERS.index(top) > rank:
            found.append(f"{me} imports {name}: {top}/ is above {me.split('.')[0]}/")
        for apart in APART:
            if within(name, apart) and not any(within(me, a) for a in APART) \
                    and me not in CLI_MODULES:
                found.append(f"{me} imports {name}: {apart} is apart from the query path")
    return found


def test_the_layers_are_found():
    # guards the test itself: an empty walk would pass everything
    names = {module_name(p) for p in sources()}
    assert {"model.features", "model.training.train", "index.search",
            "index.evaluation.evaluate", "worker.engine", "server.ws"} <= names


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_higher_one_or_training_from_the_query_path(layer):
    bad = [v for p in sources() if module_name(p).split(".")[0] == layer for v in violations(p)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_an_upward_and_a_training_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "index").mkdir()
    (tmp_path / "model" / "training").mkdir()
    up = tmp_path / "model" / "features.py"
    up.write_text("def f():\n    from index.search import Cascade\n")
    lazy = tmp_path / "index" / "search.py"
    lazy.write_text("from model import training\nfrom ..model.training.data import x\n")
    assert violations(up) == ["model.features imports index.search: index/ is above model/"]
    assert any("model.training is apart" in v for v in violations(lazy))
