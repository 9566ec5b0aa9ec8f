"""Held-out / train evaluation: sample each word (or prompt) once, score it, report the mean score and the rate of
perfect scores. The toy world is scored by OCR (`ocr_mean`, `ocr_exact`); a diffusers run by its configured rewards
(`reward_mean`, `reward_exact`)."""

from __future__ import annotations

import time

import numpy as np
import torch

from tdm_r1.config import EvalConfig, RewardConfig
from tdm_r1.models.base import FlowModel
from tdm_r1.rewards.base import score_images
from tdm_r1.rewards.ocr import OCRReward
from tdm_r1.sampling import rollout
from tdm_r1.worlds.ocr import OCRWorld


def eval_words(world: OCRWorld, split: str, n_train: int, seed: int) -> list[str]:
    words = world.words(split)
    if split == "train" and n_train < len(words):
        idx = np.random.default_rng(seed).choice(len(words), n_train, replace=False)
        words = [words[i] for i in sorted(idx)]
    return words


@torch.no_grad()
def generate(
    model: FlowModel,
    world: OCRWorld,
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
    world: OCRWorld,
    reward: OCRReward,
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


def build_eval_reward(rcfg: RewardConfig, world: OCRWorld) -> OCRReward:
    return OCRReward(rcfg, world.word_of)
