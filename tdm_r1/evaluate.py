"""Held-out / train evaluation: sample each word (or prompt) once, score it, report the mean score and the rate of
perfect scores. The toy world is scored by OCR (`ocr_mean`, `ocr_exact`); a diffusers run by its configured rewards
(`reward_mean`, `reward_exact`)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from tdm_r1.config import EvalConfig, RewardConfig
from tdm_r1.models.base import FlowModel
from tdm_r1.rewards.base import Reward, score_images
from tdm_r1.rewards.ocr import OCRReward
from tdm_r1.sampling import rollout
from tdm_r1.worlds.base import World


def eval_words(world: World, split: str, n_train: int, seed: int) -> list[str]:
    words = world.words(split)
    if split == "train" and n_train < len(words):
        idx = np.random.default_rng(seed).choice(len(words), n_train, replace=False)
        words = [words[i] for i in sorted(idx)]
    return words


@torch.no_grad()
def generate(
    model: FlowModel,
    world: World,
    words: list[str],
    nfe: int,
    cfg: float,
    shift: float,
    seed: int,
    batch_size: int,
    solver: str = "euler",
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] on the CPU; sample i always gets the same noise for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(words), *model.latent_shape(world.height, world.width)), generator=gen)
    out = []
    for i in range(0, len(words), batch_size):
        cond = model.encode_prompts([world.prompt(w) for w in words[i : i + batch_size]])
        device = next(iter(cond.fields.values())).device
        x = rollout(model, cond, noise[i : i + batch_size].to(device), steps=nfe, shift=shift, cfg=cfg, solver=solver)
        out.append(model.decode(x.sample).cpu())
    return torch.cat(out)


def evaluate(
    model: FlowModel,
    world: World,
    reward: Reward,
    words: list[str],
    nfe: int,
    cfg: float,
    shift: float,
    ecfg: EvalConfig,
    solver: str = "euler",
    metric: str = "ocr",
) -> tuple[dict, torch.Tensor]:
    """Sample and score each word once; `metric` names the result keys (<metric>_mean, <metric>_exact)."""
    t0 = time.time()
    images = generate(model, world, words, nfe, cfg, shift, ecfg.seed, ecfg.batch_size, solver)
    t1 = time.time()
    scores = score_images(reward, images, [world.prompt(w) for w in words])
    ok = ~torch.isnan(scores)
    result = {
        f"{metric}_mean": float(scores[ok].mean()) if ok.any() else float("nan"),
        f"{metric}_exact": float((scores[ok] == 1.0).float().mean()) if ok.any() else float("nan"),
        "n": int(ok.sum()),
        "n_failed": int((~ok).sum()),
        "nfe": nfe,
        "cfg": cfg,
        "shift": shift,
        "solver": solver,
        "seconds_sampling": round(t1 - t0, 2),
        f"seconds_{metric}": round(time.time() - t1, 2),
    }
    return result, images


def evaluate_seeds(
    run: Callable[[EvalConfig], tuple[dict, torch.Tensor]], ecfg: EvalConfig, seeds: int, metric: str = "ocr"
) -> tuple[dict, torch.Tensor]:
    """`run` (an `evaluate` call given its EvalConfig) at the eval seeds ecfg.seed, ecfg.seed + 1, ... (`seeds` of
    them): <metric>_mean / _exact pooled over every scored sample, each seed's mean (<metric>_mean_per_seed) and the
    standard error of the mean across seeds (<metric>_mean_sem): one seed's 256 samples move a checkpoint's mean by
    about +-0.01, as much as the gains one compares. Images are the first seed's; seeds == 1 is `run` itself."""
    if seeds < 1:
        raise ValueError(f"eval: --seeds must be >= 1, got {seeds}")
    runs = [run(dataclasses.replace(ecfg, seed=ecfg.seed + i)) for i in range(seeds)]
    if seeds == 1:
        return runs[0]
    results = [r for r, _ in runs]
    n = sum(r["n"] for r in results)

    def pooled(key: str) -> float:
        return sum(r[key] * r["n"] for r in results if r["n"]) / n if n else float("nan")

    means = [r[f"{metric}_mean"] for r in results]
    out = dict(results[0])
    out |= {
        f"{metric}_mean": pooled(f"{metric}_mean"),
        f"{metric}_exact": pooled(f"{metric}_exact"),
        "n": n,
        "n_failed": sum(r["n_failed"] for r in results),
        "seconds_sampling": round(sum(r["seconds_sampling"] for r in results), 2),
        f"seconds_{metric}": round(sum(r[f"seconds_{metric}"] for r in results), 2),
        "seeds": [ecfg.seed + i for i in range(seeds)],
        f"{metric}_mean_per_seed": means,
        f"{metric}_mean_sem": float(np.std(means, ddof=1) / math.sqrt(seeds)),
    }
    return out, runs[0][1]


def read_and_score(reward, images: torch.Tensor, words: list[str], world) -> tuple[list[str | None], list[float]]:
    """What a reading reward (OCR) read in each image and its score; rewards that do not read give None readings and
    their own scores. Images [B, C, H, W] in [0, 1]."""
    prompts = [world.prompt(w) for w in words]
    if hasattr(reward, "read"):
        from tdm_r1.rewards.ocr import ocr_score

        imgs = images.detach().float().cpu().clamp(0, 1)
        readings = reward.read(imgs.expand(-1, 3, -1, -1) if imgs.shape[1] == 1 else imgs)
        return readings, [ocr_score(r, world.word_of(p)) for r, p in zip(readings, prompts)]
    scores = score_images(reward, images, prompts, world.metadata_of(prompts))
    return [None] * len(words), [float(s) for s in scores]


def build_eval_reward(rcfg: RewardConfig, world: World) -> OCRReward:
    return OCRReward(rcfg, world.word_of)
