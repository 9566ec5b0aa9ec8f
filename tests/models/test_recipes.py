"""The cluster recipes (configs/sd35m_*.yaml, zimage_turbo_*.yaml) load through the strict config loader, match the
reference presets of DESIGN section 5, and their model sections build an adapter (pointed at a tiny folder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from tiny_models import HEIGHT, WIDTH

from tdm_r1.config import Config, from_dict
from tdm_r1.models.load import load_diffusers_model
from tdm_r1.models.lora import lora_target_regex

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = ["sd35m_ocr", "sd35m_geneval", "sd35m_pickscore", "zimage_turbo_ocr"]
# Sections allowed to be missing from the schema: none any more, so every key of every recipe loads strictly.
PENDING: set[str] = set()
GPUS = 8
# DESIGN section 5: P, G, samples per GPU, beta_dpo, rl_cfg, t_min (surrogate, generator) / 1000, PPO clip, trunc
PRESETS = {
    "sd35m_ocr": (48, 24, 12, 10.0, 4.5, (0.30, 0.30), 1e-3, 4),
    "sd35m_geneval": (48, 24, 6, 1.0, 2.5, (0.25, 0.55), 1e-3, 4),
    "sd35m_pickscore": (24, 24, 12, 1.0, 3.5, (0.40, 0.55), 2e-3, 2),
    "zimage_turbo_ocr": (48, 24, 12, 10.0, 1.0, (0.30, 0.30), 1e-3, 4),
}


def _load(name: str) -> tuple[dict, Config]:
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    known = {f.name for f in dataclasses.fields(Config)}
    assert set(raw) - known <= PENDING, f"{name}: unexpected sections {set(raw) - known - PENDING}"
    return raw, from_dict({k: v for k, v in raw.items() if k in known})  # strict on every key of these sections


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_strictly(name):
    raw, cfg = _load(name)
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert f"deepspeed --num_gpus {GPUS} --module tdm_r1 train --config configs/{name}.yaml" in text
    assert cfg.model.kind == ("zimage" if name.startswith("zimage") else "sd3")
    assert cfg.diffusers.path and (cfg.diffusers.height, cfg.diffusers.width) == (512, 512)
    assert cfg.diffusers.dtype == "bf16" and cfg.diffusers.gradient_checkpointing
    assert cfg.roles.mode == "lora" and (cfg.roles.lora_rank, cfg.roles.lora_alpha) == (32, 64.0)
    assert cfg.roles.lora_targets == lora_target_regex(cfg.model.kind)
    assert cfg.tdm.steps == 4 and raw["distributed"]["zero_stage"] == 3
    assert cfg.prompts.train and cfg.prompts.heldout  # the train / held-out prompt files
    for term in cfg.train.rewards:  # model-based rewards load from a configured local folder
        assert term.name in ("ocr", "geneval", "pickscore") and (term.name == "ocr" or term.path)
    if name.endswith("_ocr"):  # 512 px images are read as they are, one per OCR call
        (ocr,) = [t for t in cfg.train.rewards if t.name == "ocr"]
        assert ocr.options == {"upscale": 1, "tile_columns": 1, "tile_rows": 1}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_matches_its_preset(name):
    raw, cfg = _load(name)
    p, g, per_gpu, beta, rl_cfg, (t_sur, t_gen), clip, trunc = PRESETS[name]
    tc = cfg.train
    assert (tc.prompts_per_epoch, tc.group_size, tc.beta_dpo, tc.ppo_clip) == (p, g, beta, clip)
    assert (tc.t_min_surrogate, tc.t_min_generator) == (t_sur, t_gen)
    assert (cfg.tdm.rl_cfg, cfg.tdm.trunc_steps) == (rl_cfg, trunc)
    assert raw["distributed"]["micro_batch_per_gpu"] == per_gpu
    assert tc.micro_batch_groups * g == per_gpu * GPUS  # a global micro-batch is whole prompt groups


@pytest.mark.parametrize("name", ["sd35m_ocr", "zimage_turbo_ocr"])
def test_recipe_model_section_builds_the_adapter(name, request):
    _, cfg = _load(name)
    kind = cfg.model.kind
    tiny = request.getfixturevalue(f"{kind}_dir")
    # the recipe's diffusers section as is, pointed at the tiny folder (flash falls back to SDPA on CPU)
    dc = dataclasses.replace(cfg.diffusers, path=str(tiny), height=HEIGHT, width=WIDTH, max_sequence_length=12)
    model = load_diffusers_model(cfg.model, dc)
    assert model.kind == kind and model.attention_backend == "sdpa"
    assert model.transformer.gradient_checkpointing
    assert model.latent_shape(dc.height, dc.width) == (4, HEIGHT // 2, WIDTH // 2)


def test_distill_recipe_makes_the_student_the_sd35m_recipes_start_from():
    raw, cfg = _load("sd35m_distill")
    text = (CONFIGS / "sd35m_distill.yaml").read_text()
    assert f"deepspeed --num_gpus {GPUS} --module tdm_r1 distill --config configs/sd35m_distill.yaml" in text
    assert cfg.model.kind == "sd3" and cfg.roles.mode == "lora" and cfg.roles.generator_init is None
    assert cfg.tdm.steps == 4 and raw["distributed"]["zero_stage"] == 3
    assert cfg.distill.batch_size % GPUS == 0 and cfg.distill.fake_updates == 1  # one engine per lora run
    run = Path(cfg.run_dir)
    for name in RECIPES:
        if not name.startswith("sd35m"):
            continue
        recipe = _load(name)[1]
        # the adapters load there unchanged: the same lora settings, the same teacher folder and resolution
        same = ("lora_rank", "lora_alpha", "lora_targets")
        assert [getattr(recipe.roles, k) for k in same] == [getattr(cfg.roles, k) for k in same], name
        assert recipe.diffusers.path == cfg.diffusers.path and recipe.tdm.steps == cfg.tdm.steps, name
        assert Path(recipe.roles.generator_init) == run / "student_adapter.safetensors", name
        assert Path(recipe.roles.fake_init) == run / "student_fake_adapter.safetensors", name
