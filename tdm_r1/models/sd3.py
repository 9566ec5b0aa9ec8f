"""Stable Diffusion 3 / 3.5 as a FlowModel: SD3Transformer2DModel, CLIP-L + CLIP-G + T5 text encoders, VAE.

Convention (checked against diffusers' StableDiffusion3Pipeline and FlowMatchEulerDiscreteScheduler): SD3 is trained
on x_s = (1 - s) x0 + s eps with target eps - x0, and the pipeline feeds timestep = sigma * 1000 and steps
x_next = x + (sigma_next - sigma) * output. So the transformer's output already is our velocity and only the time
needs scaling: velocity(x, s) = transformer(x, timestep = 1000 s).

Prompts are encoded with the pipeline's own encode_prompt (CLIP hidden states concatenated and zero-padded to T5's
width, then T5 tokens appended; pooled = both CLIP projections), so the embeddings equal what the pipeline uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tdm_r1.config import DiffusersConfig
from tdm_r1.models.base import Cond
from tdm_r1.models.diffusers_common import DiffusersFlowModel, check_model_folder, load_pipeline


class DispatchJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 with the attention product routed through diffusers' attention dispatcher.
    The stock SD3 processor calls torch SDPA directly, so `set_attention_backend` cannot reach it; this one honours
    `_attention_backend` (flash / xformers). Installed only when one of those is chosen."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def heads(t: Tensor) -> Tensor:  # [B, S, H * D] -> [B, S, H, D]
            return t.unflatten(-1, (attn.heads, -1))

        n_img = hidden_states.shape[1]
        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            cq, ck, cv = (heads(f(e)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], dim=1), torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)
        backend, parallel = self._attention_backend, self._parallel_config
        out = dispatch_attention_fn(q, k, v, dropout_p=0.0, is_causal=False, backend=backend, parallel_config=parallel)
        out = out.flatten(2, 3).to(q.dtype)
        ctx = None
        if encoder_hidden_states is not None:
            out, ctx = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if ctx is None else (out, ctx)


class SD3FlowModel(DiffusersFlowModel):
    kind = "sd3"
    components = {
        "transformer": "model",
        "vae": "model",
        "text_encoder": "model",
        "text_encoder_2": "model",
        "text_encoder_3": "model",
        "tokenizer": "tokenizer",
        "tokenizer_2": "tokenizer",
        "tokenizer_3": "tokenizer",
        "scheduler": "scheduler",
    }
    default_max_sequence_length = 256
    download_hint = (
        "Get it with: huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir <folder> "
        "(then set diffusers.path: <folder>)."
    )

    def _text_encoders(self) -> list[nn.Module]:
        p = self.frozen.pipe
        return [p.text_encoder, p.text_encoder_2, p.text_encoder_3]

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.frozen.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        # [B, 77 + max_sequence_length, 4096], [B, 2048]
        return {"prompt_embeds": embeds.to(self.compute_dtype), "pooled": pooled.to(self.compute_dtype)}

    def _forward(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=cond.fields["prompt_embeds"],
            pooled_projections=cond.fields["pooled"],
            timestep=s.float() * 1000.0,
            return_dict=False,
        )[0]

    def _set_attention_backend(self, backend: str) -> None:
        self.transformer.set_attn_processor(DispatchJointAttnProcessor())
        self.transformer.set_attention_backend(backend)

    @property
    def latent_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size


def load_sd3(cfg: DiffusersConfig) -> SD3FlowModel:
    """SD3 / SD3.5 FlowModel from the local diffusers folder cfg.path (offline; clear error if incomplete)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    root = check_model_folder(cfg.path, "sd3", SD3FlowModel.components, SD3FlowModel.download_hint)
    transformer, pipe = load_pipeline(StableDiffusion3Pipeline, SD3Transformer2DModel, root, cfg, "sd3")
    return SD3FlowModel(transformer, pipe, cfg, root)
