"""The FlowModel protocol every model provides, and the `Cond` container for encoded prompts.

Rectified-flow convention: x_s = (1 - s) x0 + s eps, s in [0, 1], velocity v = eps - x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class Cond:
    """Encoded prompts: every tensor in `fields` is batch-first [B, ...]; `null` holds the empty
    prompt's encoding with batch 1, so `uncond()` needs no second encoder call."""

    fields: dict[str, Tensor]
    null: dict[str, Tensor]

    def __len__(self) -> int:
        return next(iter(self.fields.values())).shape[0]

    def uncond(self) -> Cond:
        n = len(self)
        return Cond({k: v.expand(n, *v.shape[1:]).contiguous() for k, v in self.null.items()}, self.null)

    def __getitem__(self, idx) -> Cond:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Cond({k: v[idx] for k, v in self.fields.items()}, self.null)

    def to(self, device: torch.device | str) -> Cond:
        return Cond({k: v.to(device) for k, v in self.fields.items()}, {k: v.to(device) for k, v in self.null.items()})

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        keys = conds[0].fields.keys()
        return Cond({k: torch.cat([c.fields[k] for c in conds]) for k in keys}, conds[0].null)


class FlowModel(Protocol):
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Encode prompts (each unique prompt once)."""

    def velocity(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        """Rectified-flow velocity at x [B, ...], s [B]; output in the model's own dtype."""

    def decode(self, x0: Tensor) -> Tensor:
        """Latents (or pixels) -> images [B, 3, H, W] in [0, 1]."""

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latent for an image of height x width."""
