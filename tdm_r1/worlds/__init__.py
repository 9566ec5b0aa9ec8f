"""Worlds: what a run's items, prompts and reward targets are (`tdm_r1.worlds.base.World`), by name.

A new world is its own module plus one line in BUILTIN_WORLDS; a world outside the package needs no line at all:
`world.name: my_package.my_module:build_my_world` (a factory taking the `world:` section)."""

from __future__ import annotations

from collections.abc import Callable

from tdm_r1.config import WorldConfig
from tdm_r1.registry import resolve
from tdm_r1.worlds.base import World

BUILTIN_WORLDS: dict[str, str] = {
    "ocr": "tdm_r1.worlds.ocr:build_world",
    "counting": "tdm_r1.worlds.counting:build_world",
}


def world_factory(name: str) -> Callable[[WorldConfig], World]:
    return resolve(name, BUILTIN_WORLDS, {}, "world")


def build_world(cfg: WorldConfig) -> World:
    """The world the `world:` section names (a ValueError naming an unknown one)."""
    return world_factory(cfg.name)(cfg)
