"""Tiny pixel-space DiT with a character-level prompt encoder (the embedded default model).

Prompt characters become tokens; a small transformer encodes them, and the DiT attends jointly over
[text tokens; image patches] (in-context conditioning, as in MMDiT), modulated by the timestep through
adaLN-single (one shared projection plus a learned per-block table, as in PixArt-alpha). Prompt
dropout during training makes the empty prompt a valid unconditional input for CFG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdm_r1.config import ModelConfig, WorldConfig
from tdm_r1.models.base import Cond

PAD, BOS = 0, 1
FIRST_CHAR = 32  # printable ASCII 32..126 -> token ids 2..96
VOCAB = 2 + 95


def tokenize(prompts: list[str], text_len: int) -> Tensor:
    """Character tokens [B, text_len + 1]: BOS, then one id per character, then PAD."""
    out = torch.full((len(prompts), text_len + 1), PAD, dtype=torch.long)
    out[:, 0] = BOS
    for i, p in enumerate(prompts):
        if len(p) > text_len:
            raise ValueError(f"prompt {p!r} has {len(p)} characters; the model reads at most model.text_len={text_len}")
        ids = [ord(c) - FIRST_CHAR + 2 for c in p]
        if any(not 2 <= t < VOCAB for t in ids):
            raise ValueError(f"prompt {p!r} has characters outside printable ASCII")
        out[i, 1 : 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def timestep_embedding(s: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of s * 1000, [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
    args = (s.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, ratio)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, ratio)
        self.table = nn.Parameter(torch.randn(6, dim) / math.sqrt(dim))

    def forward(self, x: Tensor, t6: Tensor, mask: Tensor) -> Tensor:
        # t6 [B, 6, dim]: shift/scale/gate for attention and MLP
        sh1, sc1, g1, sh2, sc2, g2 = (t6 + self.table[None]).unbind(1)
        h = self.norm1(x) * (1 + sc1[:, None]) + sh1[:, None]
        x = x + g1[:, None] * self.attn(h, mask)
        h = self.norm2(x) * (1 + sc2[:, None]) + sh2[:, None]
        return x + g2[:, None] * self.mlp(h)


class TinyDiT(nn.Module):
    """Velocity model v(x_s, s, prompt) on pixels in [-1, 1]."""

    def __init__(self, cfg: ModelConfig, world: WorldConfig):
        super().__init__()
        if world.height % cfg.patch or world.width % cfg.patch:
            raise ValueError(f"image {world.height}x{world.width} is not divisible by model.patch={cfg.patch}")
        if cfg.dim % cfg.heads:
            raise ValueError(f"model.dim={cfg.dim} is not divisible by model.heads={cfg.heads}")
        self.cfg, self.channels = cfg, world.channels
        self.grid = (world.height // cfg.patch, world.width // cfg.patch)
        d, p, c = cfg.dim, cfg.patch, world.channels
        n_patches = self.grid[0] * self.grid[1]
        self.char_emb = nn.Embedding(VOCAB, d)
        self.text_pos = nn.Parameter(torch.randn(cfg.text_len + 1, d) * 0.02)
        self.text_blocks = nn.ModuleList(TextBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.text_layers))
        self.text_norm = nn.LayerNorm(d)
        self.patch_in = nn.Linear(c * p * p, d)
        self.img_pos = nn.Parameter(torch.randn(n_patches, d) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.t_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.out_mod = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, c * p * p)
        nn.init.zeros_(self.t_mod[1].weight)
        nn.init.zeros_(self.t_mod[1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # -- FlowModel protocol -------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Cond:
        # The text encoder is trained with the DiT, so Cond carries tokens and velocity() encodes.
        device = self.text_pos.device
        return Cond(
            {"tokens": tokenize(prompts, self.cfg.text_len).to(device)},
            {"tokens": tokenize([""], self.cfg.text_len).to(device)},
        )

    def velocity(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        return self(x, s, cond.fields["tokens"])

    def decode(self, x0: Tensor) -> Tensor:
        img = ((x0.float() + 1.0) / 2.0).clamp(0, 1)
        return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.channels, height, width)

    # -- network ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, s: Tensor, tokens: Tensor) -> Tensor:
        b, c, h, w = x.shape  # [B, C, H, W]
        p, d = self.cfg.patch, self.cfg.dim
        valid = tokens != PAD  # [B, L]
        n_img = self.grid[0] * self.grid[1]
        keys = torch.cat([valid, valid.new_ones(b, n_img)], dim=1)  # [B, L + N]
        text_mask = valid[:, None, None, :]
        joint_mask = keys[:, None, None, :]

        t = self.char_emb(tokens) + self.text_pos[None]
        for blk in self.text_blocks:
            t = blk(t, text_mask)
        t = self.text_norm(t)

        patches = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, n_img, c * p * p)
        z = torch.cat([t, self.patch_in(patches) + self.img_pos[None]], dim=1)
        temb = self.t_mlp(timestep_embedding(s, d).to(z.dtype))
        t6 = self.t_mod(temb).view(b, 6, d)
        for blk in self.blocks:
            z = blk(z, t6, joint_mask)
        z = z[:, -n_img:]
        shift, scale = self.out_mod(F.silu(temb)).chunk(2, dim=-1)
        z = self.out_norm(z) * (1 + scale[:, None]) + shift[:, None]
        out = self.out(z).view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return out


def build_tiny_dit(cfg: ModelConfig, world: WorldConfig) -> TinyDiT:
    return TinyDiT(cfg, world)
