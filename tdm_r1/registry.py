"""Lazy registries: a built-in name maps to an import path "module:factory", so a plug-in's module (and the packages it
needs) is imported only when a run uses it; any other "module:factory" path names a plug-in outside the package."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tdm_r1.config import ConfigError


def resolve(name: str, builtins: dict[str, str], registered: dict[str, Callable], what: str) -> Callable:
    """The factory of a name registered at run time, a built-in name or an import path; a ConfigError saying what was
    tried otherwise (`what`: "reward", "world")."""
    if name in registered:
        return registered[name]
    path = builtins.get(name, name if ":" in name else None)
    if path is None:
        known = ", ".join(sorted({*builtins, *registered}))
        raise ConfigError(f"unknown {what} {name!r}; registered: {known}; or an import path 'package.module:factory'")
    module, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        raise ConfigError(f"{what} {name!r}: cannot import {module!r}: {e}") from e
    if not callable(factory):
        raise ConfigError(f"{what} {name!r}: {module!r} has no callable {attr!r}")
    return factory
