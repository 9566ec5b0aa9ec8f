"""`counting`: the counting world's reward, non-differentiable: objects found by connected components, their shape and
colour by simple geometry, scored against the count, colour and shape a prompt asks for (targets
{"count", "colour", "shape"}).

Per image:
1. background = the per-channel median colour (the objects cover a small part of the canvas); a pixel is ink when
   its colour lies more than `threshold` (Euclidean, RGB in [0, 1]) from it;
2. objects = 8-connected components of ink; each pixel's coverage is its distance from the background over the
   distance of the component's most distant pixel (anti-aliased edges count in part); components of coverage area
   below `min_area` pixels are specks and ignored;
3. colour = the nearest of the world's colours to the mean of the component's core pixels (coverage >= 0.7), or
   "other" when none is within `colour_tolerance`;
4. shape from the component's half-coverage mask (coverage >= 0.5: where a soft or blurred edge crosses half way,
   so a generator's blur neither grows the box nor thins it): the world's shape (square, disc, triangle apex up,
   diamond) whose outline drawn in the mask's bounding box overlaps the mask most (intersection over union), so a
   square with ragged corners or a slightly polygonal disc is still read as one; a component with a bounding box more
   than 1.5x as wide as high (or high as wide) is no single object ("other").

Touching or overlapping objects form one component: they count as ONE object, of shape "other" when their box is
elongated (two side by side), so an image whose objects merge fails the strict score; the world's own renders never
touch (a gap of >= 2 px).

Scores (option `score`):
- strict (GenEval-style): 1 when exactly `count` objects of the asked shape and colour are found and nothing else;
- partial: (1 - |found - count| / count, at least 0) x (share of the found objects that have the asked shape and
  colour), with found = all objects: 1 exactly when strict is 1, credit for one object off or one wrong.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch

from tdm_r1.config import RewardTermConfig
from tdm_r1.rewards.base import reward_options
from tdm_r1.worlds.counting import COLOURS, SHAPES, shape_mask

CORE = 0.7  # coverage of a component's core pixels (its colour)
HALF = 0.5  # coverage of the pixels a component's shape is read from
MAX_ASPECT = 1.5


@dataclass(frozen=True)
class Found:
    """One object found: its shape, colour, coverage area and bounding box (x, y, w, h)."""

    shape: str
    colour: str
    area: float
    box: tuple[int, int, int, int]


@dataclass
class CountingOptions:
    score: Literal["strict", "partial"] = "strict"
    threshold: float = 0.3  # RGB distance from the background above which a pixel is ink
    min_area: float = 6.0  # coverage area (pixels) below which a component is a speck
    colour_tolerance: float = 0.35  # RGB distance within which a component's colour is one of the world's


@functools.lru_cache(maxsize=1024)
def _templates(h: int, w: int) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((shape, shape_mask(shape, w, h) >= HALF) for shape in SHAPES)


def classify_shape(body: np.ndarray) -> str:
    """Shape of one component from its half-coverage mask [h, w] over its bounding box: the world's shape whose
    outline drawn in that box overlaps it most (intersection over union), so a square with ragged corners stays a
    square; "other" when the box is too elongated for one object."""
    h, w = body.shape
    if w > MAX_ASPECT * h or h > MAX_ASPECT * w:
        return "other"
    mask = body >= HALF
    iou = {shape: (mask & t).sum() / max(1, (mask | t).sum()) for shape, t in _templates(h, w)}
    return max(iou, key=iou.get)


def classify_colour(rgb: np.ndarray, tolerance: float) -> str:
    names = list(COLOURS)
    d = np.linalg.norm(np.asarray([COLOURS[n] for n in names]) - rgb[None], axis=1)
    return names[int(d.argmin())] if d.min() <= tolerance else "other"


def find_objects(image: np.ndarray, opts: CountingOptions) -> list[Found]:
    """The objects of one image [H, W, 3] float in [0, 1], left to right."""
    bg = np.median(image.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(image - bg, axis=-1)
    n, labels, stats, _ = cv2.connectedComponentsWithStats((dist > opts.threshold).astype(np.uint8), connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h = (int(v) for v in stats[k, :4])
        own = labels[y : y + h, x : x + w] == k
        d = np.where(own, dist[y : y + h, x : x + w], 0.0)
        cov = np.clip(d / d.max(), 0.0, 1.0)
        area = float(cov.sum())
        if area < opts.min_area:
            continue
        core = cov >= CORE
        colour = classify_colour(image[y : y + h, x : x + w][core].mean(0), opts.colour_tolerance)
        half = cov >= HALF
        ys, xs = np.nonzero(half)
        body = half[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64)
        out.append(Found(classify_shape(body), colour, area, (x, y, w, h)))
    return sorted(out, key=lambda f: f.box[0])


def count_score(found: list[Found], target: dict, score: str) -> float:
    """The strict or partial score of the objects found in an image against a target {count, colour, shape}."""
    want = int(target["count"])
    right = sum(f.shape == target["shape"] and f.colour == target["colour"] for f in found)
    if score == "strict":
        return float(right == want == len(found))
    if not found:
        return 0.0
    return max(0.0, 1.0 - abs(len(found) - want) / want) * right / len(found)


def describe(found: list[Found], target: dict) -> str:
    """A short caption of what was found against a target: `4 found`, `4 found, 1 wrong` (wrong shape or colour)."""
    right = sum(f.shape == target.get("shape") and f.colour == target.get("colour") for f in found)
    return f"{len(found)} found" + (f", {len(found) - right} wrong" if right < len(found) else "")


class CountingReward:
    name = "counting"

    def __init__(self, opts: CountingOptions):
        self.opts = opts

    def describe(self, images: torch.Tensor, targets: list[dict]) -> list[str]:
        """What the reward found in each image, as a caption of labelled sample grids."""
        arr = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return [describe(find_objects(img, self.opts), t) for img, t in zip(arr, targets, strict=True)]

    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        arr = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
        scores = []
        for img, target in zip(arr, targets, strict=True):
            if not {"count", "colour", "shape"} <= target.keys():
                scores.append(float("nan"))  # not a counting prompt: a failure to judge, counted as such
                continue
            scores.append(count_score(find_objects(img, self.opts), target, self.opts.score))
        return torch.tensor(scores, dtype=torch.float32)


def build_counting(term: RewardTermConfig) -> CountingReward:
    return CountingReward(reward_options(term, CountingOptions))
