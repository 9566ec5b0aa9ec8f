"""PickScore (Kirstain et al. 2023): a CLIP-H model fine-tuned on human preferences between images for a prompt.

score = logit_scale * cos(image embedding, prompt embedding), the model's own preference logit (about 18-24 for
SD-class images; only differences within a prompt group matter to the advantages). Loaded offline from a local folder
(train.rewards[].path) that holds the model (`yuvalkirstain/PickScore_v1`: config.json + weights) and its processor
files (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`: preprocessor_config.json and the tokenizer files), for example:

    huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir models/pickscore
    huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json tokenizer.json \\
        tokenizer_config.json special_tokens_map.json vocab.json merges.txt --local-dir models/pickscore
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tdm_r1.config import ConfigError, RewardTermConfig
from tdm_r1.rewards.base import load_transformers_folder, reward_device

HINT = (
    "Put PickScore_v1 (config.json + weights) and the CLIP-ViT-H-14 processor files (preprocessor_config.json, "
    "tokenizer files) in one folder; see tdm_r1/rewards/pickscore.py."
)


def _features(out) -> torch.Tensor:
    """get_*_features returns the projected embeddings (transformers 4) or an output holding them (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] float in [0, 1] -> RGB PIL images (what CLIP processors were trained on)."""
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


class PickScore:
    name = "pickscore"

    def __init__(self, path: str, device: str = "auto", batch_size: int = 32):
        self.processor, model = load_transformers_folder(
            path, self.name, "a local PickScore folder", HINT, "CLIPModel", "pip install 'tdm-r1[diffusers]'"
        )
        self.device = reward_device(device)
        self.batch_size = batch_size
        self.model = model.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            pil = to_pil(images[i : i + self.batch_size])
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            text = self.processor(
                text=prompts[i : i + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            img = _features(self.model.get_image_features(pixel_values=pixels)).float()
            txt = _features(self.model.get_text_features(**text)).float()
            cos = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
            scores.append(self.model.logit_scale.exp().float() * cos)
        return torch.cat(scores).cpu()


def build_pickscore(term: RewardTermConfig) -> PickScore:
    if term.options:
        raise ConfigError(f"train.rewards[pickscore].options: pickscore takes none, got {sorted(term.options)}")
    return PickScore(term.path, term.device, term.batch_size)
