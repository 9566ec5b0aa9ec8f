"""LoRA target modules per architecture (module names as in diffusers 0.42's transformers).

SD3 / SD3.5 (JointTransformerBlock): `attn` is the joint image+text attention with image projections to_q/to_k/to_v/
to_out.0 and text projections add_q_proj/add_k_proj/add_v_proj/to_add_out (the last block is context_pre_only and has
no to_add_out); SD3.5's dual-attention blocks add an image-only `attn2` with to_q/to_k/to_v/to_out.0, which the same
suffixes cover. MLPs: ff.net.0.proj / ff.net.2 (image) and ff_context.net.0.proj / ff_context.net.2 (text).

Z-Image (single-stream ZImageTransformerBlock): attention.to_q/to_k/to_v/to_out.0 (no add_* projections: text and
image share one stream) and the SwiGLU MLP feed_forward.w1/w2/w3, in the main `layers` and in the noise/context
refiner blocks alike.
"""

from __future__ import annotations

import re

_ATTENTION = {
    "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "zimage": ("to_q", "to_k", "to_v", "to_out.0"),
}
_MLP = {
    "sd3": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    "zimage": ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
}


def lora_targets(model_kind: str, include_mlp: bool = False) -> list[str]:
    """Module-name suffixes (inside the transformer) that get LoRA adapters: peft's list form of target_modules."""
    if model_kind not in _ATTENTION:
        raise ValueError(
            f"no LoRA target list for model.kind={model_kind!r} (have {sorted(_ATTENTION)}); "
            "the tiny DiT's targets are roles.lora_targets"
        )
    return list(_ATTENTION[model_kind] + (_MLP[model_kind] if include_mlp else ()))


def lora_target_regex(model_kind: str, include_mlp: bool = False, prefix: str = "transformer") -> str:
    """The same targets as one regex, full-matched by peft against module names of the adapter (whose transformer
    is the submodule `prefix`): the form roles.lora_targets takes. Text encoders and the VAE (whose attention also
    has to_q/to_k/to_v) are outside the adapter's module tree and so never match."""
    alternatives = "|".join(re.escape(t) for t in lora_targets(model_kind, include_mlp))
    return rf"{re.escape(prefix)}\.(?:.+\.)?(?:{alternatives})"
