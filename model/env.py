"""The environment, read in one place: ``MIDIMATCH_*`` variables into a process's frozen
settings dataclass (gateway and worker), and the cache location (``MIDIMATCH_CACHE``).

The bottom of the import graph, like :mod:`model.errors`: torch-free, imported by every layer's
settings and CLIs. The libraries (``model/``'s networks and features, ``index/``'s query path)
never call it; a process reads its environment here, once, and passes values down.

Both service processes read their settings the same way: each field ``f`` of the dataclass from
``MIDIMATCH_<F>`` (upper case; an empty value counts as unset), parsed as the field's declared
type (int, float, bool, Path; anything else stays a string), then the CLI's ``overrides`` (None
means not given). Torch-free: the gateway imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
TRUE = ("1", "true", "yes", "on")


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where rebuilt data lives (converted corpora, rendered audio, demo indexes, evaluation sets):
    ``MIDIMATCH_CACHE``, else ``~/.cache/midimatch``."""
    env = os.environ if env is None else env
    return Path(env.get("MIDIMATCH_CACHE") or Path.home() / ".cache" / "midimatch").expanduser()


def settings_from_env(cls: type[T], env: Mapping[str, str] | None, overrides: Mapping[str, Any],
                      *, error: type[Exception], aliases: Mapping[str, str] | None = None) -> T:
    """An instance of the dataclass ``cls`` from the environment and ``overrides``.

    Parameters
    ----------
    cls : a dataclass whose field annotations name int, float, bool, Path or str (optionally
        ``| None``).
    env : the environment (default ``os.environ``).
    overrides : field → value; None values are ignored.
    error : raised for an unknown override or a value that does not parse.
    aliases : field → a second variable read when ``MIDIMATCH_<FIELD>`` is unset.
    """
    env = os.environ if env is None else env
    names = {f.name for f in fields(cls)}
    unknown = {k for k, v in overrides.items() if v is not None} - names
    if unknown:
        raise error(f"unknown settings {sorted(unknown)}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        raw = env.get(f"MIDIMATCH_{f.name.upper()}") or (
            env.get(aliases[f.name]) if aliases and f.name in aliases else None)
        if raw:
            values[f.name] = _parse(f.name, raw, str(f.type), error)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for f in fields(cls):
        if _base(str(f.type)) == "Path" and values.get(f.name) is not None:
            values[f.name] = Path(values[f.name]).expanduser()
    return cls(**values)


def _base(type_name: str) -> str:
    return type_name.replace(" ", "").removesuffix("|None")


def _parse(name: str, raw: str, type_name: str, error: type[Exception]) -> Any:
    kind = _base(type_name)
    try:
        if kind == "bool":
            return raw.strip().lower() in TRUE
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as e:
        raise error(f"MIDIMATCH_{name.upper()}={raw!r}: {e}") from e
    return raw


__all__ = ["cache_dir", "settings_from_env"]
