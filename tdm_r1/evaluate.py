"""Held-out / train evaluation: sample each item (a word, a prompt) once, score it, report the mean score and the rate
of perfect scores. The toy world is scored by OCR (`ocr_mean`, `ocr_exact`); a diffusers run by its configured rewards
(`reward_mean`, `reward_exact`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tdm_r1.checkpoint.sources import content_id, teacher_id, teacher_source
from tdm_r1.config import Config, ConfigError, EvalConfig, RewardTermConfig, is_diffusers, to_dict
from tdm_r1.distributed import LOCAL, Dist
from tdm_r1.models.base import FlowModel
from tdm_r1.rewards.base import Reward, score_images
from tdm_r1.rewards.scorer import build_eval_reward, build_scorer
from tdm_r1.roles import Roles
from tdm_r1.sampling import rollout
from tdm_r1.worlds.base import World


def eval_items(world: World, split: str, ecfg: EvalConfig) -> list[str]:
    """The items a split is evaluated on: every held-out item; of the train split a fixed subset of
    eval.train_subset items, seeded by eval.seed."""
    items = world.items(split)
    if split == "train" and ecfg.train_subset < len(items):
        idx = np.random.default_rng(ecfg.seed).choice(len(items), ecfg.train_subset, replace=False)
        items = [items[i] for i in sorted(idx)]
    return items


def rank_share(n: int, dist: Dist = LOCAL) -> list[int]:
    """This rank's items of `n`, when an evaluation is split across ranks (each item sampled once in all): contiguous
    blocks of ceil(n / world) items in rank order, the last block padded by repeating item n - 1, so every rank
    samples equally many (partitioned roles sample collectively). One process: every item."""
    m = -(-n // dist.world)
    return [min(i, n - 1) for i in range(dist.rank * m, (dist.rank + 1) * m)]


def gather_share(local: Tensor, n: int, dist: Dist = LOCAL) -> Tensor:
    """The values of all `n` items from each rank's share of them (`rank_share`), in item order, on every rank."""
    if dist.world == 1:
        return local
    return torch.cat(dist.all_gather(local))[:n]


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
    indices: list[int] | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] on the CPU; sample i always gets the same noise for a given seed, also when only
    the items `indices` are sampled (a rank's share: `rank_share`)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(words), *model.latent_shape(world.height, world.width)), generator=gen)
    if indices is not None:
        words, noise = [words[i] for i in indices], noise[indices]
    out = []
    for i in range(0, len(words), batch_size):
        cond = model.encode_prompts([world.prompt(w) for w in words[i : i + batch_size]])
        device = next(iter(cond.fields.values())).device
        x = rollout(model, cond, noise[i : i + batch_size].to(device), steps=nfe, shift=shift, cfg=cfg, solver=solver)
        out.append(model.decode(x.sample).cpu())
    return torch.cat(out) if out else noise.new_zeros((0, 3, world.height, world.width))


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
    dist: Dist = LOCAL,
    per_item: bool = False,
) -> tuple[dict, torch.Tensor]:
    """Sample and score each item once; `metric` names the result keys (<metric>_mean, <metric>_exact); per_item adds
    every item's score ("per_item", NaN where scoring failed). Distributed: each rank samples and scores its share
    (`rank_share`) and the scores are gathered; the images returned are this rank's share (rank 0: the first
    ceil(n / world) items, in order)."""
    t0 = time.time()
    idx = rank_share(len(words), dist) if dist.world > 1 else None
    mine = words if idx is None else [words[i] for i in idx]
    images = generate(model, world, words, nfe, cfg, shift, ecfg.seed, ecfg.batch_size, solver, indices=idx)
    t1 = time.time()
    local = score_images(reward, images, [world.prompt(w) for w in mine], world.targets(mine)) if mine else None
    scores = gather_share(torch.zeros(0) if local is None else local.float().cpu(), len(words), dist)
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
    if per_item:
        result["per_item"] = [float(v) for v in scores]
    return result, images


def evaluate_seeds(
    run: Callable[[EvalConfig], tuple[dict, torch.Tensor]], ecfg: EvalConfig, seeds: int, metric: str = "ocr"
) -> tuple[dict, torch.Tensor]:
    """`run` (an `evaluate` call given its EvalConfig) at the eval seeds ecfg.seed, ecfg.seed + 1, ... (`seeds` of
    them): <metric>_mean / _exact pooled over every scored sample, each seed's mean and exact rate
    (<metric>_mean_per_seed, <metric>_exact_per_seed) and the
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
        f"{metric}_exact_per_seed": [r[f"{metric}_exact"] for r in results],
    }
    if "per_item" in results[0]:
        out["per_item"] = [r["per_item"] for r in results]  # [seed][item]
    return out, runs[0][1]


def read_and_score(reward, images: torch.Tensor, words: list[str], world) -> tuple[list[str | None], list[float]]:
    """What a reading reward (OCR) read in each image and its score; a reward that describes what it found (counting:
    `4 found`) gives that; others give None readings and their own scores. Images [B, C, H, W] in [0, 1]."""
    prompts, targets = [world.prompt(w) for w in words], world.targets(words)
    if hasattr(reward, "read"):
        from tdm_r1.rewards.ocr import ocr_score

        imgs = images.detach().float().cpu().clamp(0, 1)
        readings = reward.read(imgs.expand(-1, 3, -1, -1) if imgs.shape[1] == 1 else imgs)
        return readings, [ocr_score(r, t["text"]) for r, t in zip(readings, targets)]
    scores = [float(s) for s in score_images(reward, images, prompts, targets)]
    rewards = getattr(reward, "rewards", None)  # a scorer of one reward that describes what it found (counting)
    if rewards is not None and len(rewards) == 1 and hasattr(rewards[0][0], "describe"):
        imgs = images.detach().float().cpu().clamp(0, 1)
        return rewards[0][0].describe(imgs.expand(-1, 3, -1, -1) if imgs.shape[1] == 1 else imgs, targets), scores
    return [None] * len(words), scores


# -- a run's evaluations: roles at several seeds, the baselines cache, labelled samples ---------------------


def evaluate_role(
    role,
    world,
    cfg: Config,
    words: list[str],
    nfe: int,
    guidance: float,
    state: dict,
    dist: Dist = LOCAL,
    seeds: int = 1,
    many_step: bool = False,
) -> tuple[dict, Tensor]:
    """Sample and score: the toy world by OCR, a diffusers run by its configured rewards (`eval_metric`), at `seeds`
    eval seeds from cfg.eval.seed (`evaluate_seeds`: > 1 adds per-seed means and their standard error); the few-step
    schedule (tdm.shift, Euler), or with many_step the teacher's sampler (sample.shift, sample.solver). Distributed:
    each rank samples and scores its share of the items (`rank_share`: each sampled once in all; partitioned roles
    sample collectively) with its own reward on its own device, and every rank gets the pooled result. The images
    are this rank's share (rank 0: the first items, in order)."""
    shift, solver = (cfg.sample.shift, cfg.sample.solver) if many_step else (cfg.tdm.shift, "euler")
    reward, metric = eval_reward(cfg, world, state), eval_metric(cfg)

    def one(ecfg) -> tuple[dict, Tensor]:
        return evaluate(role, world, reward, words, nfe, guidance, shift, ecfg, solver, metric=metric, dist=dist)

    return evaluate_seeds(one, cfg.eval, seeds, metric)


def evaluates_with_train_rewards(cfg: Config) -> bool:
    """A run is evaluated by OCR (`ocr_*`) on the toy OCR world, by its weighted train.rewards (`reward_*`) on any
    other world (diffusers prompt files, a world plugged in by world.name)."""
    return is_diffusers(cfg) or cfg.world.name != "ocr"


def eval_reward(cfg: Config, world, state: dict):
    """The evaluation reward (`evaluates_with_train_rewards`), built once per run into `state`. A world with a reward
    of its own (`world.reward`, e.g. the counting world's) is scored by it when train.rewards names nothing but the
    default OCR: a checkpoint evaluated without its run's config."""
    if "reward" not in state:
        if not evaluates_with_train_rewards(cfg):
            state["reward"] = build_eval_reward(cfg)
        else:
            own = getattr(world, "reward", None)
            if own and [t.name for t in cfg.train.rewards] == ["ocr"]:
                train = dataclasses.replace(cfg.train, rewards=[RewardTermConfig(name=own)])
                cfg = dataclasses.replace(cfg, train=train)
            state["reward"] = build_scorer(cfg)
    return state["reward"]


def label_samples(reporter, images: Tensor, words: list[str], cfg: Config, world, state: dict) -> None:
    """Rank 0, end of a run: the labelled grids of the start (kept at epoch 0) and the end samples, with what the
    evaluation reward read and scored; one reward call for both."""
    from tdm_r1.report import sample_tiles

    if reporter is None:
        return
    n = min(sample_tiles(images), len(images))  # a distributed evaluation's images: rank 0's share, the first items
    end, end_words = images[:n], words[:n]
    kept = reporter.kept_start()
    start, start_words = (end[:0], []) if kept is None else kept
    readings, scores = read_and_score(
        eval_reward(cfg, world, state), torch.cat([start, end]), start_words + end_words, world
    )
    k = len(start_words)
    reporter.labelled_samples("end", end, end_words, readings[k:], scores[k:])
    if k:
        reporter.labelled_samples("start", start, start_words, readings[:k], scores[:k])
        half = min(k, n) // 2  # the pairs: the same words (and noise) before and after training
        if half and start_words[:half] == end_words[:half]:
            ends = (end, end_words, readings[k:], scores[k:])
            reporter.start_end_pairs((start, start_words, readings[:k], scores[:k]), ends)


def eval_seeds(cfg: Config) -> tuple[int, int, int]:
    """(seeds of the K-step held-out rows, of the teacher's many-step row, of the train-split rows) from cfg.eval;
    < 1 is an error naming the field."""

    ev = cfg.eval
    ref = ev.seeds if ev.reference_seeds is None else ev.reference_seeds
    train = ev.seeds if ev.train_seeds is None else ev.train_seeds
    for name, value in (("eval.seeds", ev.seeds), ("eval.reference_seeds", ref), ("eval.train_seeds", train)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    return ev.seeds, ref, train


def eval_metric(cfg: Config) -> str:
    """Name of the evaluation score: `ocr` (the toy OCR world) or `reward` (the weighted train.rewards)."""
    return "reward" if evaluates_with_train_rewards(cfg) else "ocr"


def baseline_cache_dir(cfg: Config) -> Path | None:
    """Where baseline rows are shared between runs (eval.baseline_cache): "auto" = .baseline_cache beside run_dir
    (runs/.baseline_cache for runs/*), "" = not shared (each run keeps its own baselines.json only)."""
    where = cfg.eval.baseline_cache
    if not where:
        return None
    return Path(cfg.run_dir).resolve().parent / ".baseline_cache" if where == "auto" else Path(where)


def _words_id(ws: list[str] | None) -> str | None:
    return None if ws is None else hashlib.sha256("\n".join(ws).encode()).hexdigest()[:16]


def _measured_with(cfg: Config) -> dict:
    """What every evaluation's numbers depend on besides the model and the items: the reward that scores them and the
    images' size and precision."""
    reward = [to_dict(t) for t in cfg.train.rewards] if evaluates_with_train_rewards(cfg) else "ocr"
    if is_diffusers(cfg):
        d = cfg.diffusers
        images = [d.height, d.width, d.dtype, d.master_weights_fp32, d.max_sequence_length]
    else:
        images = to_dict(cfg.world)
    return {"reward": reward, "images": images, "seed": cfg.eval.seed}


def _shared_row(cache: Path | None, key: dict, dist: Dist, compute) -> dict:
    """One baseline row from the shared cache (rank 0 reads, every rank takes its view), else computed (collectively)
    and stored there by rank 0 (written whole: a concurrent run reads the old file or the new one)."""
    if cache is None:
        return compute()
    f = cache / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    hit = None
    if dist.is_main and f.is_file():
        try:
            stored = json.loads(f.read_text())
            hit = stored["result"] if stored.get("key") == key else None
        except (OSError, ValueError, KeyError):
            hit = None  # unreadable: measured again and rewritten
    hit = dist.broadcast_object(hit)
    if hit is not None:
        return hit
    result = compute()
    if dist.is_main:
        from tdm_r1.checkpoint import atomic_write

        cache.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"key": key, "result": result}, indent=2) + "\n"
        atomic_write(f, lambda tmp: Path(tmp).write_text(text))
    return result


def baseline_evals(
    cfg: Config,
    roles: Roles,
    world,
    words: list[str],
    state: dict,
    dist: Dist = LOCAL,
    train_words: list[str] | None = None,
) -> dict:
    """Teacher at sample.nfe + CFG and at K steps, and the starting generator at K steps, on `words`; the starting
    generator also on `train_words` when given (row tdm_4nfe_train). Cached per run (baselines.json) and, row by row,
    across runs (`baseline_cache_dir`): each row is keyed by the content of the model it samples (teacher,
    roles.generator_init), the items, the sampler, the seeds and `_measured_with`, so a run against a teacher another
    run already measured samples none of its teacher rows (the 40-NFE + CFG one is the costliest of a run's
    evaluations). Every rank takes rank 0's view of the caches, since evaluating partitioned roles is collective."""
    path = Path(cfg.run_dir) / "baselines.json"
    # what the numbers depend on, by content: replacing a checkpoint at the same path invalidates the cache
    key = {
        "teacher": teacher_source(cfg),
        "teacher_id": teacher_id(cfg),
        "generator_init": cfg.roles.generator_init,
        "generator_init_id": content_id(cfg.roles.generator_init),
        "words": [len(words), _words_id(words)],
        "train_words": None if train_words is None else [len(train_words), _words_id(train_words)],
        "seed": cfg.eval.seed,
        "sampling": [cfg.sample.nfe, cfg.sample.cfg, cfg.sample.shift, cfg.sample.solver, cfg.tdm.steps, cfg.tdm.shift],
        "seeds": list(eval_seeds(cfg)),
        "measured_with": _measured_with(cfg),
    }
    cached = json.loads(path.read_text()) if dist.is_main and path.is_file() else None
    cached = dist.broadcast_object(cached)
    if cached is not None and cached.get("key") == key:
        return cached["results"]
    seeds, ref_seeds, train_seeds = eval_seeds(cfg)
    k, s = cfg.tdm.steps, cfg.sample
    teacher = {"model": key["teacher_id"]}
    start = {"model": key["teacher_id"], "generator_init": key["generator_init_id"], "lora": _lora_key(cfg)}
    rows = {  # row: (role, model identity, items, nfe, CFG, seeds, many-step sampler)
        "teacher_32nfe_cfg": (roles.reference, teacher, words, s.nfe, s.cfg, ref_seeds, True),
        "teacher_4nfe": (roles.reference, teacher, words, k, 1.0, seeds, False),
        "tdm_4nfe": (roles.generator_ema, start, words, k, 1.0, seeds, False),
    }
    if train_words is not None:
        rows["tdm_4nfe_train"] = (roles.generator_ema, start, train_words, k, 1.0, train_seeds, False)
    cache, results = baseline_cache_dir(cfg), {}
    for name, (role, model, items, nfe, guidance, n_seeds, many) in rows.items():
        sampler = [nfe, guidance, s.shift, s.solver] if many else [nfe, guidance, cfg.tdm.shift, "euler"]
        row_key = model | {"items": [len(items), _words_id(items)], "sampler": sampler, "seeds": n_seeds}
        row_key |= _measured_with(cfg)

        def compute(role=role, items=items, nfe=nfe, guidance=guidance, n_seeds=n_seeds, many=many) -> dict:
            return evaluate_role(role, world, cfg, items, nfe, guidance, state, dist, n_seeds, many_step=many)[0]

        results[name] = _shared_row(cache, row_key, dist, compute)
    if dist.is_main:
        path.write_text(json.dumps({"key": key, "results": results}, indent=2) + "\n")
    return results


def _lora_key(cfg: Config) -> list | None:
    """How a lora-mode starting adapter is applied (its rank, scale and targets change the generator it makes)."""
    r = cfg.roles
    return [r.lora_rank, r.lora_alpha, r.lora_targets] if r.mode == "lora" and r.generator_init else None
