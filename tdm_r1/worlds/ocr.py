"""Toy OCR world: short uppercase words rendered into small canvases, prompted as `a sign that says "WORD"`.

The world is a seeded data generator plus a prompt grammar with disjoint train / held-out word lists.
Its difficulty knobs live in `WorldConfig`; the reward is a real OCR engine (`tdm_r1.rewards.ocr`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tdm_r1.config import ConfigError, WorldConfig
from tdm_r1.worlds.base import SizedByConfig


class PromptFileError(ValueError):
    """A word or prompt file is malformed; the message names the file and line."""


def numbered_lines(path: str | Path, item: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of every line of a UTF-8 file holding one `item` (word, prompt) per line; a
    missing file, invalid UTF-8, an empty line (but a final newline) or no lines at all is an error naming the file
    and line."""
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"{item} file not found: {p}")
    raw = p.read_bytes()
    n_lines = raw.count(b"\n") + 1
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise PromptFileError(f"{p}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text:
            if lineno == n_lines:  # trailing newline at end of file
                continue
            raise PromptFileError(f"{p}:{lineno}: empty line (one {item} per line)")
        out.append((lineno, text))
    if not out:
        raise PromptFileError(f"{p}: no {item}s (the file is empty)")
    return out


def shown(text: str, limit: int = 40) -> str:
    """A line as an error message shows it: whole when short, else its start and its length."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def read_words(path: str | Path, alphabet: str, max_len: int) -> list[str]:
    """One word per line; every character must be in `alphabet`. Errors name the line number."""
    p = Path(path)
    words: list[str] = []
    for lineno, text in numbered_lines(p, "word"):
        bad = sorted({c for c in text if c not in alphabet})
        if bad:
            raise PromptFileError(
                f"{p}:{lineno}: {shown(text)} has characters outside the world's alphabet: {shown(''.join(bad))} "
                f"(allowed: {alphabet})"
            )
        if len(text) > max_len:
            raise PromptFileError(f"{p}:{lineno}: {shown(text)} is longer than max_word_len={max_len}")
        words.append(text)
    return words


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's embedded FreeType font: identical on every machine, no system fonts needed.
    return ImageFont.load_default(size=size)


def _blot(alpha: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Cover `frac` of the ink's width, over all its rows, with solid ink at a uniform position inside the word."""
    rows = np.flatnonzero((alpha[..., 0] > 0.5).any(1))
    cols = np.flatnonzero((alpha[..., 0] > 0.5).any(0))
    if len(cols) == 0:
        return alpha
    a, b = int(cols[0]), int(cols[-1])
    width = max(1, int(np.ceil(frac * (b - a + 1))))
    x0 = int(rng.integers(a, b - width + 2))
    out = alpha.copy()
    out[rows[0] : rows[-1] + 1, x0 : x0 + width] = 1.0
    return out


@dataclass
class OCRWorld(SizedByConfig):
    cfg: WorldConfig
    train_words: list[str]
    heldout_words: list[str]

    def prompt(self, word: str) -> str:
        return self.cfg.prompt_template.format(word=word)

    def targets(self, words: list[str]) -> list[dict]:
        """What the OCR reward reads each word's image against: the word itself."""
        return [{"text": w} for w in words]

    def items(self, split: str) -> list[str]:
        if split == "train":
            return self.train_words
        if split == "heldout":
            return self.heldout_words
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")

    def render(self, word: str, rng: np.random.Generator) -> np.ndarray:
        """One image [H, W, C] float32 in [0, 1]."""
        c = self.cfg
        size = int(rng.choice(c.font_sizes))
        if c.random_rgb:
            bg = rng.uniform(0.0, 1.0, 3)
            fg = rng.uniform(0.0, 1.0, 3)
        else:
            bg = np.full(3, rng.uniform(*c.background_level))
            fg = np.full(3, rng.uniform(*c.text_level))
        if rng.random() < c.invert_prob:
            bg, fg = fg, bg
        x = c.left_margin + (int(rng.integers(0, c.jitter_x + 1)) if c.jitter_x > 0 else 0)
        y = c.height / 2 + (int(rng.integers(-c.jitter_y, c.jitter_y + 1)) if c.jitter_y > 0 else 0)
        mask = Image.new("L", (c.width, c.height), 0)
        ImageDraw.Draw(mask).text((x, y), word, fill=255, font=_font(size), anchor="lm")
        alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0  # [H, W, 1]
        if c.blot_prob > 0 and rng.random() < c.blot_prob:
            alpha = _blot(alpha, c.blot_frac, rng)
        img = (1.0 - alpha) * bg[None, None, :] + alpha * fg[None, None, :]
        if c.noise_std > 0:
            img = img + rng.normal(0.0, c.noise_std, img.shape)
        img = np.clip(img, 0.0, 1.0).astype(np.float32)
        return img[..., :1] if c.channels == 1 else img

    def render_batch(self, words: list[str], rng: np.random.Generator) -> torch.Tensor:
        """Images [B, C, H, W] float32 in [0, 1]."""
        arr = np.stack([self.render(w, rng) for w in words])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
        """Training batch: `n` train words drawn with replacement, rendered. Returns (images, prompts)."""
        idx = rng.integers(0, len(self.train_words), n)
        words = [self.train_words[i] for i in idx]
        return self.render_batch(words, rng), [self.prompt(w) for w in words]


def build_world(cfg: WorldConfig) -> OCRWorld:
    if cfg.options:
        raise ConfigError(
            f"world.options: the ocr world's settings are world.* keys, got options {sorted(cfg.options)}"
        )
    if cfg.random_rgb and cfg.channels != 3:
        raise ConfigError("world.random_rgb needs world.channels: 3")
    if not 0.0 <= cfg.blot_prob <= 1.0:
        raise ConfigError(f"world.blot_prob must be in [0, 1], got {cfg.blot_prob}")
    if not 0.0 < cfg.blot_frac <= 1.0:
        raise ConfigError(f"world.blot_frac must be in (0, 1], got {cfg.blot_frac}")
    train = read_words(cfg.train_words, cfg.alphabet, cfg.max_word_len)
    heldout = read_words(cfg.heldout_words, cfg.alphabet, cfg.max_word_len)
    overlap = sorted(set(train) & set(heldout))
    if overlap:
        raise PromptFileError(
            f"world.train_words and world.heldout_words overlap in {len(overlap)} words, e.g. {overlap[:5]}"
        )
    return OCRWorld(cfg, train, heldout)
