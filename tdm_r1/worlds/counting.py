"""Toy counting world: N objects of one shape and colour in a row on a small canvas, prompted as `3 red squares` or
`three red squares`.

An item is a prompt of the grammar `<count> <colour> <shape>[s]`: count 1-6 as a digit or a word, colour of
COLOURS, shape of SHAPES. Train and held-out prompts are plain files (configs/words/counting_{train,heldout}.txt),
one prompt per line; the held-out file holds (count, colour, shape) combinations that no train prompt has, in both
number forms (tools/counting_prompts.py writes both files).

The canvas is world.height x world.width (16 x 64 by default, 3 channels) with `slots` cells in a row; each object
sits in its own cell with a small random offset inside it, so objects never touch. `layout: left` fills the first N
cells (a row of N items from the left: the count is where the row ends, which a 1.8M-parameter model learns as it
learns where a word ends); `layout: random` picks N cells at random (the count is a global property, which the toy
teacher did not learn in 1500 steps: it drew objects in most cells whatever the count). The world's
defect (`miscount_prob`): a share of the renders shows one object more or fewer than the caption says, as the
captions of web-scale data miscount; a teacher that learns its data miscounts as often. The reward is
`tdm_r1.rewards.counting` (connected components, shape and colour by geometry).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from tdm_r1.config import ConfigError, WorldConfig
from tdm_r1.worlds.base import SizedByConfig
from tdm_r1.worlds.ocr import PromptFileError, numbered_lines, shown

# Colours as RGB in [0, 1], on a light grey background (BACKGROUND).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.10, 0.62, 0.18),
    "blue": (0.12, 0.22, 0.90),
    "black": (0.08, 0.08, 0.08),
}
BACKGROUND = (0.92, 0.92, 0.92)
SHAPES = ("square", "disc", "triangle", "diamond")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
MAX_COUNT = len(NUMBER_WORDS)
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges, as a real render has


@dataclass(frozen=True)
class Request:
    """What a prompt asks for."""

    count: int
    colour: str
    shape: str

    def target(self) -> dict:
        return {"count": self.count, "colour": self.colour, "shape": self.shape}


def phrase(count: int, colour: str, shape: str, words: bool = False) -> str:
    """The prompt of a request: `3 red squares`, `one blue disc` (words=True: the count as a word)."""
    n = NUMBER_WORDS[count - 1] if words else str(count)
    return f"{n} {colour} {shape}{'s' if count > 1 else ''}"


def parse_prompt(text: str) -> Request:
    """The request of a prompt of the world's grammar; a ValueError saying what does not fit."""
    parts = text.split(" ")
    if len(parts) != 3:
        raise ValueError(f"expected '<count> <colour> <shape>', got {len(parts)} words")
    n, colour, shape = parts
    if n.isdigit():
        count = int(n)
    elif n in NUMBER_WORDS:
        count = NUMBER_WORDS.index(n) + 1
    else:
        raise ValueError(f"count {n!r} is neither 1-{MAX_COUNT} nor one of {', '.join(NUMBER_WORDS)}")
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count {count} outside 1-{MAX_COUNT}")
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r} is not one of {', '.join(COLOURS)}")
    base = shape[:-1] if count > 1 and shape.endswith("s") else shape
    if base not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)} (plural after a count above 1)")
    if phrase(count, colour, base, words=not n.isdigit()) != text:
        raise ValueError(f"not in the world's form: expected {phrase(count, colour, base, words=not n.isdigit())!r}")
    return Request(count, colour, base)


def read_prompts(path: str) -> dict[str, Request]:
    """{prompt: request} of a prompt file; errors name the file and line."""
    out: dict[str, Request] = {}
    for lineno, text in numbered_lines(path, "prompt"):
        try:
            out[text] = parse_prompt(text)
        except ValueError as e:
            raise PromptFileError(f"{path}:{lineno}: {shown(text)}: {e}") from None
    return out


@dataclass
class CountingOptions:
    """world.options of the counting world."""

    train_prompts: str = "configs/words/counting_train.txt"
    heldout_prompts: str = "configs/words/counting_heldout.txt"
    slots: int = 6  # cells in the row; at least the largest count plus one (a miscounted render may add one)
    size: int = 7  # object side in pixels (centred in its cell, +- a jitter that keeps gaps of 4 px)
    jitter_y: int = 2  # vertical offset in [-jitter_y, jitter_y]
    layout: Literal["left", "random"] = "left"  # the first N cells, or N cells at random
    # Share of renders whose count is one off the caption's (one more or one fewer, chosen evenly; one more for a
    # count of 1, one fewer at the largest count the cells allow).
    miscount_prob: float = 0.0


def shape_mask(shape: str, size: int, height: int | None = None) -> np.ndarray:
    """[height, size] float coverage in [0, 1] of a shape filling a size-wide box (square unless `height` is given),
    anti-aliased."""
    h = size if height is None else height
    sw, sh = size * SUPERSAMPLE, h * SUPERSAMPLE
    img = Image.new("L", (sw, sh), 0)
    d = ImageDraw.Draw(img)
    if shape == "square":
        d.rectangle([0, 0, sw - 1, sh - 1], fill=255)
    elif shape == "disc":
        d.ellipse([0, 0, sw - 1, sh - 1], fill=255)
    elif shape == "triangle":  # apex up, base along the bottom
        d.polygon([(sw / 2, 0), (sw - 1, sh - 1), (0, sh - 1)], fill=255)
    elif shape == "diamond":
        d.polygon([(sw / 2, 0), (sw - 1, sh / 2), (sw / 2, sh - 1), (0, sh / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img.resize((size, h), Image.Resampling.BOX), dtype=np.float32) / 255.0


@dataclass
class CountingWorld(SizedByConfig):
    cfg: WorldConfig
    opts: CountingOptions
    train_prompts: dict[str, Request]
    heldout_prompts: dict[str, Request]
    reward = "counting"  # what evaluates a checkpoint of this world when no run config names a reward (strict score)

    def items(self, split: str) -> list[str]:
        if split == "train":
            return list(self.train_prompts)
        if split == "heldout":
            return list(self.heldout_prompts)
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")

    def prompt(self, item: str) -> str:
        return item

    def request(self, item: str) -> Request:
        return self.train_prompts.get(item) or self.heldout_prompts.get(item) or parse_prompt(item)

    def read_items(self, path: str) -> list[str]:
        """The prompts of a file of the world's grammar (`tdm-r1 eval --prompts`); errors name the line."""
        return list(read_prompts(path))

    def targets(self, items: list[str]) -> list[dict]:
        """What the counting reward judges each image against: count, colour and shape asked for."""
        return [self.request(i).target() for i in items]

    def shown_count(self, count: int, rng: np.random.Generator) -> int:
        """How many objects a render of a caption asking for `count` shows (the miscount defect)."""
        if self.opts.miscount_prob <= 0 or rng.random() >= self.opts.miscount_prob:
            return count
        if count == 1:
            return 2
        if count >= self.opts.slots:
            return count - 1
        return count + (1 if rng.random() < 0.5 else -1)

    def render(self, item: str, rng: np.random.Generator, count: int | None = None) -> np.ndarray:
        """One image [H, W, C] float32 in [0, 1] of a prompt, with `count` objects (default: the miscount draw)."""
        req = self.request(item)
        o, h, w = self.opts, self.height, self.width
        n = self.shown_count(req.count, rng) if count is None else count
        cell = w // o.slots
        margin, jitter = (cell - o.size) // 2, max(0, (cell - o.size - 4) // 2)  # gaps >= min(4, cell - size) px
        alpha = np.zeros((h, w), np.float32)
        mask = shape_mask(req.shape, o.size)
        cells = range(n) if o.layout == "left" else sorted(rng.choice(o.slots, size=n, replace=False).tolist())
        for slot in cells:
            x = slot * cell + margin + int(rng.integers(-jitter, jitter + 1))
            y = (h - o.size) // 2 + int(rng.integers(-o.jitter_y, o.jitter_y + 1))
            alpha[y : y + o.size, x : x + o.size] = mask
        fg, bg = np.asarray(COLOURS[req.colour], np.float32), np.asarray(BACKGROUND, np.float32)
        img = (1.0 - alpha[..., None]) * bg + alpha[..., None] * fg
        if self.cfg.channels == 1:
            return img.mean(-1, keepdims=True).astype(np.float32)
        return img.astype(np.float32)

    def render_batch(self, items: list[str], rng: np.random.Generator, counts: list[int] | None = None) -> torch.Tensor:
        """Images [B, C, H, W] float32 in [0, 1]."""
        counts = counts or [None] * len(items)
        arr = np.stack([self.render(i, rng, c) for i, c in zip(items, counts, strict=True)])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
        """Training batch: `n` train prompts drawn with replacement, rendered. Returns (images, prompts)."""
        items = self.items("train")
        chosen = [items[i] for i in rng.integers(0, len(items), n)]
        return self.render_batch(chosen, rng), chosen


def build_world(cfg: WorldConfig) -> CountingWorld:
    known = {f.name for f in fields(CountingOptions)}
    unknown = sorted(set(cfg.options) - known)
    if unknown:
        raise ConfigError(f"world.options: unknown keys {unknown} for the counting world (known: {sorted(known)})")
    opts = CountingOptions(**cfg.options)
    if cfg.channels != 3:
        raise ConfigError("the counting world is in colour: world.channels must be 3")
    if opts.layout not in ("left", "random"):
        raise ConfigError(f"world.options.layout must be 'left' or 'random', got {opts.layout!r}")
    if not 0.0 <= opts.miscount_prob <= 1.0:
        raise ConfigError(f"world.options.miscount_prob must be in [0, 1], got {opts.miscount_prob}")
    if opts.slots < MAX_COUNT or cfg.width // opts.slots < opts.size + 2:
        raise ConfigError(
            f"world.options: {opts.slots} slots of {cfg.width // max(opts.slots, 1)} px need slots >= {MAX_COUNT} and "
            f"cells at least size + 2 = {opts.size + 2} px wide (world.width={cfg.width})"
        )
    if cfg.height < opts.size + 2 * opts.jitter_y:
        need = opts.size + 2 * opts.jitter_y
        raise ConfigError(f"world.height={cfg.height} is less than world.options size + 2 * jitter_y = {need}")
    train, heldout = read_prompts(opts.train_prompts), read_prompts(opts.heldout_prompts)
    key = lambda r: (r.count, r.colour, r.shape)  # noqa: E731
    shared = sorted({key(r) for r in train.values()} & {key(r) for r in heldout.values()})
    if shared:
        raise PromptFileError(
            f"world.options.train_prompts and heldout_prompts share {len(shared)} (count, colour, shape) "
            f"combinations, e.g. {shared[:3]}: held-out prompts must be combinations never trained on"
        )
    return CountingWorld(cfg, opts, train, heldout)
