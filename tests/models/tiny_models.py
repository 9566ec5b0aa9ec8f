"""Tiny random SD3 and Z-Image diffusers folders, built once per session and saved with save_pretrained, so every
test loads them the way users load real weights (a local folder, from_pretrained, offline).

The models are so small that one thread is fastest; more threads on a shared, busy CPU spin-wait (a 3 ms VAE decode
took 5 s with 2 threads under load), so every test here runs single-threaded.

Tokenizers are character/byte level vocabularies built in memory (no Hub access). Every weight is perturbed away
from its initialisation so no zero-initialised projection (adaLN gates, output layers) hides a wrong convention.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tdm_r1.config import DiffusersConfig

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'\""
HEIGHT, WIDTH = 16, 24  # non-square on purpose: a swapped height/width cannot pass
PROMPTS = ['a sign that says "hi"', "red cube", "two cats on a mat"]
SD3_SEQ, ZIMAGE_SEQ = 12, 48  # text-encoder tokens per prompt


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _qwen_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=128)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def _vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_sd3(path: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()

    def clip():
        cfg = CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=8,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        return CLIPTextModelWithProjection(cfg)

    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    # SD3.5-like: dual attention (attn2) in block 0, RMS qk-norm; the last block is context_pre_only
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    parts = dict(text_encoder=clip(), text_encoder_2=clip(), text_encoder_3=t5, transformer=transformer)
    parts["vae"] = _vae(1.5305, 0.0609)
    for i, m in enumerate(parts.values()):
        _perturb(m, seed=i)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        tokenizer=clip_tok,
        tokenizer_2=_clip_tokenizer(),
        tokenizer_3=t5_tok,
        **parts,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_zimage(path: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    tok = _qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=256,
        )
    )
    transformer = ZImageTransformer2DModel(
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[8, 4, 4],
        axes_lens=[128, 32, 32],
    )
    vae = _vae(0.3611, 0.1159)
    for i, m in enumerate((text_encoder, transformer, vae)):
        _perturb(m, seed=10 + i)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.save_pretrained(path)
    return path


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_cfg(path: Path, kind: str, **overrides) -> DiffusersConfig:
    """fp32, no checkpointing: exact comparisons against the pipeline."""
    base = dict(
        path=str(path),
        height=HEIGHT,
        width=WIDTH,
        dtype="fp32",
        gradient_checkpointing=False,
        max_sequence_length=SD3_SEQ if kind == "sd3" else ZIMAGE_SEQ,
        vae_decode_chunk=2,
    )
    base.update(overrides)
    return DiffusersConfig(**base)


def load(kind: str, path: Path, **overrides):
    """Load a tiny folder through the user path (load_diffusers_model) with tiny_cfg + overrides."""
    from tdm_r1.config import ModelConfig
    from tdm_r1.models.load import load_diffusers_model

    return load_diffusers_model(ModelConfig(kind=kind), tiny_cfg(path, kind, **overrides))


def pipeline_for(kind: str, path: Path, shift: float = 3.0):
    """The diffusers pipeline of a folder with its scheduler set to our sampler's fixed shift (no dynamic shift)."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, shift=shift, use_dynamic_shifting=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_guidance(kind: str, cfg: float) -> float:
    """Our CFG scale w (v_u + w (v_c - v_u)) in each pipeline's own guidance_scale: SD3 uses w itself (CFG on when
    > 1); Z-Image guides with pos + g (pos - neg), so g = w - 1 (CFG on when > 0)."""
    return cfg - 1.0 if kind == "zimage" else cfg


def exported_pipeline_images(folder: Path, prompts: list[str], noise: torch.Tensor, max_sequence_length: int):
    """Images [B, 3, H, W] of an exported folder sampled the way its tdm_r1_export.json says (its LoRA file loaded
    when it has one), from the given latents."""
    import json

    from diffusers import DiffusionPipeline

    from tdm_r1.checkpoint.pipeline import EXPORT_INFO, LORA_FILE

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    if (folder / LORA_FILE).is_file():
        pipe.load_lora_weights(folder, weight_name=LORA_FILE)
    pipe.set_progress_bar_config(disable=True)
    call = json.loads((folder / EXPORT_INFO).read_text())["pipeline_call"]
    out = pipe(
        prompt=list(prompts),
        height=HEIGHT,
        width=WIDTH,
        latents=noise.clone(),
        output_type="pt",
        max_sequence_length=max_sequence_length,
        **call,
    )
    return out.images


def train_config(d: Path, kind: str, source: Path, run_dir: Path, train: dict, **sections) -> dict:
    """A `tdm-r1 train` config (as a dict) on a tiny diffusers folder: prompt files written into `d`, LoRA r4 roles,
    the `dark_fraction` reward, no baselines, no TensorBoard. `train` and `sections` are merged over these defaults."""
    (d / "train.txt").write_text('a sign that says "hi"\nred cube\ntwo cats on a mat\na mug with "ok" on it\n')
    (d / "heldout.txt").write_text('a sign that says "mat"\na blue cat\n')
    from tdm_r1.models.lora import lora_target_regex

    cfg = {
        "run_dir": str(run_dir),
        "threads": 1,
        "model": {"kind": kind},
        "diffusers": {
            "path": str(source),
            "height": HEIGHT,
            "width": WIDTH,
            "dtype": "fp32",
            "gradient_checkpointing": False,
            "max_sequence_length": SD3_SEQ if kind == "sd3" else ZIMAGE_SEQ,
        },
        "prompts": {"train": str(d / "train.txt"), "heldout": str(d / "heldout.txt")},
        "roles": {
            "mode": "lora",
            "generator_init": None,
            "lora_rank": 4,
            "lora_alpha": 8.0,
            "lora_targets": lora_target_regex(kind),
        },
        "train": {
            "epochs": 1,
            "prompts_per_epoch": 2,
            "group_size": 2,
            "micro_batch_groups": 1,
            "rewards": [{"name": "dark_fraction", "weight": 1.0}],
            "eval_every": 0,
            "eval_baselines": False,
            "checkpoint_every": 1,
            "tensorboard": False,
            **train,
        },
        "eval": {"batch_size": 4},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg
