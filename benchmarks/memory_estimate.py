"""Expected per-GPU memory of TDM-R1 on SD3.5-Medium and Z-Image-Turbo, LoRA and full modes, by formula.

Parameter counts are exact: the published architectures are built on the meta device from their configs (no
weights, no download) and counted, LoRA adapters included. Bytes per parameter (bf16 training, AdamW):
  trainable role: 2 (bf16 weights) + 4 (fp32 gradient accumulation over the epoch) + 4 (fp32 master) + 8 (Adam m, v)
                  = 18 B; frozen role (teacher / reference, generator EMA, slow surrogate): 2 B (bf16).
  lora:  base 2 B x P_transformer + 3 trainable adapters x 18 B x P_lora + 2 frozen adapter copies x 2 B x P_lora
  full:  3 trainable copies x 18 B x P_transformer + 3 frozen copies x 2 B x P_transformer
ZeRO-3 divides all of that by the world size N (ZeRO-1/2 would divide only the gradient and optimizer terms);
on top, per GPU and not partitioned: two gathered transformer blocks (current + prefetched, bf16), the VAE (bf16),
activations of one differentiable forward over the per-GPU micro-batch with gradient checkpointing, and ~2 GB of
CUDA context / allocator slack. Activations per sample: blocks x tokens x width x 2 B (checkpointed block inputs)
+ 34 x tokens x width B (one block recomputed in the backward; Korthikanti et al. 2022, 16-bit, flash/SDPA so no
tokens^2 term). Text encoders are resident only while an epoch's prompts are encoded (then offloaded), so they are
reported separately as the encode-phase peak.

Usage: python benchmarks/memory_estimate.py [--gpus 8] [--micro-batch 12] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

GB = 1024**3
TRAINABLE_B, FROZEN_B = 18, 2

SD35M = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
ZIMAGE = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, qk_norm=True, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)  # fmt: skip
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(transformer: torch.nn.Module, targets: list[str], rank: int) -> int:
    pattern = re.compile(r"(?:.+\.)?(?:" + "|".join(re.escape(t) for t in targets) + ")")
    return sum(
        rank * (m.in_features + m.out_features)
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)
    )


def build_sd35m():
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35M)
        clip_l = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           projection_dim=768, max_position_embeddings=77)
        )  # fmt: skip
        clip_g = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           projection_dim=1280, max_position_embeddings=77, hidden_act="gelu")
        )  # fmt: skip
        t5 = T5EncoderModel(
            T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
                     feed_forward_proj="gated-gelu")
        )  # fmt: skip
        vae = AutoencoderKL(**VAE)
    text = count(clip_l) + count(clip_g) + count(t5)
    return transformer, text, count(vae)


def build_zimage():
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**ZIMAGE)
        qwen = Qwen3ForCausalLM(
            Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
        )  # fmt: skip
        vae = AutoencoderKL(**VAE)
    return transformer, count(qwen), count(vae)


def activations_per_sample(blocks: int, tokens: int, width: int) -> int:
    return blocks * tokens * width * 2 + 34 * tokens * width


def estimate(name: str, gpus: int, micro_batch: int, image: int, rank: int) -> list[dict]:
    from tdm_r1.models.lora import lora_targets

    if name == "sd35m":
        transformer, p_text, p_vae = build_sd35m()
        kind, width, blocks = "sd3", 1536, 24
        tokens = (image // 16) ** 2 + 77 + 256  # image patches + CLIP + T5 tokens
    else:
        transformer, p_text, p_vae = build_zimage()
        kind, width, blocks = "zimage", 3840, 30 + 2 + 2  # main layers + noise / context refiners
        tokens = (image // 16) ** 2 + 128  # image patches + a typical caption (padded to a multiple of 32)
    p = count(transformer)
    p_lora = lora_params(transformer, lora_targets(kind), rank)
    block = max(count(b) for b in transformer.modules() if type(b).__name__.endswith("TransformerBlock"))
    rows = []
    for mode in ("lora", "full"):
        if mode == "lora":
            states = FROZEN_B * p + (3 * TRAINABLE_B + 2 * FROZEN_B) * p_lora
        else:
            states = (3 * TRAINABLE_B + 3 * FROZEN_B) * p
        act = micro_batch * activations_per_sample(blocks, tokens, width)
        for n, stage in ((gpus, 3), (1, 0)):
            fixed = 2 * block * 2 + p_vae * 2 + act + 2 * GB
            rows.append(
                dict(
                    model=name, mode=mode, zero_stage=stage, world_size=n, params_transformer=p, params_lora=p_lora,
                    params_text_encoders=p_text, role_states_gb=states / n / GB, activations_gb=act / GB,
                    total_gb=(states / n + fixed) / GB, encode_peak_text_encoders_gb=p_text * 2 / GB,
                )
            )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=12, help="samples per GPU per differentiable forward")
    ap.add_argument("--image", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--json", default="benchmarks/results/memory_estimate.json")
    args = ap.parse_args()
    rows = [
        r for name in ("sd35m", "zimage") for r in estimate(name, args.gpus, args.micro_batch, args.image, args.rank)
    ]
    print(f"# {args.image} px, LoRA r{args.rank}, {args.micro_batch} samples per GPU, bf16 + AdamW")
    print("model   mode  ZeRO  GPUs  P_transformer  P_lora   role states  activations  total/GPU  (text enc.)")
    for r in rows:
        print(
            f"{r['model']:<7} {r['mode']:<5} {r['zero_stage']:>4}  {r['world_size']:>4}  "
            f"{r['params_transformer'] / 1e9:>11.3f}B  {r['params_lora'] / 1e6:>5.1f}M  "
            f"{r['role_states_gb']:>9.1f} GB  {r['activations_gb']:>8.1f} GB  {r['total_gb']:>7.1f} GB  "
            f"({r['encode_peak_text_encoders_gb']:.1f} GB)"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
