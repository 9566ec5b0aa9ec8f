"""`diffusers.random_init` / `tdm-r1 bench --random-init`: the folder's architecture (or the published one) with
random weights and stub text encoders, on the tiny SD3 / Z-Image configs; the per-GPU share of a recipe."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tiny_models import PROMPTS, tiny_cfg, train_config

from tdm_r1.bench import random_init_config
from tdm_r1.cli import main
from tdm_r1.config import ConfigError, ModelConfig, load_config
from tdm_r1.models.load import load_diffusers_model


@pytest.mark.parametrize("kind", ["sd3", "zimage"])
def test_random_model_has_the_folders_architecture_and_new_weights(kind, sd3_dir, zimage_dir, sd3_model, zimage_model):
    folder, loaded = (sd3_dir, sd3_model) if kind == "sd3" else (zimage_dir, zimage_model)
    model = load_diffusers_model(ModelConfig(kind=kind), tiny_cfg(folder, kind, random_init=True))
    want = {k: v.shape for k, v in loaded.transformer.state_dict().items()}
    got = {k: v.shape for k, v in model.transformer.state_dict().items()}
    assert got == want
    differ = [
        k for k, v in model.transformer.state_dict().items() if not torch.equal(v, loaded.transformer.state_dict()[k])
    ]
    assert len(differ) > len(want) // 2  # random weights (some buffers / zero-initialised ones may coincide)
    assert model._text_encoders() == []
    # stub embeddings: the shapes the real encoders give, one embedding per prompt whatever it is encoded with
    real = loaded.encode_prompts(PROMPTS)
    cond = model.encode_prompts(PROMPTS)
    assert {k: v.shape for k, v in cond.fields.items()} == {k: v.shape for k, v in real.fields.items()}
    model.clear_prompt_cache()
    again = model.encode_prompts(PROMPTS[::-1])
    assert all(torch.equal(again.fields[k], cond.fields[k].flip(0)) for k in cond.fields)
    x = torch.randn(len(PROMPTS), *model.latent_shape(16, 24))
    with torch.no_grad():
        v = model.velocity(x, torch.full((len(PROMPTS),), 0.5), cond)
        images = model.decode(x)
    assert v.shape == x.shape and torch.isfinite(v).all() and images.shape == (len(PROMPTS), 3, 16, 24)


def test_recipe_share_per_gpu(tmp_path):
    """The SD3.5-M recipe (P 48 x G 24, 4 groups per global micro-batch, 12 samples per GPU): one process gets a
    micro-batch of 12 and 48 x 24 / 8 = 144 samples per epoch; missing prompt files are generated."""
    cfg = load_config("configs/sd35m_ocr.yaml", [])
    got = random_init_config(cfg, tmp_path)
    assert (got.train.group_size, got.train.micro_batch_groups, got.train.prompts_per_epoch) == (12, 1, 12)
    assert got.diffusers.random_init and got.roles.generator_init is None and got.roles.fake_init is None
    lines = (tmp_path / "train.txt").read_text().splitlines()
    assert len(lines) == 256 and all(line.startswith('a sign that says "') for line in lines)
    assert got.prompts.train == str(tmp_path / "train.txt")
    with pytest.raises(ConfigError, match="diffusers architecture"):
        random_init_config(load_config("configs/toy_ocr_r1.yaml", []), tmp_path)


def test_bench_random_init_runs_the_phases(zimage_dir, tmp_path, capsys):
    cfg = train_config(tmp_path, "zimage", zimage_dir, tmp_path / "run", {"group_size": 2})
    cfg["distributed"] = {"micro_batch_per_gpu": 2}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    stem = tmp_path / "out"
    args = ["bench", "--config", str(path), "--random-init", "--paths", "fast", "--epochs", "1", "--warmup", "0"]
    assert main([*args, "--out", str(stem)]) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    fast = result["paths"]["fast"]
    assert fast["forwards_per_image"]["rollout"] == 4 and fast["images_per_s"] > 0
    assert result["images_per_epoch"] == 4


def test_train_refuses_random_weights(zimage_dir, tmp_path, capsys):
    cfg = train_config(tmp_path, "zimage", zimage_dir, tmp_path / "run", {})
    cfg["diffusers"]["random_init"] = True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path)]) == 2
    assert "diffusers.random_init builds untrained weights" in capsys.readouterr().err
