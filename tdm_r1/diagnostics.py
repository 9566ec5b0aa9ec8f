"""Diagnostics of TDM-R1's learned reward: how much could any reward tilt of a generator gain (best-of-k), and does
a surrogate prefer the better samples of a group (on the samples it was trained on, and on fresh ones)?

Also where a generator's renderings fail: character errors by position and exact readings by word length, and where
its text sits on the canvas (ink columns, text cut off at the right edge).

Also how a generator counts: by requested count, the share of its samples with the right number of objects; and how
much of a stochastic (eta > 0) rollout's reward its starting noise already decides.

Used by tools/best_of_k.py, tools/surrogate_probe.py, tools/surrogate_fit.py, tools/error_positions.py,
tools/layout_probe.py, tools/counting_probe.py and tools/rollout_noise.py.
"""

from __future__ import annotations

import argparse
import difflib
import math

import torch
from torch import Tensor

from tdm_r1_kernels import fused_renoise, fused_velocity_target_mse


def best_of_k(rewards: Tensor) -> dict[int, float]:
    """rewards [P, G] (G samples of each of P prompts) -> {k: mean over prompts of the best of the first k samples}
    for k = 1, 2, 4, ... up to G (and G itself). The ceiling a generator reaches by always producing its best of k
    samples: what a perfect reward model could select, without learning anything new. A NaN (failed) score never
    counts as a best sample; a prompt with no score among its first k is left out of that mean."""
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"best_of_k: expected rewards [P, G], got shape {tuple(rewards.shape)}")
    g = rewards.shape[1]
    ks = sorted({2**i for i in range(int(math.log2(g)) + 1)} | {g})
    r = rewards.float().nan_to_num(nan=-math.inf)
    out = {}
    for k in ks:
        best = r[:, :k].max(1).values
        out[k] = float(best[torch.isfinite(best)].mean())
    return out


def error_positions(words: list[str], readings: list[str]) -> tuple[dict[int, float], dict[int, float]]:
    """Per target word and its (normalised) OCR reading: a letter of the word is wrong when the longest-matching-block
    alignment (difflib, no junk heuristic) leaves it unmatched. Returns ({position: error rate over words that long},
    {word length: exact-reading rate}). Where a reward's variance comes from: errors that grow with the position
    are a structure shared across words, errors on particular samples are not."""
    if len(words) != len(readings):
        raise ValueError(f"error_positions: {len(words)} words but {len(readings)} readings")
    wrong: dict[int, list[bool]] = {}
    exact: dict[int, list[bool]] = {}
    for word, reading in zip(words, readings):
        matched = set()
        for a, _, n in difflib.SequenceMatcher(a=word, b=reading, autojunk=False).get_matching_blocks():
            matched.update(range(a, a + n))
        for i in range(len(word)):
            wrong.setdefault(i, []).append(i not in matched)
        exact.setdefault(len(word), []).append(reading == word)
    by_pos = {i: sum(v) / len(v) for i, v in sorted(wrong.items())}
    return by_pos, {n: sum(v) / len(v) for n, v in sorted(exact.items())}


def ink_layout(images: Tensor, threshold: float, edge: int = 2) -> dict[str, Tensor]:
    """images [N, H, W] in [0, 1] (dark text on a light ground) -> per image the leftmost and rightmost column holding
    ink (a pixel below `threshold`; -1 / W when none), and whether ink reaches the last `edge` columns (text cut off
    at the right edge: the word may not fit). Returns {"left" [N], "right" [N], "at_edge" [N] bool}."""
    if images.dim() != 3:
        raise ValueError(f"ink_layout: expected images [N, H, W], got shape {tuple(images.shape)}")
    cols = (images < threshold).any(1)  # [N, W]
    w = cols.shape[1]
    idx = torch.arange(w).expand_as(cols)
    left = torch.where(cols, idx, torch.full_like(idx, w)).min(1).values
    right = torch.where(cols, idx, torch.full_like(idx, -1)).max(1).values
    return {"left": left, "right": right, "at_edge": cols[:, w - edge :].any(1)}


def solid_blocks(images: Tensor, threshold: float, fill: float = 0.9, min_width: int = 4) -> dict[str, Tensor]:
    """images [N, H, W] in [0, 1] (dark text on a light ground) -> per image the widest run of adjacent columns whose
    pixels are ink (below `threshold`) in at least `fill` of the image's ink rows (rows holding any ink): a solid block
    over the text, as a blot draws, where a letter's stem is one or two columns wide. `blotted`: that run is at least
    `min_width` columns. Returns {"width" [N], "blotted" [N] bool}."""
    if images.dim() != 3:
        raise ValueError(f"solid_blocks: expected images [N, H, W], got shape {tuple(images.shape)}")
    ink = images < threshold  # [N, H, W]
    rows = ink.any(2, keepdim=True)  # [N, H, 1]
    n_rows = rows.sum(1).clamp(min=1)  # [N, 1]
    solid = ((ink & rows).sum(1) >= fill * n_rows) & (rows.sum(1) > 0)  # [N, W]
    run = torch.zeros(solid.shape[0], dtype=torch.long)
    width = torch.zeros_like(run)
    for c in range(solid.shape[1]):  # longest run of True per row of `solid`
        run = torch.where(solid[:, c], run + 1, torch.zeros_like(run))
        width = torch.maximum(width, run)
    return {"width": width, "blotted": width >= min_width}


@torch.no_grad()
def preference_probe(roles, batch, taus: tuple[float, ...], gen: torch.Generator, states=None) -> list[dict]:
    """For each stored state x_{s_{k+1}} of `batch` (a rollout with advantages) and each tau above its s: re-noise
    with group-shared noise (as the surrogate is trained), compare the surrogate's velocity loss l with the
    reference's l_ref, and report corr(A, l - l_ref) (negative: the surrogate prefers the better samples of a group;
    standard error about 1 / sqrt(N)) and mean(l - l_ref) (well below 0 at low tau: the surrogate fits the samples
    themselves rather than a preference). `states`: the state indices k + 1 to probe (default all but x_0)."""
    n_groups = int(batch.group_ids.max()) + 1
    rows = []
    for k1 in states or range(1, batch.traj.xs.shape[0]):
        x, s_val = batch.traj.xs[k1], float(batch.traj.s[k1])
        s = torch.full((x.shape[0],), s_val, device=x.device)
        for tau_val in (t for t in taus if t > s_val):
            tau = torch.full_like(s, tau_val)
            noise = torch.randn((n_groups, *x.shape[1:]), generator=gen)[batch.group_ids].to(x.device)
            x_tau, _, _ = fused_renoise(x, noise, s, tau)
            l_sur = fused_velocity_target_mse(x, noise, s, tau, roles.surrogate.velocity(x_tau, tau, batch.cond))
            l_ref = fused_velocity_target_mse(x, noise, s, tau, roles.reference.velocity(x_tau, tau, batch.cond))
            d = (l_sur - l_ref).float().cpu()
            adv = batch.adv.float().cpu()
            corr = float(torch.corrcoef(torch.stack([adv, d]))[0, 1]) if d.std() > 0 and adv.std() > 0 else math.nan
            rows.append({"state": k1, "s": s_val, "tau": tau_val, "corr": corr, "mean_diff": float(d.mean())})
    return rows


def format_probe(rows: list[dict]) -> str:
    """One line per row: `x_<state>  s  tau  corr  mean(l - l_ref)`."""
    out = ["state  s      tau   corr(A, l - l_ref)  mean(l - l_ref)"]
    for r in rows:
        out.append(
            f"x_{r['state']}    {r['s']:.3f}  {r['tau']:.2f}  {r['corr']:+.3f}              {r['mean_diff']:+.2e}"
        )
    return "\n".join(out)


def checkpoint_tool_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every checkpoint-sampling tool shares: --checkpoint, --nfe, --cfg, --seed, --set."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a model checkpoint (teacher, student, generator.safetensors)")
    ap.add_argument("--nfe", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return ap


def load_checkpoint_tool(args: argparse.Namespace):
    """(model, world, cfg) for a checkpoint tool: the checkpoint's world, then --set; threads applied. With
    `args.adapter` (a LoRA adapter of tdm-r1 distill / train), the model is the checkpoint with that adapter on it."""
    from tdm_r1.checkpoint import load_model
    from tdm_r1.config import load_config, to_dict
    from tdm_r1.worlds import build_world

    model, world_cfg, _ = load_model(args.checkpoint)
    cfg = load_config(None, args.overrides, base={"world": to_dict(world_cfg)})
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if getattr(args, "adapter", None):
        from tdm_r1.checkpoint import read_adapter
        from tdm_r1.roles import build_roles

        init = read_adapter(args.adapter, cfg.roles)
        model = build_roles(cfg.roles, model.requires_grad_(False), surrogate=False, generator_init=init).generator_ema
    return model, build_world(cfg.world), cfg


def split_scores(scores: Tensor, mask: Tensor, flagged: str, rest: str) -> dict:
    """A probe's summary of scores [N] split by a boolean mask [N]: {flagged: share of the mask,
    "ocr_mean_<flagged>": mean score where set, "ocr_mean_<rest>": where not} (None for an empty side)."""
    if scores.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"split_scores: expected a bool mask shaped like the scores {tuple(scores.shape)}")
    return {
        flagged: float(mask.float().mean()),
        f"ocr_mean_{flagged}": float(scores[mask].mean()) if mask.any() else None,
        f"ocr_mean_{rest}": float(scores[~mask].mean()) if (~mask).any() else None,
    }


def score_heldout_samples(args: argparse.Namespace) -> tuple[Tensor, Tensor, float]:
    """For a checkpoint tool: one sample per held-out word at eval seed --seed, its OCR scores, and the ink threshold
    (halfway between the world's mean background and text levels). Returns (images [N, C, H, W], scores [N],
    threshold)."""
    from tdm_r1.evaluate import generate
    from tdm_r1.rewards.base import score_images
    from tdm_r1.rewards.scorer import build_eval_reward

    model, world, cfg = load_checkpoint_tool(args)
    words = world.items("heldout")
    images = generate(model, world, words, args.nfe, args.cfg, cfg.tdm.shift, args.seed, cfg.eval.batch_size)
    scores = score_images(build_eval_reward(cfg), images, [world.prompt(w) for w in words], world.targets(words))
    w = world.cfg
    return images, scores, (sum(w.background_level) + sum(w.text_level)) / 4


def count_profile(found: list[list], targets: list[dict]) -> dict:
    """How a generator counts, from the objects found in its samples (tdm_r1.rewards.counting.find_objects) and the
    requests: per requested count, the share of samples with that many objects of any kind (`right_count`), with
    exactly the asked objects (`strict`) and the mean of found minus asked (`bias`); overall, the share of each
    found-minus-asked difference."""
    by_count: dict[int, list[tuple[int, bool]]] = {}
    for objs, t in zip(found, targets, strict=True):
        right = sum(f.shape == t["shape"] and f.colour == t["colour"] for f in objs)
        by_count.setdefault(int(t["count"]), []).append((len(objs), right == t["count"] == len(objs)))
    rows = {}
    for c, v in sorted(by_count.items()):
        rows[c] = {"n": len(v), "right_count": sum(n == c for n, _ in v) / len(v),
                   "strict": sum(s for _, s in v) / len(v), "bias": sum(n - c for n, _ in v) / len(v)}  # fmt: skip
    diffs = [len(objs) - int(t["count"]) for objs, t in zip(found, targets, strict=True)]
    return {"by_count": rows, "difference": {d: diffs.count(d) / len(diffs) for d in sorted(set(diffs))}}


def start_noise_share(det: Tensor, stoch: Tensor) -> dict:
    """How much of a stochastic rollout's reward its starting noise decides, from the rewards `det` [N] of N
    deterministic rollouts and `stoch` [N, R] of R stochastic rollouts (eta > 0) from each of the same N starts.

    `start_share`: the share of the stochastic rewards' variance between starting noises, 1 - mean_i var_j / var
    (population variances; 1 when the re-noising never changes a reward, 0 when the start tells nothing);
    `same_as_deterministic`: the share of stochastic rewards equal to their start's deterministic reward; `corr`: the
    correlation over starts of the deterministic reward with the mean stochastic one (NaN when either is constant);
    the two rollouts' mean rewards."""
    if det.dim() != 1 or stoch.dim() != 2 or stoch.shape[0] != det.shape[0] or stoch.shape[1] < 1:
        raise ValueError(f"start_noise_share: expected det [N] and stoch [N, R], got {tuple(det.shape)} and "
                         f"{tuple(stoch.shape)}")  # fmt: skip
    det, stoch = det.double(), stoch.double()
    total = stoch.var(unbiased=False)
    within = stoch.var(dim=1, unbiased=False).mean()
    m = stoch.mean(dim=1)
    a, b = det - det.mean(), m - m.mean()
    den = float((a.square().sum() * b.square().sum()).sqrt())
    return {
        "n": det.shape[0],
        "draws": stoch.shape[1],
        "mean_deterministic": float(det.mean()),
        "mean_stochastic": float(stoch.mean()),
        "start_share": float(1 - within / total) if total > 0 else math.nan,
        "same_as_deterministic": float((stoch == det[:, None]).double().mean()),
        "corr": float((a * b).sum()) / den if den > 0 else math.nan,
    }
