"""Group preference: S_g = sum_{i in g} A_i beta_dpo (l_i - l_ref_i) / G, w_i = sigmoid(S_g(i)), PPO/reference gates.

Two steps so a group spanning ranks can be summed in between (the caller all-reduces the scores):
`fused_group_preference_scores` (segmented sums) then `fused_group_preference_weights` (sigmoid and gates);
`fused_group_preference` runs both for a single process. Gate definitions are in
`tdm_r1_kernels.reference.group_preference_weights_ref`. Every output is detached (weights and gates carry no
gradient), so there is no backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import alloc, launch_opts, tl, triton
from .dispatch import resolve_backend
from .reference import (
    GroupPreference,
    group_preference_scores_ref,
    group_preference_weights_ref,
)

__all__ = [
    "fused_group_preference",
    "fused_group_preference_scores",
    "fused_group_preference_weights",
    "group_preference_scores_fwd",
    "group_preference_weights_fwd",
]

# Members of one group summed per step of the scores kernel (groups are G = 24 in the reference presets).
BLOCK_GROUP = 64
BLOCK_SAMPLES = 1024


@triton.jit
def _group_preference_scores_kernel(
    l_ptr, l_ref_ptr, adv_ptr, order_ptr, offsets_ptr, scores_ptr, coef, BLOCK: tl.constexpr
):  # fmt: skip
    i_g = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + i_g)
    end = tl.load(offsets_ptr + i_g + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(start, end, BLOCK):
        o_k = k + tl.arange(0, BLOCK)
        m_k = o_k < end
        idx = tl.load(order_ptr + o_k, mask=m_k, other=0)
        a = tl.load(adv_ptr + idx, mask=m_k, other=0.0).to(tl.float32)
        d = tl.load(l_ptr + idx, mask=m_k, other=0.0).to(tl.float32)
        d -= tl.load(l_ref_ptr + idx, mask=m_k, other=0.0).to(tl.float32)
        acc += tl.where(m_k, a * coef * d, 0.0)
    tl.store(scores_ptr + i_g, tl.sum(acc, axis=0))


@triton.jit
def _group_preference_weights_kernel(
    scores_ptr, l_ptr, l_ref_ptr, l_old_ptr, adv_ptr, group_ptr, active_ptr, w_ptr, ppo_ptr, ref_ptr, N, hi, lo,
    BLOCK: tl.constexpr,
):  # fmt: skip
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    g = tl.load(group_ptr + o_n, mask=m_n, other=0)
    s = tl.load(scores_ptr + g, mask=m_n, other=0.0)
    l = tl.load(l_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    l_ref = tl.load(l_ref_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    l_old = tl.load(l_old_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    active = tl.load(active_ptr).to(tl.int1)
    ratio = tl.exp(l_old - l)
    pos = a > 0.0
    ppo = tl.where(pos, ratio > hi, ratio < lo)
    moved = tl.where(pos, l < l_ref, l > l_ref)
    tl.store(w_ptr + o_n, 1.0 / (1.0 + tl.exp(-s)), mask=m_n)
    tl.store(ppo_ptr + o_n, ppo, mask=m_n)
    tl.store(ref_ptr + o_n, moved & active, mask=m_n)


def _vec(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).float().contiguous()


def group_preference_scores_fwd(
    l: Tensor, l_ref: Tensor, advantages: Tensor, group: Tensor, num_groups: int, coef: float, backend: str
) -> Tensor:
    """Local S_g = sum_{i in g} A_i coef (l_i - l_ref_i), fp32 [num_groups]; group ids must lie in [0, num_groups)."""
    lv, rv, av = _vec(l), _vec(l_ref), _vec(advantages)
    gv = group.reshape(-1).long().contiguous()
    if not (lv.numel() == rv.numel() == av.numel() == gv.numel()):
        raise ValueError("l, l_ref, advantages and group must have the same number of samples")
    scores = alloc((num_groups,), torch.float32, l.device)
    if backend == "triton":
        order = torch.argsort(gv, stable=True)
        bounds = torch.arange(num_groups + 1, device=gv.device, dtype=gv.dtype)
        offsets = torch.searchsorted(gv[order], bounds)
        _group_preference_scores_kernel[(num_groups,)](
            lv, rv, av, order, offsets, scores, coef, BLOCK=BLOCK_GROUP, **launch_opts()
        )
    else:
        torch.ops.tdm_r1.group_preference_scores(lv, rv, av, gv, coef, scores)
    return scores


def group_preference_weights_fwd(
    scores: Tensor,
    l: Tensor,
    l_ref: Tensor,
    l_old: Tensor,
    advantages: Tensor,
    group: Tensor,
    clip: float,
    ref_active: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(w fp32 [N], ppo_mask bool [N], ref_mask bool [N]); ref_active is a bool [1] tensor."""
    sv, lv, rv, ov, av = (_vec(t) for t in (scores, l, l_ref, l_old, advantages))
    gv = group.reshape(-1).long().contiguous()
    N = lv.numel()
    w = alloc((N,), torch.float32, l.device)
    ppo, ref = alloc((N,), torch.bool, l.device), alloc((N,), torch.bool, l.device)
    if backend == "triton":
        _group_preference_weights_kernel[(triton.cdiv(N, BLOCK_SAMPLES),)](
            sv, lv, rv, ov, av, gv, ref_active, w, ppo, ref, N, 1.0 + clip, 1.0 - clip, BLOCK=BLOCK_SAMPLES,
            **launch_opts(),
        )  # fmt: skip
    else:
        torch.ops.tdm_r1.group_preference_weights(sv, lv, rv, ov, av, gv, clip, ref_active, w, ppo, ref)
    return w, ppo, ref


def fused_group_preference_scores(
    l: Tensor,
    l_ref: Tensor,
    advantages: Tensor,
    group: Tensor,
    num_groups: int,
    beta_dpo: float,
    group_size: int,
    *,
    backend: str | None = None,
) -> Tensor:
    """This process's share of S_g, fp32 [num_groups]; all-reduce (sum) across ranks before the weights.

    l, l_ref, advantages [N] float (detached); group [N] int ids in [0, num_groups); group_size is G.
    """
    backend = resolve_backend(l.device, backend)
    if backend == "reference":
        return group_preference_scores_ref(l, l_ref, advantages, group, num_groups, beta_dpo, group_size)
    return group_preference_scores_fwd(l, l_ref, advantages, group, num_groups, beta_dpo / group_size, backend)


def fused_group_preference_weights(
    scores: Tensor,
    l: Tensor,
    l_ref: Tensor,
    l_old: Tensor,
    advantages: Tensor,
    group: Tensor,
    clip: float,
    ref_div: Tensor | float | None = None,
    ref_div_threshold: float = 0.05,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(w = sigmoid(S_g(i)) fp32 [N], ppo_mask bool [N], ref_mask bool [N]); masks are True where excluded.

    scores: the summed S_g [num_groups]; l_old: per-sample loss of the slow surrogate; ref_div: the batch mean
    (v_sur - v_ref)^2 (scalar or 0-d/1-element tensor; None disables the reference gate).
    """
    backend = resolve_backend(l.device, backend)
    if backend == "reference":
        return group_preference_weights_ref(
            scores, l, l_ref, l_old, advantages, group, clip, ref_div, ref_div_threshold
        )
    if ref_div is None:
        active = torch.zeros(1, dtype=torch.bool, device=l.device)
    else:
        active = (torch.as_tensor(ref_div, device=l.device).float().reshape(1) > ref_div_threshold).contiguous()
    return group_preference_weights_fwd(scores, l, l_ref, l_old, advantages, group, clip, active, backend)


def fused_group_preference(
    l: Tensor,
    l_ref: Tensor,
    l_old: Tensor,
    advantages: Tensor,
    group: Tensor,
    num_groups: int,
    beta_dpo: float,
    group_size: int,
    clip: float,
    ref_div: Tensor | float | None = None,
    ref_div_threshold: float = 0.05,
    *,
    backend: str | None = None,
) -> GroupPreference:
    """Scores then weights and gates in one process (no cross-rank sum); see the two entry points above."""
    scores = fused_group_preference_scores(
        l, l_ref, advantages, group, num_groups, beta_dpo, group_size, backend=backend
    )
    w, ppo, ref = fused_group_preference_weights(
        scores, l, l_ref, l_old, advantages, group, clip, ref_div, ref_div_threshold, backend=backend
    )
    return GroupPreference(w, scores, ppo, ref)
