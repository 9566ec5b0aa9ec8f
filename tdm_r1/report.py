"""Run artefacts: JSONL metric logs and sample grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class JsonlLogger:
    """Appends one JSON object per line; flushes every record so a crash loses nothing written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def save_grid(images: torch.Tensor, path: str | Path, cols: int = 8, scale: int = 2, gap: int = 2) -> None:
    """images [B, 3, H, W] in [0, 1] -> one PNG grid, `cols` per row, white gaps."""
    b, _, h, w = images.shape
    rows = max(1, math.ceil(b / cols))
    canvas = np.ones((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), np.float32)
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, cols)
        canvas[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = arr[i]
    img = Image.fromarray((canvas * 255 + 0.5).astype(np.uint8))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
