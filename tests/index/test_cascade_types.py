"""The cascade's settings and value types, without an index or a model."""

from __future__ import annotations

import pytest

from index.cascade_types import CascadeConfig


def test_config_is_validated():
    with pytest.raises(ValueError):
        CascadeConfig(top_k=0)
    with pytest.raises(ValueError):
        CascadeConfig(gully=1.5)
    with pytest.raises(ValueError):
        CascadeConfig(penalty=-1)
    with pytest.raises(ValueError):
        CascadeConfig(min_query_s=30.0, query_window_s=20.0)
    assert CascadeConfig(query_window_s=10.0).query_window_frames == 215
