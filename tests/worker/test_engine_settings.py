"""The engine's settings, checked when made."""

from __future__ import annotations

import pytest

from worker.engine_settings import EngineSettings
from worker.session import EngineError


def test_bad_settings_are_refused() -> None:
    with pytest.raises(EngineError):
        EngineSettings(window_s=0.1)
