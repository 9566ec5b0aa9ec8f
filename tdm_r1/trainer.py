"""`tdm-r1 train`: the TDM-R1 epoch (DESIGN section 5), top to bottom.

rollout (grouped, deterministic K-step) -> rewards (non-differentiable, off the training thread) ->
group advantages -> per stored micro-batch and M drawn step indices: fake score -> surrogate reward
(group preference loss with PPO and reference gates) -> generator (KL + CFG-as-reward + learned reward)
-> one optimizer step per role per epoch -> generator EMA, slow surrogate -> log / eval / checkpoint.

The surrogate is a denoiser whose likelihood ratio to the reference is the learned reward: no reward
head, no reward gradient. No denoising loss ever touches the generator (except in the `direct_rl`
ablation, which exists to show why).
"""

from __future__ import annotations

import math

import torch

from tdm_r1.advantages import group_advantages
from tdm_r1.config import Config, TDMConfig, TrainConfig
from tdm_r1.distributed import LOCAL, Dist, Split
from tdm_r1.evaluate import (
    baseline_evals,
    build_train_scorer,
    eval_metric,
    eval_seeds,
    evaluate_role,
    label_samples,
)
from tdm_r1.optim import build_optimizers, optimizer_step, update_shadow
from tdm_r1.report import paired_gain
from tdm_r1.rewards.base import RewardFailureError
from tdm_r1.rewards.scorer import RewardScorer
from tdm_r1.roles import Roles
from tdm_r1.sampling import Trajectory, rollout
from tdm_r1.updates import (
    Batch,
    draw_surrogate_step,
    fake_score_backward,
    fill_samples,
    generator_backward,
    surrogate_backward,
)
from tdm_r1.worlds.stream import PromptStream

# Config keys that may change between a run and its resumption (how long it runs and what it writes).
RESUMABLE_CHANGES = (
    "run_dir",
    "threads",
    "train.epochs",
    "train.eval_every",
    "train.eval_baselines",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.tensorboard",
    "train.max_reward_failure",
    "eval.",
    "reward.threads",
    "distributed.",
)


# -- 1. rollout + 2. rewards ----------------------------------------------------------------------------


def rollout_phase(
    roles: Roles,
    world,
    stream: PromptStream,
    scorer: RewardScorer,
    tc: TrainConfig,
    tdm: TDMConfig,
    gen: torch.Generator,
    split: Split | None = None,
) -> Batch:
    """P prompts x G samples through the generator's K-step sampler; rewards scored chunk by chunk. With `split`,
    this rank rolls out its rows of each micro-batch; the prompts and noise are drawn for all of them."""
    n = tc.prompts_per_epoch * tc.group_size
    split = split or Split(n, tc.micro_batch_groups * tc.group_size, tc.group_size)
    words = stream.next(tc.prompts_per_epoch)
    words_rep = split.take_list([w for w in words for _ in range(tc.group_size)])
    prompts = [world.prompt(w) for w in words_rep]
    group_ids = split.take(torch.arange(len(words)).repeat_interleave(tc.group_size))
    cond = roles.generator.encode_prompts(prompts)
    device = next(iter(cond.fields.values())).device
    noise = split.take(torch.randn((n, *roles.generator.latent_shape(world.height, world.width)), generator=gen))
    noise = noise.to(device)
    trajs, futures = [], []
    for sl, _ in split.micro_batches():
        t = rollout(roles.generator, cond[sl], noise[sl], steps=tdm.steps, shift=tdm.shift, eta=tc.eta, generator=gen)
        trajs.append(t)
        futures.append(scorer.submit(roles.generator.decode(t.sample), prompts[sl]))
    traj = Trajectory(torch.cat([t.xs for t in trajs], 1), trajs[0].s, torch.cat([t.v for t in trajs], 1))
    rewards = torch.cat([f.result() for f in futures])
    return Batch(words_rep, prompts, cond, traj, group_ids, rewards, torch.zeros_like(rewards), split=split)


# -- 3. advantages --------------------------------------------------------------------------------------


def advantage_phase(batch: Batch, tc: TrainConfig, dist: Dist = LOCAL) -> dict[str, float]:
    """Group advantages over the whole epoch: every rank gathers all rewards, so its advantages are exactly the
    single-process ones."""
    rewards = dist.gather_rows(batch.rewards, batch.split)
    failed = int(torch.isnan(rewards).sum())
    rate = failed / rewards.numel()
    if rate > tc.max_reward_failure:
        raise RewardFailureError(
            f"{failed} of {rewards.numel()} samples could not be scored ({rate:.0%} > "
            f"train.max_reward_failure={tc.max_reward_failure:.0%})"
        )
    adv = group_advantages(rewards, dist.gather_rows(batch.group_ids, batch.split), tc.adv_eps, tc.adv_clip)
    batch.adv = batch.split.take(adv)
    ok = ~torch.isnan(rewards)
    r = rewards[ok]
    return {
        "reward_mean": float(r.mean()) if ok.any() else math.nan,
        "reward_std": float(r.std(unbiased=False)) if ok.sum() > 1 else 0.0,
        "reward_exact": float((r == 1.0).float().mean()) if ok.any() else math.nan,
        "reward_failed": failed,
        "adv_abs_mean": float(adv.abs().mean()),
    }


# -- 4. the update loop over stored micro-batches -------------------------------------------------------


def draw_steps(k_steps: int, m: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, k_steps, (m,), generator=gen).tolist()


def micro_batches(batch: Batch) -> list[Batch]:
    """Whole prompt groups per global micro-batch, so each group's preference score is complete (its partial sums
    are all-reduced when the micro-batch spans ranks)."""
    return [batch.select(rows, shard) for rows, shard in batch.split.micro_batches()]


def update_phase(
    roles: Roles,
    opts: dict,
    batch: Batch,
    tc: TrainConfig,
    tdm: TDMConfig,
    cfg: Config,
    epoch: int,
    gen: torch.Generator,
    dist: Dist = LOCAL,
) -> dict[str, float]:
    """fake -> surrogate -> generator for every micro-batch and M drawn steps; gradients accumulate
    into `tc.optimizer_steps_per_epoch` optimizer steps per role. Returns means over all ranks' samples."""

    mbs = micro_batches(batch)
    n_steps = max(1, min(tc.optimizer_steps_per_epoch, len(mbs)))
    bounds = [round(i * len(mbs) / n_steps) for i in range(n_steps + 1)]
    sums: dict[str, float] = {}
    count = 0
    slow_decay = min(tc.slow_decay_max, tc.slow_decay_base + tc.slow_decay_rate * epoch)
    for step in range(n_steps):
        chunk = mbs[bounds[step] : bounds[step + 1]]
        scale = 1.0 / (len(chunk) * tdm.steps_per_batch)
        for mb in chunk:
            for j in draw_steps(tdm.steps, tdm.steps_per_batch, gen):
                if step > 0:  # the generator moved since the rollout: its stored output is stale
                    with torch.no_grad():
                        mb.traj.v[j] = roles.generator.velocity(
                            mb.traj.xs[j], fill_samples(float(mb.traj.s[j]), mb.traj.xs[j]), mb.cond
                        )
                parts = fake_score_backward(roles.fake, roles.reference, mb.cond, mb.traj, j, tdm, gen, scale, mb.shard)
                k = draw_surrogate_step(tdm.steps, gen)
                parts |= surrogate_backward(roles, mb, k, tc, tdm, gen, scale, dist)
                parts |= generator_backward(roles, mb, j, tc, tdm, gen, scale)
                for key, v in parts.items():
                    sums[key] = sums.get(key, 0.0) + v
                count += 1
        trainable = roles.trainable()
        for role in ("fake", "surrogate", "generator"):
            norm = optimizer_step(opts[role], trainable[role], cfg.optim.grad_clip)
            sums[f"grad_norm_{role}"] = sums.get(f"grad_norm_{role}", 0.0) + norm * count / n_steps
        update_shadow(roles, "generator_ema", cfg.optim.generator_ema_decay)
        update_shadow(roles, "slow_surrogate", slow_decay)
    out = dist.mean_metrics({k: v / count for k, v in sums.items()})
    out["slow_decay"] = slow_decay
    return out


# -- the run: setup, epochs, checkpoints, export, report ------------------------------------------------


def _save_state(cfg: Config, progress, roles: Roles, opts: dict, teacher_sha: str, dist: Dist = LOCAL):
    """One training state: a file, or in a distributed run a directory of per-rank files (collective)."""
    from tdm_r1 import checkpoint as ckpt
    from tdm_r1.checkpoint.resume import capture_state
    from tdm_r1.config import to_dict

    info = {"command": "train", "config": to_dict(cfg), "teacher_sha256": teacher_sha, "epoch": progress.step}
    if dist.deepspeed:
        from tdm_r1.distributed.engines import save_state

        state = {"step": progress.step, "data": progress.stream.state()}
        state["rng"] = ckpt.rng_state({"train": progress.gen}, {})
        path = save_state(ckpt.sharded_state_path(cfg.run_dir, progress.step), dist, roles, opts, state, info)
    else:
        path = ckpt.state_path(cfg.run_dir, progress.step)
        ckpt.save_train_state(path, capture_state(progress, roles, opts), info)
    if dist.is_main:
        ckpt.prune_train_states(cfg.run_dir, cfg.train.keep_checkpoints)
    return path


def _resume(path, cfg: Config, progress, roles: Roles, opts: dict, teacher_sha: str, dist: Dist) -> None:
    from tdm_r1 import checkpoint as ckpt
    from tdm_r1.checkpoint.resume import check_resume_info, load_resume, restore_progress

    if ckpt.is_sharded(path) != dist.deepspeed:
        raise ckpt.CheckpointError(
            f"{path} was written by a {'distributed' if ckpt.is_sharded(path) else 'single-process'} run; resume it "
            "the same way (a distributed state on as many ranks), or `tdm-r1 export` a role from it"
        )
    if not dist.deepspeed:
        load_resume(path, cfg, progress, roles, opts, teacher_sha, command="train", resumable=RESUMABLE_CHANGES)
        return
    from tdm_r1.distributed.engines import load_state

    state, info = load_state(path, dist, roles, opts)
    check_resume_info(path, info, cfg, teacher_sha, "train", RESUMABLE_CHANGES)
    restore_progress(state, progress)


def logged_seconds(path) -> float:
    """Seconds of the epochs in a run's metrics.jsonl (rollout + update + eval phases of each record)."""
    import json
    from pathlib import Path

    if not Path(path).is_file():
        return 0.0
    records = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return sum(r.get(k, 0.0) for r in records for k in ("sec_rollout_reward", "sec_update", "sec_eval"))


def _export_generator(cfg: Config, roles: Roles, teacher, epoch: int, minutes: float, dist: Dist = LOCAL):
    """generator.safetensors from the EMA generator (gathered first when partitioned: collective)."""
    from pathlib import Path

    from tdm_r1 import checkpoint as ckpt
    from tdm_r1.build import is_diffusers
    from tdm_r1.consolidate import role_weights

    info = {
        "kind": "tdm_r1",
        "epoch": epoch,
        "nfe": cfg.tdm.steps,
        "shift": cfg.tdm.shift,
        "minutes": minutes,
        "teacher": cfg.roles.teacher,
        "generator_init": cfg.roles.generator_init,
    }
    if is_diffusers(cfg):
        return _export_pipeline(cfg, roles, dist)
    out = Path(cfg.run_dir) / "generator.safetensors"
    weights = role_weights(roles, "generator_ema", teacher, cfg.roles)
    if dist.is_main:
        ckpt.save_model(out, weights, cfg.model, cfg.world, **info)
    return out


def _export_pipeline(cfg: Config, roles: Roles, dist: Dist = LOCAL):
    """<run_dir>/pipeline: the EMA generator as a diffusers pipeline folder (LoRA merged; the unchanged text encoders,
    tokenizers and VAE symlinked to diffusers.path: `tdm-r1 export` writes a standalone copy). Collective when the
    roles are partitioned (each tensor is gathered in turn)."""
    from pathlib import Path

    from tdm_r1.consolidate import role_tensors
    from tdm_r1.models.export import export_diffusers_pipeline

    tensors = role_tensors(roles, "generator_ema")
    out = Path(cfg.run_dir) / "pipeline"
    if dist.is_main:
        base = roles.host.model if roles.host is not None else roles.reference.module
        export_diffusers_pipeline(
            base,
            tensors,
            out,
            merge_lora=True,
            lora_alpha=cfg.roles.lora_alpha,
            steps=cfg.tdm.steps,
            shift=cfg.tdm.shift,
            overwrite=True,
            link_unchanged=True,
        )
    return out


# What a run writes into run_dir (baselines.json is a cache keyed by what it measured and stays).
RUN_OUTPUTS = (
    "metrics.jsonl",
    "summary.json",
    "report.md",
    "reward_curve.png",
    "samples_start.png",
    "samples_end.png",
    "samples_start.safetensors",
    "samples_start_end.png",
    "generator.safetensors",
    "pipeline",
    "checkpoints",
    "tensorboard",
    "config.yaml",
)


def archive_previous_run(run) -> object:
    """A fresh (not resumed) run in a directory that holds an earlier run's outputs: move them into
    run_dir/previous_<n>/ so nothing written is lost and the new metrics, curve and checkpoints are not mixed with
    the old ones. Returns the archive directory, or None when there was nothing to move."""
    from pathlib import Path

    run = Path(run)
    found = [run / name for name in RUN_OUTPUTS if (run / name).exists()]
    if not any(p.name in ("metrics.jsonl", "checkpoints") for p in found):
        return None
    n = 1
    while (run / f"previous_{n}").exists():
        n += 1
    dest = run / f"previous_{n}"
    dest.mkdir()
    for p in found:
        p.rename(dest / p.name)
    return dest


def train(cfg: Config, resume: str | None = None) -> dict:
    """Run TDM-R1; returns the summary written to <run_dir>/summary.json. Under `deepspeed` / `torchrun` every rank
    runs this with its share of each epoch's samples; rank 0 writes the run directory."""
    import json
    import time
    from pathlib import Path

    from tqdm import tqdm

    from tdm_r1 import distributed
    from tdm_r1.build import build_run_world, is_diffusers, load_run_generator_init, load_run_teacher, teacher_id
    from tdm_r1.checkpoint.resume import Progress, resolve_resume, truncate_log
    from tdm_r1.config import save_config
    from tdm_r1.distributed.engines import wrap_roles
    from tdm_r1.evaluate import eval_words
    from tdm_r1.report import RunReporter
    from tdm_r1.roles import build_roles

    tc, run = cfg.train, Path(cfg.run_dir)
    prior_seconds = 0.0  # the epochs of earlier processes of a resumed run (summary "minutes" counts every epoch)
    eval_seeds(cfg)  # a bad eval field fails now, not after the epochs
    dist = distributed.init(cfg.distributed, cfg.optim)
    split = distributed.epoch_split(tc, dist, cfg.distributed.micro_batch_per_gpu)
    torch.manual_seed(cfg.seed)
    world = build_run_world(cfg, need_text=any(r.name == "ocr" for r in tc.rewards))
    teacher = load_run_teacher(cfg)
    teacher_sha = teacher_id(cfg)
    generator_init = load_run_generator_init(cfg, teacher)
    roles = build_roles(
        cfg.roles,
        teacher,
        surrogate=True,
        fake=True,
        generator_init=generator_init,
        place=dist.place,
        fake_init=load_run_generator_init(cfg, teacher, field="fake_init"),
    )
    if is_diffusers(cfg):  # every role holds its own copy (or the shared base); export reads only the folder
        teacher = generator_init = None
    opts = wrap_roles(roles, cfg.optim, dist) if dist.deepspeed else build_optimizers(roles, cfg.optim)
    progress = Progress(0, PromptStream(world.words("train"), cfg.seed), torch.Generator().manual_seed(cfg.seed))
    if resume is not None:
        path = resolve_resume(resume, run)
        _resume(path, cfg, progress, roles, opts, teacher_sha, dist)
        if dist.is_main:
            truncate_log(run / "metrics.jsonl", progress.step, key="epoch")
            prior_seconds = logged_seconds(run / "metrics.jsonl")
        dist.print(f"train: resumed from {path} at epoch {progress.step}")
    elif dist.is_main and (moved := archive_previous_run(run)) is not None:
        dist.print(f"train: {run} held an earlier run; its files were moved to {moved}")
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    scorer = build_train_scorer(cfg, world)
    heldout = eval_words(world, "heldout", cfg.eval.n_train, cfg.eval.seed)
    train_words = eval_words(world, "train", cfg.eval.n_train, cfg.eval.seed) if cfg.eval.train_rows else None
    # diffusers runs evaluate with the train rewards: the scorer's models serve both (one copy of e.g. PickScore)
    eval_state: dict = {"reward": scorer} if is_diffusers(cfg) else {}
    reporter = RunReporter(run, tensorboard=tc.tensorboard) if dist.is_main else None
    baselines = baseline_evals(cfg, roles, world, heldout, eval_state, dist, train_words) if tc.eval_baselines else {}
    if progress.step == 0:  # the start grid: the same samples as the starting generator's first eval seed
        from tdm_r1.evaluate import generate

        images = generate(
            roles.generator_ema, world, heldout, cfg.tdm.steps, 1.0, cfg.tdm.shift, cfg.eval.seed, cfg.eval.batch_size
        )
        if reporter is not None:
            reporter.keep_start(images, heldout)
    n_train = {k: sum(getattr(p, "ds_numel", p.numel()) for p in v) for k, v in roles.trainable().items()}
    dist.print(
        f"train: {cfg.roles.mode} roles, trainable {n_train}, {tc.epochs} epochs of "
        f"{tc.prompts_per_epoch}x{tc.group_size} samples on {dist.world} rank(s) -> {run}"
    )
    t_start = time.time()
    bar = tqdm(range(progress.step + 1, tc.epochs + 1), desc="train", dynamic_ncols=True, disable=not dist.is_main)
    try:
        for epoch in bar:
            rec: dict = {"epoch": epoch}
            t0 = time.time()
            dist.check_same(progress.gen.get_state(), "the shared random stream")
            batch = rollout_phase(roles, world, progress.stream, scorer, tc, cfg.tdm, progress.gen, split)
            t1 = time.time()
            try:
                rec |= advantage_phase(batch, tc, dist)
            except RewardFailureError as e:
                path = _save_state(cfg, progress, roles, opts, teacher_sha, dist)
                raise RewardFailureError(f"epoch {epoch}: {e}; state saved at {path} (resume with --resume)") from e
            rec |= update_phase(roles, opts, batch, tc, cfg.tdm, cfg, epoch, progress.gen, dist)
            t2 = time.time()
            progress.step = epoch
            if tc.eval_every > 0 and epoch % tc.eval_every == 0 and epoch != tc.epochs:
                ev, _ = evaluate_role(roles.generator_ema, world, cfg, heldout, cfg.tdm.steps, 1.0, eval_state, dist)
                m = eval_metric(cfg)
                rec |= {f"heldout_{m}_mean": ev[f"{m}_mean"], f"heldout_{m}_exact": ev[f"{m}_exact"]}
            rec |= {
                "sec_rollout_reward": round(t1 - t0, 2),
                "sec_update": round(t2 - t1, 2),
                "sec_eval": round(time.time() - t2, 2),
            }
            if reporter is not None:
                reporter.log(rec, step=epoch)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", gen=f"{rec['loss_gen']:.3f}")
            if (tc.checkpoint_every > 0 and epoch % tc.checkpoint_every == 0) or epoch == tc.epochs:
                _save_state(cfg, progress, roles, opts, teacher_sha, dist)
    finally:
        scorer.close()
    minutes = round((dist.broadcast_object(prior_seconds) + time.time() - t_start) / 60, 2)
    generator = _export_generator(cfg, roles, teacher, progress.step, minutes, dist)
    final, images = evaluate_role(
        roles.generator_ema, world, cfg, heldout, cfg.tdm.steps, 1.0, eval_state, dist, eval_seeds(cfg)[0]
    )
    m = eval_metric(cfg)
    rows = {"tdm_r1_4nfe": final}
    if train_words is not None:
        rows["tdm_r1_4nfe_train"] = evaluate_role(
            roles.generator_ema, world, cfg, train_words, cfg.tdm.steps, 1.0, eval_state, dist, eval_seeds(cfg)[2]
        )[0]
    for suffix in ("", "_train"):
        if f"tdm_4nfe{suffix}" in baselines and f"tdm_r1_4nfe{suffix}" in rows:
            rows[f"gain_4nfe{suffix}"] = paired_gain(baselines[f"tdm_4nfe{suffix}"], rows[f"tdm_r1_4nfe{suffix}"], m)
    summary = {
        **baselines,
        **rows,
        "minutes": minutes,
        "checkpoint": str(generator),
        "epochs": progress.step,
    }
    if reporter is not None:
        label_samples(reporter, images, heldout, cfg, world, eval_state)
        (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        reporter.finish(summary)
    dist.print(f"train: wrote {generator} after {minutes:.1f} min; held-out {m}_mean {final[f'{m}_mean']:.3f}")
    return summary
