"""Group-normalised advantages (DESIGN section 5.3).

A_i = (r_i - mean of r over i's prompt group) / (std of all rewards of the epoch + eps), clipped to
[-clip, clip]. A NaN reward (the scorer failed on that sample) is excluded from every statistic and its
advantage is 0, so it contributes nothing to any loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-4, clip: float = 5.0) -> Tensor:
    """rewards [N] (NaN = failed), group_ids [N] int -> advantages [N] float32."""
    r = rewards.double()
    ok = ~torch.isnan(r)
    if not ok.any():
        return torch.zeros_like(rewards, dtype=torch.float32)
    groups = group_ids.long()
    n_groups = int(groups.max()) + 1
    r0 = torch.where(ok, r, torch.zeros_like(r))
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, r0)
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, ok.double())
    means = sums / counts.clamp_min(1)
    std = r[ok].std(unbiased=False) if ok.sum() > 1 else torch.zeros((), dtype=torch.float64)
    adv = (r0 - means[groups]) / (std + eps)
    adv = torch.where(ok, adv.clamp(-clip, clip), torch.zeros_like(adv))
    return adv.float()


def per_reward_advantages(parts: Tensor, weights: list[float], group_ids: Tensor, eps: float, clip: float) -> Tensor:
    """train.reward_combine=per_reward: each reward's group advantages (its own scale normalised away), then their
    weighted sum. A sample any reward failed on is excluded from every reward's statistics and gets 0."""
    failed = ~torch.isfinite(parts).all(dim=1)
    adv = torch.zeros(parts.shape[0])
    for r, w in enumerate(weights):
        col = torch.where(failed, torch.nan, parts[:, r])
        adv += w * group_advantages(col, group_ids, eps, clip)
    return adv
