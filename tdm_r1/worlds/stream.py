"""The order in which a run visits a world's train items: seeded per-epoch permutations, resumable."""

from __future__ import annotations

import numpy as np


class PromptStream:
    """Train prompts in seeded per-epoch permutations; (epoch, offset) is the data position."""

    def __init__(self, words: list[str], seed: int):
        self.words, self.seed = words, seed
        self.epoch, self.offset = 0, 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.words))

    def next(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            perm = self._perm()
            take = perm[self.offset : self.offset + n - len(out)]
            out += [self.words[i] for i in take]
            self.offset += len(take)
            if self.offset >= len(self.words):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
