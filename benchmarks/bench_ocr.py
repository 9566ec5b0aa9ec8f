"""OCR reward throughput: tiled canvases (one OCR call per canvas) vs one OCR call per image.

Usage: python benchmarks/bench_ocr.py [--n 64] [--json benchmarks/results/ocr.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from tdm_r1.config import WorldConfig
from tdm_r1.rewards.base import score_images
from tdm_r1.rewards.ocr import OCROptions, OCRReward
from tdm_r1.worlds.ocr import build_world


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=64, help="images for the tiled runs")
    ap.add_argument("--n-single", type=int, default=16, help="images for the one-call-per-image run")
    ap.add_argument("--json", default="benchmarks/results/ocr.json")
    args = ap.parse_args()
    print(
        f"# ocr bench: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, git {git_sha()}"
    )
    world = build_world(WorldConfig())
    words = world.heldout_words[: args.n]
    images = world.render_batch(words, np.random.default_rng(0)).expand(-1, 3, -1, -1)
    prompts = [world.prompt(w) for w in words]
    rows = []
    for cols, nrows in [(4, 16), (8, 8), (2, 32)]:
        reward = OCRReward(OCROptions(tile_columns=cols, tile_rows=nrows))
        reward.read(images[:4])  # warm-up: model load and first-call allocations
        t0 = time.perf_counter()
        scores = score_images(reward, images, prompts, world.targets(words))
        dt = time.perf_counter() - t0
        rows.append(
            {
                "mode": f"tiled {cols}x{nrows}",
                "n": len(words),
                "img_per_s": len(words) / dt,
                "ocr_mean": float(scores.mean()),
            }
        )
    t0 = time.perf_counter()
    readings = reward.read(images[: args.n_single], tiled=False)
    dt = time.perf_counter() - t0
    exact = sum(r == w for r, w in zip(readings, words))
    rows.append(
        {
            "mode": "one call per image",
            "n": args.n_single,
            "img_per_s": args.n_single / dt,
            "ocr_mean": exact / args.n_single,
        }
    )
    base = rows[-1]["img_per_s"]
    for r in rows:
        r["speedup_vs_single"] = r["img_per_s"] / base
        speed = f"{r['img_per_s']:7.1f} img/s  x{r['speedup_vs_single']:5.1f}"
        print(f"{r['mode']:>20}: {speed}  ocr_mean {r['ocr_mean']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
