"""bench/streams.py: a level runs its sessions with the cascade's settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.build import BuildOptions, build_index
from index.cascade_types import CascadeConfig
from index.search import Cascade


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import make_piece

    root = tmp_path_factory.mktemp("coll")
    for i in range(2):
        make_piece(i, duration_s=12).write(str(root / f"p{i}.mid"))
    out = tmp_path_factory.mktemp("idx")
    build_index(out, [root], BuildOptions(workers=1, progress=False))
    return out


@pytest.mark.parametrize("parts", [0, 3])
def test_a_level_prunes_with_the_cascade_parts(small_index: Path, parts: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.engine
    from bench.streams import run_level

    seen = []

    class Recording(worker.engine.Engine):
        def __init__(self, cascade, settings, *a, **kw):
            super().__init__(cascade, settings, *a, **kw)
            seen.append(self.cascade.config.prune_parts)

    monkeypatch.setattr(worker.engine, "Engine", Recording)
    cascade = Cascade.open(small_index, config=CascadeConfig(prune_parts=parts))
    rng = np.random.default_rng(0)
    row = run_level(cascade, 1, [rng.normal(0, 0.1, 22050).astype(np.float32)], 0.3, 0.1, 22050)
    assert seen == [parts]  # before 0a265f4: 2, the engine settings' default then
    assert row["sessions"] == 1 and row["dropped"] == 0
