"""OCR reward: rapidocr (ONNX, weights bundled in the wheel) reads the generated pixels.

score = 1 if the normalised reading equals the word, else 1 - min(edit_distance, len(word)) / len(word)
(the paper's OCR metric), where the word is the sample's target `text` (`World.targets`). Images are upscaled and
padded with a white margin, then tiled many to a canvas so one detection + recognition call reads them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tdm_r1.config import RewardTermConfig
from tdm_r1.rewards.base import reward_options

log = logging.getLogger(__name__)


@dataclass
class OCROptions:
    """The OCR reward's settings: `options:` of its train.rewards entry."""

    upscale: int = 3  # integer upscaling before OCR
    pad: int = 16  # white margin around each image, in upscaled pixels
    tile_columns: int = 4  # images per canvas row when tiling
    tile_rows: int = 16  # canvas rows; one OCR call per tile_columns * tile_rows images
    threads: int = 0  # onnxruntime intra-op threads; 0 = library default


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalise_text(text: str) -> str:
    return "".join(c for c in text.upper() if c.isalnum())


def ocr_score(reading: str, word: str) -> float:
    got, want = normalise_text(reading), normalise_text(word)
    if not want:
        raise ValueError("ocr_score: empty target word")
    if got == want:
        return 1.0
    return 1.0 - min(edit_distance(got, want), len(want)) / len(want)


def _to_uint8_gray(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W] uint8 (luma)."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    gray = (images.float() * w).sum(1).clamp(0, 1)
    return (gray * 255.0 + 0.5).to(torch.uint8).numpy()


class OCRReward:
    name = "ocr"

    def __init__(self, options: OCROptions | None = None):
        from rapidocr import RapidOCR  # optional extra `ocr`

        self.cfg = options or OCROptions()
        params = {"Global.log_level": "error", "Global.use_cls": False}
        if self.cfg.threads > 0:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = self.cfg.threads
        self.engine = RapidOCR(params=params)

    def _tile(self, gray: np.ndarray) -> np.ndarray:
        up, pad = self.cfg.upscale, self.cfg.pad
        h, w = gray.shape
        img = Image.fromarray(gray).resize((w * up, h * up), Image.BICUBIC)
        return np.pad(np.asarray(img), pad, constant_values=255)

    def _read_canvas(self, tiles: list[np.ndarray], cols: int) -> list[str]:
        th, tw = tiles[0].shape
        rows = (len(tiles) + cols - 1) // cols
        canvas = np.full((rows * th, cols * tw), 255, np.uint8)
        for i, t in enumerate(tiles):
            r, c = divmod(i, cols)
            canvas[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = t
        out = self.engine(np.stack([canvas] * 3, -1))
        pieces: list[list[tuple[float, str]]] = [[] for _ in tiles]
        if out.boxes is not None and out.txts:
            for box, txt in zip(out.boxes, out.txts):
                cx, cy = float(np.mean(box[:, 0])), float(np.mean(box[:, 1]))
                r, c = int(cy // th), int(cx // tw)
                i = r * cols + c
                if 0 <= r < rows and 0 <= c < cols and i < len(tiles):
                    pieces[i].append((float(np.min(box[:, 0])), txt))
        return ["".join(t for _, t in sorted(p)) for p in pieces]

    def read(self, images: torch.Tensor, tiled: bool = True) -> list[str]:
        """The OCR engine's reading of each image [B, 3, H, W] in [0, 1]."""
        tiles = [self._tile(g) for g in _to_uint8_gray(images)]
        if not tiled:
            return [self._read_canvas([t], 1)[0] for t in tiles]
        per_canvas = self.cfg.tile_columns * self.cfg.tile_rows
        readings: list[str] = []
        for i in range(0, len(tiles), per_canvas):
            chunk = tiles[i : i + per_canvas]
            readings += self._read_canvas(chunk, min(self.cfg.tile_columns, len(chunk)))
        return readings

    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        readings = self.read(images)
        scores = []
        for reading, prompt, target in zip(readings, prompts, targets):
            try:
                if not target.get("text"):
                    raise ValueError("its target has no text to read (a prompt file's prompts quote it)")
                scores.append(ocr_score(reading, target["text"]))
            except ValueError as e:
                log.warning("ocr reward: cannot score prompt %r: %s", prompt, e)
                scores.append(float("nan"))
        return torch.tensor(scores, dtype=torch.float32)


def build_ocr_reward(term: RewardTermConfig) -> OCRReward:
    return OCRReward(reward_options(term, OCROptions))
