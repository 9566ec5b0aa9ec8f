"""Diffusers models with random weights built from configs (`diffusers.random_init`, `tdm-r1 bench --random-init`):
the real architectures, so a throughput benchmark measures real shapes and FLOPs, without downloading weights.

The transformer and the VAE come from their configs: the diffusers folder's own (`transformer/config.json`,
`vae/config.json`) when diffusers.path has them, else the published ones (tdm_r1/models/published.py). The text
encoders are replaced by a stub that returns embeddings of the widths the transformer reads, drawn from a generator
seeded by the prompt (the same prompt, the same embedding): prompts are encoded once per epoch and cached, so the
text encoders' cost is not what a throughput benchmark measures, and the stub needs no tokenizer or weights.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from torch import Tensor, nn

from tdm_r1.config import DiffusersConfig, ModelConfig
from tdm_r1.models import published
from tdm_r1.models.diffusers_common import DTYPES, DiffusersFlowModel
from tdm_r1.models.sd3 import SD3FlowModel
from tdm_r1.models.zimage import ZImageFlowModel


def _prompt_randn(prompt: str, shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(prompt.encode())))


class _StubPipe:
    """What the flow models read of a diffusers pipeline once the text encoders are stubbed: the VAE."""

    def __init__(self, vae: nn.Module):
        self.vae = vae

    def register_modules(self, **_) -> None:
        pass


class RandomSD3(SD3FlowModel):
    clip_tokens = 77  # CLIP's sequence (the folder's tokenizer_max_length when it has a tokenizer)

    def _text_encoders(self) -> list[nn.Module]:
        return []

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        c = self.transformer.config
        n_tokens = self.clip_tokens + self.max_sequence_length  # CLIP tokens, then T5 tokens
        embeds = torch.stack([_prompt_randn(p, (n_tokens, c.joint_attention_dim)) for p in prompts])
        pooled = torch.stack([_prompt_randn(p + "\0pooled", (c.pooled_projection_dim,)) for p in prompts])
        return {"prompt_embeds": embeds.to(device, self.compute_dtype), "pooled": pooled.to(device, self.compute_dtype)}


class RandomZImage(ZImageFlowModel):
    def _text_encoders(self) -> list[nn.Module]:
        return []

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        width, n = self.transformer.config.cap_feat_dim, self.max_sequence_length
        padded = torch.zeros(len(prompts), n, width, dtype=self.compute_dtype, device=device)
        mask = torch.zeros(len(prompts), n, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            length = min(n, 12 + len(p) // 3)  # ~ the chat template's tokens plus the prompt's
            padded[i, :length] = _prompt_randn(p, (length, width)).to(device, self.compute_dtype)
            mask[i, :length] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}


def _config(folder: Path, sub: str, fallback: dict) -> dict:
    path = folder / sub / "config.json"
    if path.is_file():
        return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return dict(fallback)


def build_random_model(model_cfg: ModelConfig, cfg: DiffusersConfig) -> DiffusersFlowModel:
    """The FlowModel of model.kind with random weights (see the module notes); built on the GPU when there is one."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, ZImageTransformer2DModel

    kind = model_cfg.kind
    folder = Path(cfg.path) if cfg.path else Path("/nonexistent")
    t_cls, m_cls = (SD3Transformer2DModel, RandomSD3) if kind == "sd3" else (ZImageTransformer2DModel, RandomZImage)
    param_dtype = torch.float32 if cfg.master_weights_fp32 else DTYPES[cfg.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):
        transformer = t_cls.from_config(_config(folder, "transformer", published.TRANSFORMER[kind])).to(param_dtype)
        vae = AutoencoderKL.from_config(_config(folder, "vae", published.VAE[kind])).to(DTYPES[cfg.dtype])
    model = m_cls(transformer, _StubPipe(vae.eval().requires_grad_(False)), cfg, folder)
    tokenizer = folder / "tokenizer" / "tokenizer_config.json"
    if kind == "sd3" and tokenizer.is_file():
        model.clip_tokens = int(json.loads(tokenizer.read_text()).get("model_max_length", 77))
    return model
