"""`tdm-r1 plan`: exact parameter and FLOP counts, the memory formula on hand-computed cases, the layouts it suggests
and the command line. (The formula against a measured 2-rank ZeRO-3 run: benchmarks/plan_check.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tdm_r1.cli import main
from tdm_r1.config import RolesConfig, load_config
from tdm_r1.models.tiny_dit import build_tiny_dit
from tdm_r1.plan import (
    GB,
    Setup,
    Shape,
    flops_per_epoch,
    memory,
    saved_activation_bytes,
    setup_of,
    shape_of,
    suggestions,
)
from tdm_r1.roles import build_roles

SMALL = ["model.dim=32", "model.depth=2", "model.heads=2", "model.text_layers=1", "roles.lora_rank=4"]


def test_toy_counts_equal_the_built_model():
    cfg = load_config(None, [*SMALL, "roles.surrogate_lora_rank=2"])
    shape = shape_of(cfg)
    model = build_tiny_dit(cfg.model, cfg.world)
    assert shape.params == sum(p.numel() for p in model.parameters())
    rc = cfg.roles
    roles = build_roles(
        RolesConfig(mode="lora", lora_rank=4, surrogate_lora_rank=2, lora_targets=rc.lora_targets), model
    )
    counts = {n: sum(p.numel() for p in ps) for n, ps in roles.trainable().items()}
    assert counts == {"generator": shape.lora, "fake": shape.lora, "surrogate": shape.lora_surrogate}
    assert shape.gathered_block == sum(p.numel() for p in model.blocks[0].parameters())
    # one sample's forward: the matmuls counted on real tensors, plus attention by hand (torch's fused CPU attention
    # kernel is not counted by flop_counter; on the meta device it decomposes into the two batched matmuls)
    cond = model.encode_prompts(['a sign that says "AB"'])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.velocity(torch.zeros(1, 1, 16, 64), torch.full((1,), 0.5), cond)
    d, text, joint = cfg.model.dim, cfg.model.text_len + 1, cfg.model.text_len + 1 + 4 * 16
    attention = 4 * d * (cfg.model.text_layers * text**2 + cfg.model.depth * joint**2)  # Q K^T and A V, 2 flops a MAC
    assert shape.forward_flops == counter.get_total_flops() + attention
    # the activations one differentiable forward keeps: counted on the meta device as on real tensors
    x = torch.zeros(1, 1, 16, 64)
    real = saved_activation_bytes(model, lambda: model.velocity(x, torch.full((1,), 0.5), cond), x)
    assert shape.activation_bytes == real > 0


def _shape() -> Shape:
    return Shape(params=1000, lora=10, lora_surrogate=5, gathered_block=100, blocks=4, width=8, tokens=16, vae=50,
                 text=300, forward_flops=1e6, activation_bytes=4000)  # fmt: skip


def _setup(**kw) -> Setup:
    base = dict(gpus=4, mode="lora", zero_stage=3, micro_batch=2, weight_bytes=2, checkpointing=True,
                offload_optimizer=False, max_live=10**9, cuda=True, prefetch=300)  # fmt: skip
    return Setup(**(base | kw))


def test_memory_by_hand_lora_zero3_bf16():
    m = memory(_shape(), _setup())
    # weights: 2 B x (base 1000 + 3 adapters x 10 + 2 surrogate-rank adapters x 5), over 4 ranks
    assert m["weights"] == 2 * (1000 + 30 + 10) / 4
    trainable = 2 * 10 + 5  # generator, fake, surrogate
    assert m["gradients"] == 4 * trainable / 4
    assert m["optimizer"] == (8 + 4) * trainable / 4  # Adam moments + DeepSpeed's fp32 partition
    assert m["gathered"] == 2 * 1000  # the whole model gathered, beside this rank's own partition
    assert m["gather_buffers"] == 3 * 2 * 300  # three prefetch buckets of bf16 parameters
    # checkpointing: every block's bf16 input, plus one block's saved tensors (4000 B counted in fp32 -> 2000 in bf16)
    assert m["activations"] == 2 * (4 * 16 * 8 * 2 + 2000 / 4)
    assert m["backward_work"] == m["activations"] / 3
    assert m["vae"] == 100 and m["context"] == 2 * GB and m["text_encoders"] == 600
    parts = ("weights", "gradients", "optimizer", "gathered", "gather_buffers", "activations", "backward_work", "vae",
             "context")  # fmt: skip
    assert m["total"] == sum(m[k] for k in parts)


def test_memory_by_hand_full_one_process_fp32():
    m = memory(_shape(), _setup(gpus=1, mode="full", zero_stage=0, weight_bytes=4, checkpointing=False, cuda=False))
    assert m["weights"] == 6 * 4 * 1000  # 3 trainable roles, 2 shadows, the reference
    assert m["gradients"] == 4 * 3000 and m["optimizer"] == 8 * 3000  # no separate master for fp32 weights
    assert m["gathered"] == 0 and m["gather_buffers"] == 0 and m["context"] == 0
    assert m["activations"] == 2 * 4000  # every saved tensor, fp32


@pytest.mark.parametrize(("stage", "divided"), [(0, ()), (1, ("optimizer",)), (2, ("optimizer", "gradients")),
                                                (3, ("optimizer", "gradients", "weights"))])  # fmt: skip
def test_zero_stages_divide_what_they_partition(stage, divided):
    one = memory(_shape(), _setup(gpus=1, zero_stage=0))
    four = memory(_shape(), _setup(gpus=4, zero_stage=stage))
    for k in ("weights", "gradients", "optimizer"):
        assert four[k] == pytest.approx(one[k] / 4 if k in divided else one[k])


def test_suggestions_that_fit_come_first():
    shape, setup = _shape(), _setup(gpus=1, mode="full", zero_stage=0, cuda=False)
    total = memory(shape, setup)["total"]
    out = suggestions(shape, setup, capacity=total * 0.6)
    assert out and out[0]["fits"] and out[0]["total_gib"] * GB <= total * 0.6
    fits = [r["fits"] for r in out]
    assert fits == sorted(fits, reverse=True)
    assert any(r["change"].startswith("LoRA") and r["fits"] for r in out)


def test_epoch_flops_follow_the_forward_counts():
    cfg = load_config(None, [*SMALL, "tdm.steps=4", "tdm.steps_per_batch=2", "train.prompts_per_epoch=3",
                             "train.group_size=2"])  # fmt: skip
    shape = _shape()
    f = flops_per_epoch(shape, cfg, checkpointing=False)
    per = {k: v / (6 * shape.forward_flops) for k, v in f.items()}
    assert per == {"rollout": 4, "fake": 2 * 4, "surrogate": 2 * 5, "generator": 2 * 9}
    g = flops_per_epoch(shape, cfg, checkpointing=True)  # + one recomputed forward per backward
    assert g["generator"] - f["generator"] == 6 * 2 * shape.forward_flops


def test_setup_reads_the_config():
    cfg = load_config("configs/sd35m_ocr.yaml", [])
    s = setup_of(cfg, 8)
    assert (s.mode, s.zero_stage, s.micro_batch, s.weight_bytes, s.checkpointing) == ("lora", 3, 12, 2, True)
    assert setup_of(cfg, 1).zero_stage == 0  # one process runs without DeepSpeed


def test_cli_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "configs/sd35m_ocr.yaml", "--gpus", "8", "--published", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| **total** |" in text and "MFU 0.30 (assumed); fits" in text
    data = json.loads(out.read_text())
    assert data["fits"] and data["shape"]["params"] > 2e9 and set(data["flops_per_epoch"]) == {
        "rollout", "fake", "surrogate", "generator"}  # fmt: skip
    # full fine-tuning of SD3.5-M in one 80 GB GPU does not fit: the exit code says so, with what would
    args = ["plan", "--config", "configs/sd35m_ocr.yaml", "--gpus", "1", "--published", "--set", "roles.mode=full"]
    assert main(args) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "--config", "configs/sd35m_ocr.yaml", "--gpus", "8"]) == 2  # no folder, no --published
    assert "transformer/config.json not found" in capsys.readouterr().err
