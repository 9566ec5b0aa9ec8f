"""Z-Image / Z-Image-Turbo as a FlowModel: ZImageTransformer2DModel, Qwen3 text encoder, VAE.

Convention (checked against diffusers' ZImagePipeline): the pipeline feeds the transformer t = (1000 - 1000 sigma)
/ 1000 = 1 - sigma (1 = clean image) and steps the Euler scheduler with the NEGATED output,
x_next = x + (sigma_next - sigma) * (-output). So the transformer predicts x0 - eps and, in our convention,
velocity(x, s) = -transformer(x, t = 1 - s). Converted here, once; nothing else in the code knows.

The transformer takes lists: one [C, 1, h, w] latent (a one-frame video) and one unpadded caption [L_i, D] per sample.
Cond stores captions padded to max_sequence_length with a boolean mask, so conds of any prompts concatenate; the
padding is removed again before the transformer sees it. Caption embeddings are the text encoder's second-to-last
hidden state of the chat-templated prompt, via the pipeline's own encode_prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tdm_r1.config import DiffusersConfig
from tdm_r1.models.base import Cond
from tdm_r1.models.diffusers_common import DiffusersFlowModel, check_model_folder, load_pipeline


class ZImageFlowModel(DiffusersFlowModel):
    kind = "zimage"
    components = {
        "transformer": "model",
        "vae": "model",
        "text_encoder": "model",
        "tokenizer": "tokenizer",
        "scheduler": "scheduler",
    }
    default_max_sequence_length = 512
    download_hint = (
        "Get it with: huggingface-cli download Tongyi-MAI/Z-Image-Turbo --local-dir <folder> "
        "(then set diffusers.path: <folder>)."
    )

    def _text_encoders(self) -> list[nn.Module]:
        return [self.frozen.pipe.text_encoder]

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        # encode_prompt rewrites the list it is given in place (chat template), hence the copy
        embeds, _ = self.frozen.pipe.encode_prompt(
            prompt=list(prompts),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        n, width = len(embeds), embeds[0].shape[-1]
        padded = torch.zeros(n, self.max_sequence_length, width, dtype=self.compute_dtype, device=device)
        mask = torch.zeros(n, self.max_sequence_length, dtype=torch.bool, device=device)
        for i, e in enumerate(embeds):  # e [L_i, D]
            padded[i, : len(e)] = e.to(self.compute_dtype)
            mask[i, : len(e)] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    def _forward(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        # Same float32 arithmetic as ZImagePipeline (timestep = 1000 sigma, then (1000 - timestep) / 1000), so equal
        # sigmas give bit-equal transformer times.
        t = (1000.0 - s.float() * 1000.0) / 1000.0
        embeds, mask = cond.fields["prompt_embeds"], cond.fields["prompt_mask"]
        captions = [embeds[i][mask[i]] for i in range(len(embeds))]
        out = self.transformer(list(x.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def _set_attention_backend(self, backend: str) -> None:
        # Captions of different lengths make Z-Image pass an attention mask, which flash-attn's plain kernel
        # refuses; the varlen kernel takes it.
        self.transformer.set_attention_backend("flash_varlen" if backend == "flash" else backend)

    @property
    def latent_multiple(self) -> int:
        return self.vae_scale_factor * 2


def load_zimage(cfg: DiffusersConfig) -> ZImageFlowModel:
    """Z-Image(-Turbo) FlowModel from the local diffusers folder cfg.path (offline; clear error if incomplete)."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    root = check_model_folder(cfg.path, "zimage", ZImageFlowModel.components, ZImageFlowModel.download_hint)
    transformer, pipe = load_pipeline(ZImagePipeline, ZImageTransformer2DModel, root, cfg, "zimage")
    return ZImageFlowModel(transformer, pipe, cfg, root)
