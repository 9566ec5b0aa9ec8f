"""The weighted sum of a run's rewards (train.rewards), scored off the training thread."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from tdm_r1.rewards.base import score_images


class RewardScorer:
    """Weighted sum of rewards, computed on a worker thread so OCR of one chunk overlaps sampling the next. Called
    directly, it is that sum as one Reward (evaluation). `metadata_of(prompts)` gives the rewards' per-prompt metadata
    (prompt files in .jsonl form)."""

    def __init__(self, rewards: list[tuple[object, float]], metadata_of=None):
        self.rewards = rewards
        self.metadata_of = metadata_of
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        metadata = self.metadata_of(prompts) if self.metadata_of is not None else None
        total = torch.zeros(images.shape[0])
        for reward, weight in self.rewards:
            total += weight * score_images(reward, images, prompts, metadata)
        return total

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None) -> Tensor:
        return self._score(images, prompts)

    def submit(self, images: Tensor, prompts: list[str]) -> Future:
        return self.pool.submit(self._score, images.detach().cpu(), list(prompts))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
