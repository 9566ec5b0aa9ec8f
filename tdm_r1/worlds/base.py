"""The World protocol: what the trainer, evaluation and rewards know of a world (DESIGN section 9).

A world is a set of items (a word, a prompt, later a requested count) split into train and held-out, the prompt the
model is conditioned on for each item, the reward target of a prompt and optional per-prompt metadata, at one image
size. The toy OCR world (`tdm_r1.worlds.ocr.OCRWorld`) and the prompt files of a diffusers run
(`tdm_r1.worlds.prompts.PromptWorld`) implement it; a new world implements it in its own module, and nothing that
takes a World changes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class World(Protocol):
    height: int  # image size the model is trained and sampled at
    width: int

    def words(self, split: str) -> list[str]:
        """The items of a split, "train" or "heldout" (a ValueError for any other)."""
        ...

    def prompt(self, item: str) -> str:
        """The prompt the model is conditioned on for an item."""
        ...

    def word_of(self, prompt: str) -> str:
        """The reward target of a prompt (the text to render): the inverse of `prompt`."""
        ...

    def metadata_of(self, prompts: list[str]) -> list[dict] | None:
        """Per-prompt metadata for the rewards (e.g. GenEval's clauses), or None when the world has none."""
        ...
