"""The shared MIDIMATCH_* parser of the gateway's and the worker's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from model.env import settings_from_env


class Bad(ValueError):
    pass


@dataclass(frozen=True)
class S:
    name: str = "x"
    n: int = 1
    rate: float = 0.5
    on: bool = False
    folder: Path | None = None
    url: str | None = None


def test_types_aliases_paths_and_overrides():
    env = {"MIDIMATCH_N": "7", "MIDIMATCH_RATE": "2.5", "MIDIMATCH_ON": "Yes",
           "OTHER_FOLDER": "~/f", "MIDIMATCH_URL": ""}
    s = settings_from_env(S, env, {"name": "y", "n": None}, error=Bad,
                          aliases={"folder": "OTHER_FOLDER"})
    assert s == S(name="y", n=7, rate=2.5, on=True, folder=Path("~/f").expanduser(), url=None)
    # the field's own variable beats its alias; an override beats both
    s = settings_from_env(S, {"MIDIMATCH_FOLDER": "/a", "OTHER_FOLDER": "/b"}, {}, error=Bad,
                          aliases={"folder": "OTHER_FOLDER"})
    assert s.folder == Path("/a")
    assert settings_from_env(S, {"MIDIMATCH_ON": "0"}, {"folder": "/o"}, error=Bad) == S(
        on=False, folder=Path("/o"))


def test_errors_name_the_variable_or_the_unknown_setting():
    with pytest.raises(Bad, match="MIDIMATCH_N='many'"):
        settings_from_env(S, {"MIDIMATCH_N": "many"}, {}, error=Bad)
    with pytest.raises(Bad, match="unknown settings"):
        settings_from_env(S, {}, {"colour": "blue"}, error=Bad)
