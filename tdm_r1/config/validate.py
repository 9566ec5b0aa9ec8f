"""Range checks of a config's values, run before a command touches any file: each error names the dotted key, its
value and the allowed range. Types are the loader's job (`load.py`); what depends on files (word lists, checkpoints,
reward names) is checked where they are read, also before the run directory is touched."""

from __future__ import annotations

import math
from collections.abc import Callable

from tdm_r1.config.schema import Config, ConfigError

Rule = tuple[str, Callable[[float], bool], str]


def _at_least(key: str, low: float) -> Rule:
    return key, lambda v: v >= low, f">= {low}"


def _in(key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    def ok(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return key, ok, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _positive(key: str) -> Rule:
    return key, lambda v: v > 0, "> 0"


COMMON: list[Rule] = [
    _at_least("seed", 0),
    _at_least("threads", 0),
    _at_least("eval.train_subset", 1),
    _at_least("eval.batch_size", 1),
    _at_least("eval.seeds", 1),
    _at_least("eval.grid_rows", 1),
    _at_least("eval.grid_cols", 1),
    _at_least("sample.nfe", 1),
    _at_least("sample.cfg", 0),
    _positive("sample.shift"),
]
TDM: list[Rule] = [
    _at_least("tdm.steps", 1),
    _positive("tdm.shift"),
    _at_least("tdm.steps_per_batch", 1),
    _in("tdm.tau_margin", 0.0, 1.0, high_open=True),
    _at_least("tdm.fake_reg", 0),
    _at_least("tdm.cfg", 0),
    _in("tdm.w_tdm", 0.0, 1.0),
    _at_least("tdm.trunc_steps", 0),
    _at_least("tdm.rl_cfg", 0),
    _positive("tdm.normaliser_eps"),
    _at_least("optim.weight_decay", 0),
    _at_least("optim.grad_clip", 0),
    _at_least("optim.generator_lr", 0),
    _at_least("optim.fake_lr", 0),
    _in("optim.generator_ema_decay", 0.0, 1.0),
]
RULES: dict[str, list[Rule]] = {
    "pretrain": [
        _at_least("pretrain.steps", 1),
        _at_least("pretrain.batch_size", 1),
        _at_least("pretrain.lr", 0),
        _at_least("pretrain.warmup_steps", 0),
        ("pretrain.final_lr", lambda v: v is None or v >= 0, "null or >= 0"),
        _at_least("pretrain.weight_decay", 0),
        _at_least("pretrain.grad_clip", 0),
        _in("pretrain.ema_decay", 0.0, 1.0, high_open=True),
        _in("pretrain.cond_drop_prob", 0.0, 1.0),
        _positive("pretrain.logit_normal_std"),
        _at_least("pretrain.log_every", 1),
        _at_least("pretrain.save_every", 0),
    ],
    "distill": TDM
    + [
        _at_least("distill.steps", 1),
        _at_least("distill.batch_size", 1),
        _at_least("distill.fake_updates", 1),
        _at_least("distill.log_every", 1),
        _at_least("distill.eval_every", 0),
        _at_least("distill.checkpoint_every", 0),
        _at_least("distill.keep_checkpoints", 0),
    ],
    "train": TDM
    + [
        _at_least("train.epochs", 1),
        _at_least("train.prompts_per_epoch", 1),
        _at_least("train.group_size", 2),  # one sample per group has no advantage to learn from
        _at_least("train.micro_batch_groups", 1),
        _at_least("train.optimizer_steps_per_epoch", 1),
        _in("train.max_reward_failure", 0.0, 1.0),
        _positive("train.adv_eps"),  # 0 divides by a zero std when an epoch's rewards are all equal
        _positive("train.adv_clip"),
        _positive("train.beta_dpo"),
        _positive("train.ppo_clip"),
        _in("train.ref_gate_threshold", 0.0, math.inf),
        _at_least("train.surrogate_beta", 0),
        _in("train.t_min_surrogate", 0.0, 1.0, high_open=True),
        _in("train.t_min_generator", 0.0, 1.0, high_open=True),
        _in("train.eta", 0.0, 1.0),
        _in("train.slow_decay_base", 0.0, 1.0),
        _at_least("train.slow_decay_rate", 0),
        _in("train.slow_decay_max", 0.0, 1.0),
        _at_least("train.eval_every", 0),
        _at_least("train.checkpoint_every", 0),
        _at_least("train.keep_checkpoints", 0),
        _at_least("optim.surrogate_lr", 0),
    ],
}


def _value(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config, command: str) -> None:
    """Every range `command` depends on (a ConfigError naming the first key out of range)."""
    for key, ok, allowed in COMMON + RULES.get(command, []):
        value = _value(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key} = {value!r} is out of range: it must be {allowed}")
    if command == "train":
        tc = cfg.train
        if not cfg.train.rewards:
            raise ConfigError("train.rewards is empty: a run needs at least one reward")
        for i, term in enumerate(tc.rewards):
            if not math.isfinite(term.weight):
                raise ConfigError(f"train.rewards[{i}] ({term.name}).weight = {term.weight!r} must be finite")
        if len(tc.gold) > 1:
            raise ConfigError(f"train.gold holds at most one reward, got {len(tc.gold)}")
        for term in tc.gold:
            trained = [t for t in tc.rewards if (t.name, t.options, t.path) == (term.name, term.options, term.path)]
            if trained:
                raise ConfigError(f"train.gold ({term.name}) is also in train.rewards: gold must be a reward the run "
                                  "never trains on")  # fmt: skip
