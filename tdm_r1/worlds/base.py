"""The World protocol: what the trainer, evaluation and rewards know of a world (DESIGN section 9).

A world is a set of items (a word, a prompt, a requested count) split into train and held-out, the prompt the model is
conditioned on for each item, and each item's reward targets (what a reward judges its image against: the text to
read, the count asked for, a prompt file's GenEval clauses), at one image size. The toy OCR world
(`tdm_r1.worlds.ocr.OCRWorld`) and the prompt files of a diffusers run (`tdm_r1.worlds.prompts.PromptWorld`)
implement it; a new world implements it in its own module, and nothing that takes a World changes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class World(Protocol):
    height: int  # image size the model is trained and sampled at
    width: int

    def items(self, split: str) -> list[str]:
        """The items of a split, "train" or "heldout" (a ValueError for any other)."""
        ...

    def prompt(self, item: str) -> str:
        """The prompt the model is conditioned on for an item."""
        ...

    def targets(self, items: list[str]) -> list[dict]:
        """Each item's reward targets, one dict per item (the rewards' third argument)."""
        ...


class SizedByConfig:
    """A toy world's image size, read from its `world:` section (`self.cfg`)."""

    @property
    def height(self) -> int:
        return self.cfg.height

    @property
    def width(self) -> int:
        return self.cfg.width
