"""A run's rewards: its train.rewards entries scored off the training thread (one column per entry; the trainer
combines them, train.reward_combine); and the reward a toy run is evaluated with (OCR)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from tdm_r1 import timing
from tdm_r1.config import Config, RewardTermConfig
from tdm_r1.rewards.base import Reward, build_reward, score_images

log = logging.getLogger(__name__)


class RewardScorer:
    """A run's rewards, scored on a worker thread so OCR of one chunk overlaps sampling the next: `submit` gives each
    reward's scores as one column ([N, R], NaN where a reward failed). Called directly, it is their weighted sum as
    one Reward (evaluation)."""

    def __init__(self, rewards: list[tuple[Reward, float]]):
        self.rewards = rewards
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    @property
    def names(self) -> list[str]:
        """One name per reward, as metrics key them (a repeated name gets its position: ocr, ocr_2)."""
        out: list[str] = []
        for reward, _ in self.rewards:
            name = str(getattr(reward, "name", type(reward).__name__))
            out.append(name if name not in out else f"{name}_{len(out) + 1}")
        return out

    @property
    def weights(self) -> list[float]:
        return [float(w) for _, w in self.rewards]

    def begin_epoch(self, epoch: int, run_dir) -> None:
        """Tell the rewards that want it (`begin_epoch`, e.g. `human`) which epoch's rollout comes and the run's
        directory."""
        for reward, _ in self.rewards:
            if hasattr(reward, "begin_epoch"):
                reward.begin_epoch(epoch, run_dir)

    def take_stats(self) -> dict[str, float]:
        """Per-reward service figures since the last call (rewards with `take_stats`, e.g. `remote`), keyed
        reward_<name>_<figure>."""
        out = {}
        for name, (reward, _) in zip(self.names, self.rewards, strict=True):
            if hasattr(reward, "take_stats"):
                out |= {f"reward_{name}_{k}": v for k, v in reward.take_stats().items()}
        return out

    def last_errors(self) -> list[str]:
        """The last failure of every reward that reports one (`last_error`), named."""
        return [f"{n}: {r.last_error}" for n, (r, _) in zip(self.names, self.rewards, strict=True)
                if getattr(r, "last_error", None)]  # fmt: skip

    def __call__(self, images: Tensor, prompts: list[str], targets: list[dict]) -> Tensor:
        return combine_sum(self.parts(images, prompts, targets), self.weights)

    def parts(self, images: Tensor, prompts: list[str], targets: list[dict]) -> Tensor:
        """[N, R]: every reward's scores (NaN for the samples of a reward that failed on them)."""
        total = torch.zeros(images.shape[0])
        columns = []
        for reward, _ in self.rewards:
            try:
                scores = score_images(reward, images, prompts, targets)
                if scores.shape != total.shape:
                    raise ValueError(f"returned shape {tuple(scores.shape)} for {images.shape[0]} images")
            except Exception as e:  # a reward that raises fails its chunk: NaN, counted against max_reward_failure
                log.warning(
                    "reward %s failed on %d samples: %s: %s",
                    getattr(reward, "name", reward),
                    len(total),
                    type(e).__name__,
                    e,
                )
                scores = torch.full_like(total, float("nan"))
            columns.append(scores.float())
        return torch.stack(columns, dim=1)

    def submit(self, images: Tensor, prompts: list[str], targets: list[dict]) -> Future:
        """A future of `parts` for these samples."""
        return self.pool.submit(self._timed, images.detach().cpu(), list(prompts), list(targets))

    def _timed(self, images: Tensor, prompts: list[str], targets: list[dict]) -> Tensor:
        t0 = time.perf_counter()
        try:
            return self.parts(images, prompts, targets)
        finally:
            timing.background("reward", time.perf_counter() - t0)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def combine_sum(parts: Tensor, weights: list[float]) -> Tensor:
    """The weighted sum of [N, R] reward columns (NaN where any is NaN), summed in the entries' order."""
    total = torch.zeros(parts.shape[0])
    for r in range(parts.shape[1]):
        total += weights[r] * parts[:, r]
    return total


def build_scorer(cfg: Config) -> RewardScorer:
    """The weighted sum of train.rewards, each built from its own entry (options, local weights path, device)."""
    return RewardScorer([(build_reward(term), term.weight) for term in cfg.train.rewards])


def build_eval_reward(cfg: Config) -> Reward:
    """The toy world's evaluation reward: OCR with the options of the run's `ocr` entry of train.rewards (defaults
    when it trains on other rewards), so evaluation reads as the training reward does."""
    term = next((t for t in cfg.train.rewards if t.name == "ocr"), RewardTermConfig(name="ocr"))
    return build_reward(RewardTermConfig(name="ocr", options=dict(term.options)))
