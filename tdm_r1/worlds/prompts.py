"""Prompt files as the world of a diffusers model (model.kind sd3 / zimage): train and held-out prompts read from
files, the image size the model is trained at, and, for text-rendering rewards, the target text of each prompt.

Implements the World protocol (`tdm_r1.worlds.base`) like the toy OCR world, each prompt being an item. A prompt's
reward targets are its `.jsonl` object (GenEval's clauses, for rewards that need them) and its target text: its first
double-quoted span (`a sign that says "OPEN"` -> `OPEN`; straight or curly quotes), so OCR prompt files need no
separate answer column.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tdm_r1.config import ConfigError, DiffusersConfig, PromptsConfig
from tdm_r1.worlds.ocr import PromptFileError, numbered_lines

_QUOTED = re.compile(r"\"([^\"]+)\"|\u201c([^\u201d]+)\u201d")


def quoted_text(prompt: str) -> str | None:
    """The first double-quoted span of a prompt (straight or curly quotes), or None."""
    m = _QUOTED.search(prompt)
    if m is None:
        return None
    text = (m.group(1) or m.group(2)).strip()
    return text or None


def _lines(p: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of every line; errors name the file and line."""
    return numbered_lines(p, "prompt")


def read_prompts(path: str | Path, need_text: bool = False) -> tuple[list[str], dict[str, dict]]:
    """Prompts of a `.txt` (one per line) or `.jsonl` file (one object with a "prompt" string per line), and the
    metadata of each prompt of a `.jsonl` file. need_text: every prompt must carry quoted target text (OCR)."""
    p = Path(path)
    jsonl = p.suffix == ".jsonl"
    prompts: list[str] = []
    metadata: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for lineno, text in _lines(p):
        if jsonl:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{p}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise PromptFileError(f'{p}:{lineno}: expected a JSON object with a non-empty "prompt" string')
            prompt = obj["prompt"].strip()
            if prompt in metadata and metadata[prompt] != obj:
                raise PromptFileError(
                    f"{p}:{lineno}: prompt {prompt!r} repeats line {first_line[prompt]} with other metadata"
                )
            metadata[prompt] = obj
            first_line.setdefault(prompt, lineno)
        else:
            prompt = text
        if need_text and quoted_text(prompt) is None:
            raise PromptFileError(
                f'{p}:{lineno}: {prompt!r} has no double-quoted target text (e.g. a sign that says "OPEN"), which the '
                "ocr reward reads as the text to render"
            )
        prompts.append(prompt)
    return prompts, metadata


@dataclass
class PromptWorld:
    train_words: list[str]  # train prompts
    heldout_words: list[str]  # held-out prompts (already cut to prompts.heldout_limit)
    height: int
    width: int
    metadata: dict[str, dict] = field(default_factory=dict)  # prompt -> its .jsonl object

    def prompt(self, item: str) -> str:
        return item

    def targets(self, prompts: list[str]) -> list[dict]:
        """Each prompt's `.jsonl` object (none for a .txt file's), with "text": the text it asks to render (its first
        double-quoted span) when it quotes one."""
        out = []
        for p in prompts:
            text = quoted_text(p)
            out.append(self.metadata.get(p, {}) | ({"text": text} if text is not None else {}))
        return out

    def read_items(self, path: str) -> list[str]:
        """The prompts of a .txt / .jsonl file (`read_prompts`), their metadata added to the world's (a prompt that
        the world already knows with other metadata is an error naming the file)."""
        prompts, meta = read_prompts(path)
        for prompt, obj in meta.items():
            if self.metadata.get(prompt, obj) != obj:
                raise PromptFileError(f"{path}: prompt {prompt!r} has other metadata than in the run's prompt files")
        self.metadata = self.metadata | meta
        return prompts

    def items(self, split: str) -> list[str]:
        if split == "train":
            return self.train_words
        if split == "heldout":
            return self.heldout_words
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")


def build_prompt_world(pcfg: PromptsConfig, dcfg: DiffusersConfig, need_text: bool = False) -> PromptWorld:
    """The world of a diffusers run from the `prompts:` and `diffusers:` sections."""
    for split in ("train", "heldout"):
        if not getattr(pcfg, split):
            raise ConfigError(
                f"prompts.{split} is empty; diffusers models (model.kind sd3 / zimage) train on prompt files: set "
                'prompts.train and prompts.heldout (.txt, one prompt per line, or .jsonl with a "prompt" field)'
            )
    if pcfg.heldout_limit < 0:
        raise ConfigError(f"prompts.heldout_limit must be >= 0, got {pcfg.heldout_limit}")
    train, meta = read_prompts(pcfg.train, need_text)
    heldout, meta_heldout = read_prompts(pcfg.heldout, need_text)
    for prompt, obj in meta_heldout.items():
        if meta.get(prompt, obj) != obj:
            raise PromptFileError(f"{pcfg.heldout}: prompt {prompt!r} has other metadata than in {pcfg.train}")
    if pcfg.heldout_limit:
        heldout = heldout[: pcfg.heldout_limit]
    return PromptWorld(train, heldout, dcfg.height, dcfg.width, meta | meta_heldout)
