"""`tdm-r1 train`: TDM-R1 (DESIGN section 5), top to bottom.

Build the run (world, teacher, roles, optimizers; `tdm_r1.run`), open its directory (resume, or archive an earlier
run), evaluate the baselines, then per epoch the phases of `tdm_r1.phases` (rollout -> rewards -> advantages ->
fake score / surrogate / generator updates), logging, periodic evaluation and training states; at the end the EMA
generator is exported, evaluated at several seeds against the starting generator, and reported.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tdm_r1.checkpoint.export import export_generator
from tdm_r1.checkpoint.resume import read_log, resume_from, resume_run_state, save_run_state, truncate_log
from tdm_r1.commands.common import add_config_args, add_resume_arg, config_from_teacher, setup_threads
from tdm_r1.config import Config, ConfigError, save_config
from tdm_r1.evaluate import (
    baseline_evals,
    eval_items,
    eval_metric,
    eval_seeds,
    evaluate_role,
    evaluates_with_train_rewards,
    generate,
    label_samples,
)
from tdm_r1.phases import train_epoch
from tdm_r1.report import RunReporter, paired_gain
from tdm_r1.rewards.base import RewardFailureError
from tdm_r1.rewards.scorer import RewardScorer, build_scorer
from tdm_r1.run import (
    Run,
    RunStopped,
    StopRequests,
    build_run,
    logged_seconds,
    open_run_dir,
    run_dir_lock,
    trainable_counts,
)

DESCRIPTION = (
    "The TDM-R1 epoch: grouped rollouts, rewards, group advantages, then fake score, surrogate reward (group "
    "preference) and generator updates. Writes config.yaml, metrics.jsonl, tensorboard/, training-state checkpoints, "
    "generator.safetensors (EMA generator, loadable by `tdm-r1 eval`; for a diffusers model pipeline/, a diffusers "
    "folder), summary.json, report.md, reward_curve.png and same-seed sample grids into run_dir."
)


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="TDM-R1: improve a few-step generator with a non-differentiable reward", description=DESCRIPTION
    )
    add_config_args(p, required=True)
    add_resume_arg(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_teacher(args)
    if cfg.diffusers.random_init:
        raise ConfigError("diffusers.random_init builds untrained weights for `tdm-r1 bench`; train needs real ones")
    setup_threads(cfg)
    train(cfg, resume=args.resume)
    return 0


@dataclass
class Evals:
    """What a run evaluates on and with: held-out items (and optionally train items), the evaluation reward's state,
    the reporter (rank 0) and the baselines."""

    heldout: list[str]
    train_items: list[str] | None
    state: dict
    reporter: RunReporter | None
    baselines: dict = field(default_factory=dict)
    gold: Gold | None = None
    last_train_reward: float = math.nan  # the last epoch's reward_mean (the final evaluation's gold point)


@dataclass
class Gold:
    """train.gold: a reward the run never trains on, scored on every evaluation's held-out samples."""

    reward: object
    name: str
    best: float = -math.inf
    best_epoch: int = -1
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (epoch, train reward, gold)
    warnings: list[int] = field(default_factory=list)


def hacking_suspected(history: list[tuple[int, float, float]]) -> bool:
    """The training reward rose while gold fell over each of the last two evaluation intervals."""
    if len(history) < 3:
        return False
    (_, r0, g0), (_, r1, g1), (_, r2, g2) = history[-3:]
    return r1 > r0 and r2 > r1 and g1 < g0 and g2 < g1


def gold_check(run: Run, ev: Evals, images, epoch: int, train_reward: float) -> dict:
    """Score the evaluation's held-out samples with the gold reward (rank 0; shared), keep the generator when it is
    the best so far, and warn when the training reward rises while gold falls. Collective."""
    gold, dist, world = ev.gold, run.dist, run.world
    score = None
    if dist.is_main:
        from tdm_r1.rewards.base import score_images

        n = images.shape[0]
        items = ev.heldout[:n]
        scores = score_images(gold.reward, images, [world.prompt(w) for w in items], world.targets(items))
        good = scores[torch.isfinite(scores)]
        score = float(good.mean()) if good.numel() else math.nan
    score = dist.broadcast_object(score)
    out = {"heldout_gold_mean": score}
    gold.history.append((epoch, train_reward, score))
    if math.isfinite(score) and score > gold.best:
        gold.best, gold.best_epoch = score, epoch
        export_generator(run.cfg, run.roles, run.teacher, epoch, 0.0, dist, name="generator_best_gold")
        out["gold_best"] = 1
    if hacking_suspected(gold.history):
        gold.warnings.append(epoch)
        out["gold_warning"] = 1
        dist.print(
            f"train: WARNING epoch {epoch}: the training reward rose and gold ({gold.name}) fell for two evaluations "
            f"in a row ({' -> '.join(f'{g:.3f}' for _, _, g in gold.history[-3:])}): the reward may be gamed; the "
            f"best generator by gold (epoch {gold.best_epoch}) is kept"
        )
    return out


def train(cfg: Config, resume: str | None = None) -> dict:
    """Run TDM-R1; returns the summary written to <run_dir>/summary.json. Under `deepspeed` / `torchrun` every rank
    runs this with its share of each epoch's samples; rank 0 writes the run directory."""
    eval_seeds(cfg)  # a bad eval field fails now, not after the epochs
    run = build_run(cfg, "train")  # every value range-checked, the teacher and starting points loaded
    scorer = build_scorer(cfg)  # every reward resolved and built, before any file of the run is touched
    try:
        with run_dir_lock(run.path, holder=run.dist.is_main), run.kernels():
            return train_run(run, scorer, resume)
    finally:
        scorer.close()


def train_run(run: Run, scorer: RewardScorer, resume: str | None) -> dict:
    """The run's epochs, from its state (or `resume`) to train.epochs, then `finish`."""
    from tqdm import tqdm

    cfg, dist, tc = run.cfg, run.dist, run.cfg.train
    prior_seconds = resume_or_start(run, resume)
    ev = start_evals(run, scorer)
    dist.print(
        f"train: {cfg.roles.mode} roles, trainable {trainable_counts(run.roles)}, {tc.epochs} epochs of "
        f"{tc.prompts_per_epoch}x{tc.group_size} samples on {dist.world} rank(s) -> {run.path}"
    )
    t_start = time.time()
    epochs = range(run.progress.step + 1, tc.epochs + 1)
    bar = tqdm(epochs, desc="train", dynamic_ncols=True, disable=not dist.is_main)
    with StopRequests() as stop:
        for epoch in bar:
            rec = run_epoch(run, scorer, ev, epoch)
            if ev.reporter is not None:
                ev.reporter.log(rec, step=epoch)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", gen=f"{rec['loss_gen']:.3f}")
            stopping = stop.requested(dist)
            if (tc.checkpoint_every > 0 and epoch % tc.checkpoint_every == 0) or epoch == tc.epochs or stopping:
                path = save_run_state(cfg, run.progress, run.roles, run.opts, run.teacher_sha, "train", dist)
            if stopping and epoch < tc.epochs:
                raise RunStopped(
                    f"train: stopped by {stop.signal or 'a signal'} after epoch {epoch}; state {path}; "
                    "continue with the same command and --resume"
                )
    scorer.close()  # the end-of-run evaluation scores on this thread
    minutes = round((dist.broadcast_object(prior_seconds) + time.time() - t_start) / 60, 2)
    return finish(run, ev, minutes)


def resume_or_start(run: Run, resume: str | None) -> float:
    """Resume from a training state (returns the seconds the earlier processes logged), or start fresh (an earlier
    run's outputs are archived first); leftovers of interrupted writes are removed; then config.yaml is written."""
    dist, prior_seconds = run.dist, 0.0
    moved = open_run_dir(run.path, fresh=resume is None, command="train") if dist.is_main else None
    if moved is not None:
        dist.print(f"train: {run.path} held an earlier run; its files were moved to {moved}")
    if resume is not None:

        def load(path):
            resume_run_state(path, run.cfg, run.progress, run.roles, run.opts, run.teacher_sha, "train", dist)

        path = resume_from(resume, run.path, load, dist)
        if dist.is_main:
            truncate_log(run.path / "metrics.jsonl", run.progress.step, key="epoch")
            prior_seconds = logged_seconds(run.path / "metrics.jsonl")
        dist.print(f"train: resumed from {path} at epoch {run.progress.step}")
    if dist.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, run.path / "config.yaml")
    return prior_seconds


def start_evals(run: Run, scorer: RewardScorer) -> Evals:
    """The evaluation items, the reporter, the (cached) baselines, and at epoch 0 the start grid: the same samples as
    the starting generator's first eval seed."""
    cfg, world, dist = run.cfg, run.world, run.dist
    heldout = eval_items(world, "heldout", cfg.eval)
    train_items = eval_items(world, "train", cfg.eval) if cfg.eval.train_rows else None
    # runs evaluated with the train rewards share the scorer's models (one copy of e.g. PickScore)
    state: dict = {"reward": scorer} if evaluates_with_train_rewards(cfg) else {}
    reporter = RunReporter(run.path, tensorboard=cfg.train.tensorboard) if dist.is_main else None
    ev = Evals(heldout, train_items, state, reporter)
    if cfg.train.gold:
        from tdm_r1.rewards.base import build_reward

        ev.gold = Gold(build_reward(cfg.train.gold[0]), cfg.train.gold[0].name)
        if run.progress.step > 0:  # resumed: the evaluations logged so far (metrics.jsonl is truncated to the state)
            for r in read_log(run.path / "metrics.jsonl"):
                if "heldout_gold_mean" in r:
                    ev.gold.history.append((r["epoch"], r["reward_mean"], r["heldout_gold_mean"]))
                    if r["heldout_gold_mean"] > ev.gold.best:
                        ev.gold.best, ev.gold.best_epoch = r["heldout_gold_mean"], r["epoch"]
    if cfg.train.eval_baselines:
        ev.baselines = baseline_evals(cfg, run.roles, world, heldout, state, dist, train_items)
    if run.progress.step == 0:
        images = generate(
            run.roles.generator_ema,
            world,
            heldout,
            cfg.tdm.steps,
            1.0,
            cfg.tdm.shift,
            cfg.eval.seed,
            cfg.eval.batch_size,
        )
        if reporter is not None:
            reporter.keep_start(images, heldout)
    return ev


def run_epoch(run: Run, scorer: RewardScorer, ev: Evals, epoch: int) -> dict:
    """One epoch's phases and its metrics record (with a held-out evaluation every train.eval_every epochs). Too many
    unscorable samples stop the run after a training state is saved."""
    cfg, dist, progress, tc = run.cfg, run.dist, run.progress, run.cfg.train
    rec: dict = {"epoch": epoch}
    dist.check_same(progress.gen.get_state(), "the shared random stream")
    start = progress.stream.state(), progress.gen.get_state()  # where this epoch began
    try:
        rec |= train_epoch(run, scorer, epoch)
        ev.last_train_reward = rec["reward_mean"]
    except RewardFailureError as e:
        # nothing was updated yet (advantages come before any optimizer step): the state at the epoch's start, so
        # --resume redoes this epoch with the same prompts and noise
        progress.stream.load(start[0])
        progress.gen.set_state(start[1])
        path = save_run_state(cfg, progress, run.roles, run.opts, run.teacher_sha, "train", dist)
        raise RewardFailureError(f"epoch {epoch}: {e}; state saved at {path} (resume with --resume)") from e
    t2 = time.time()
    progress.step = epoch
    if tc.eval_every > 0 and epoch % tc.eval_every == 0 and epoch != tc.epochs:
        result, images = evaluate_role(
            run.roles.generator_ema, run.world, cfg, ev.heldout, cfg.tdm.steps, 1.0, ev.state, dist
        )
        m = eval_metric(cfg)
        rec |= {f"heldout_{m}_mean": result[f"{m}_mean"], f"heldout_{m}_exact": result[f"{m}_exact"]}
        if ev.gold is not None:
            rec |= gold_check(run, ev, images, epoch, rec["reward_mean"])
    return rec | {"sec_eval": round(time.time() - t2, 2)}


def finish(run: Run, ev: Evals, minutes: float) -> dict:
    """Export the EMA generator, evaluate it (held-out, and train items when asked) at the eval seeds, pair it with
    the starting generator, and write summary.json, the labelled grids and report.md."""
    cfg, dist, roles = run.cfg, run.dist, run.roles
    generator = export_generator(cfg, roles, run.teacher, run.progress.step, minutes, dist)
    seeds, _, train_seeds = eval_seeds(cfg)

    def evaluate(items: list[str], n: int) -> tuple[dict, Tensor]:
        return evaluate_role(roles.generator_ema, run.world, cfg, items, cfg.tdm.steps, 1.0, ev.state, dist, n)

    final, images = evaluate(ev.heldout, seeds)
    if ev.gold is not None:
        final["gold_mean"] = gold_check(run, ev, images, run.progress.step, ev.last_train_reward)["heldout_gold_mean"]
    m = eval_metric(cfg)
    rows = {"tdm_r1_4nfe": final}
    if ev.train_items is not None:
        rows["tdm_r1_4nfe_train"] = evaluate(ev.train_items, train_seeds)[0]
    for suffix in ("", "_train"):
        if f"tdm_4nfe{suffix}" in ev.baselines and f"tdm_r1_4nfe{suffix}" in rows:
            start = ev.baselines[f"tdm_4nfe{suffix}"]
            rows[f"gain_4nfe{suffix}"] = paired_gain(start, rows[f"tdm_r1_4nfe{suffix}"], m)
    summary = {**ev.baselines, **rows, "minutes": minutes, "checkpoint": str(generator), "epochs": run.progress.step}
    if ev.gold is not None:
        g = ev.gold
        history = [{"epoch": e, "train_reward": r, "gold": s} for e, r, s in g.history]
        best = g.best if math.isfinite(g.best) else None
        summary["gold"] = {"reward": g.name, "best": best, "best_epoch": g.best_epoch, "warnings": g.warnings}
        summary["gold"]["history"] = history
    if ev.reporter is not None:
        label_samples(ev.reporter, images, ev.heldout, cfg, run.world, ev.state)
        (run.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        ev.reporter.finish(summary)
    dist.print(f"train: wrote {generator} after {minutes:.1f} min; held-out {m}_mean {final[f'{m}_mean']:.3f}")
    return summary
