"""`human`: people's likes as the reward. Each rollout chunk's images go to the run's label store
(<run_dir>/labels.sqlite, tdm_r1/labels/store.py) where `tdm-r1 label` shows them; the reward waits until `share` of
the chunk is labelled (printing `waiting for labels 123/512` for the epoch) or `timeout_s` passes, and scores each
image by the mean of its labels (1 like, 0 dislike; several labellers average).

After the timeout, an unlabelled image is NaN (`on_timeout: nan`: excluded from the advantages and counted against
train.max_reward_failure, which stops the run after a training state) or the reward keeps waiting (`on_timeout:
wait`, with a warning every timeout_s). Images are stored under content ids (epoch, position, PNG hash): `--resume`
redoes an interrupted epoch with the same images, so the labels given before the crash and while the trainer was down
are found at once.

The trainer tells the reward its run directory and epoch (`begin_epoch`); `store` names another run directory's
store instead (e.g. a labelling server kept apart from the run). On several ranks each rank publishes its own rows.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

from tdm_r1.config import ConfigError, RewardTermConfig
from tdm_r1.rewards.base import reward_options
from tdm_r1.rewards.wire import png_bytes

log = logging.getLogger(__name__)


@dataclass
class HumanOptions:
    share: float = 1.0  # share of each chunk's images that must carry a label before the reward returns
    timeout_s: float = 3600.0  # per chunk
    on_timeout: Literal["nan", "wait"] = "nan"
    poll_s: float = 0.5  # how often the store is read while waiting
    store: str = ""  # a run directory whose labels.sqlite to use ("" = the training run's)


class HumanReward:
    name = "human"

    def __init__(self, opts: HumanOptions):
        if not 0.0 < opts.share <= 1.0:
            raise ConfigError(f"train.rewards[human].options.share must be in (0, 1], got {opts.share}")
        if opts.timeout_s <= 0 or opts.poll_s <= 0:
            raise ConfigError("train.rewards[human].options: timeout_s and poll_s must be > 0")
        self.opts = opts
        self.store = None
        self.epoch = 0
        self.position = 0
        self.waited_s = 0.0
        self.timeouts = 0

    def begin_epoch(self, epoch: int, run_dir) -> None:
        """Called by the trainer before each epoch's rollout: where the store is and which epoch the images are."""
        from tdm_r1.labels.store import LabelStore

        if self.store is None:
            self.store = LabelStore.of_run(self.opts.store or run_dir)
        self.epoch, self.position = epoch, 0

    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        if self.store is None:
            raise RuntimeError("the human reward scores rollouts of a training run only (no label store is bound)")
        pngs = [png_bytes(x) for x in images]
        ids = self.store.publish(self.epoch, self.position, pngs, prompts, prompts)
        self.position += len(ids)
        needed = math.ceil(self.opts.share * len(ids))
        epoch_needed = math.ceil(self.opts.share * self.position)
        self.store.set_state(status="waiting", epoch=self.epoch, needed=epoch_needed)
        t0 = last_line = time.monotonic()
        deadline = t0 + self.opts.timeout_s
        while True:
            means = self.store.means(ids)
            if len(means) >= needed:
                break
            now = time.monotonic()
            if now - last_line >= 5.0 or now == t0:
                done, _ = self.store.progress(self.epoch)
                print(f"waiting for labels {done}/{epoch_needed} (epoch {self.epoch})", file=sys.stderr, flush=True)
                last_line = now
            if now >= deadline:
                self.timeouts += 1
                if self.opts.on_timeout == "nan":
                    log.warning("human: %d of %d images unlabelled after %.0f s: NaN", len(ids) - len(means),
                                len(ids), self.opts.timeout_s)  # fmt: skip
                    break
                log.warning("human: still waiting for %d labels (%.0f s)", needed - len(means), now - t0)
                deadline = now + self.opts.timeout_s
            time.sleep(self.opts.poll_s)
        self.waited_s += time.monotonic() - t0
        self.store.set_state(status="training", epoch=self.epoch, needed=epoch_needed)
        return torch.tensor([means.get(i, math.nan) for i in ids], dtype=torch.float32)

    def take_stats(self) -> dict[str, float]:
        """Seconds spent waiting for labels and chunks that timed out, since the last call."""
        out = {"wait_s": round(self.waited_s, 2), "timeouts": self.timeouts}
        self.waited_s, self.timeouts = 0.0, 0
        return out


def build_human(term: RewardTermConfig) -> HumanReward:
    return HumanReward(reward_options(term, HumanOptions))
