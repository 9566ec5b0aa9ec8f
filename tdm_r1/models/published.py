"""The published architectures' configs (SD3.5-Medium, Z-Image-Turbo): what `tdm-r1 plan --published` counts and
`tdm-r1 bench --random-init` builds when no diffusers folder is at hand. Values from the models' config.json files."""

SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
ZIMAGE_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, qk_norm=True, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)  # fmt: skip
_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
VAE = {
    "sd3": _VAE | dict(scaling_factor=1.5305, shift_factor=0.0609),
    "zimage": _VAE | dict(scaling_factor=0.3611, shift_factor=0.1159),
}
TRANSFORMER = {"sd3": SD35M_TRANSFORMER, "zimage": ZIMAGE_TRANSFORMER}


def text_encoder_params(kind: str) -> int:
    """Parameters of the published text encoders (SD3.5: CLIP-L + CLIP-G + T5-XXL; Z-Image: Qwen3-4B), counted on
    the meta device."""
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        Qwen3Config,
        Qwen3ForCausalLM,
        T5Config,
        T5EncoderModel,
    )

    with torch.device("meta"):
        if kind == "sd3":
            models = [
                CLIPTextModelWithProjection(
                    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, projection_dim=768, max_position_embeddings=77)
                ),
                CLIPTextModelWithProjection(
                    CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=20, projection_dim=1280, max_position_embeddings=77,
                                   hidden_act="gelu")
                ),
                T5EncoderModel(
                    T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
                             feed_forward_proj="gated-gelu")
                ),
            ]  # fmt: skip
        else:
            models = [
                Qwen3ForCausalLM(
                    Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
                )
            ]  # fmt: skip
    return sum(p.numel() for m in models for p in m.parameters())


def vae_params(kind: str) -> int:
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKL(**VAE[kind]).parameters())
