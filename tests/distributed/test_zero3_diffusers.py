"""DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) with a diffusers model: tiny Z-Image (tests/models/tiny_models.py), LoRA
roles as the recipes hold them, launched the way users launch (`deepspeed --num_gpus 2 --module tdm_r1 train --config
...`). The model is loaded whole by each rank and then partitioned (diffusers' from_pretrained does not run under
zero.Init). This process runs the same config without DeepSpeed meanwhile, for reference.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tdm_r1 import checkpoint as ckpt
from tdm_r1.cli import main
from tdm_r1.commands.train import train
from tdm_r1.config import load_config

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("zero3_test", HERE / "test_zero3.py")
zero3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zero3)
_spec = importlib.util.spec_from_file_location("tiny_models", HERE.parent / "models" / "tiny_models.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

# 2 ranks vs 1 process: half-size batches, cross-rank sums in another order, float64 metric means (test_zero3.py)
RTOL, ATOL = 1e-4, 1e-6


def write_config(d: Path, source: Path) -> Path:
    # global micro-batches of 2 samples (micro_batch_groups 1, group_size 2): each group spans both ranks
    cfg = tiny.train_config(
        d,
        "zimage",
        source,
        d / "ranks",
        {},
        distributed={
            "zero_stage": 3,
            "bf16": False,
            "param_persistence_threshold": 0,  # partition every tensor, however small
            "reduce_bucket_size": 1_000_000,
            "prefetch_bucket_size": 0,
            "max_reuse_distance": 0,
        },
    )
    path = d / "zimage_ds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero3_zimage")
    with tiny.one_thread():
        source = tiny.build_tiny_zimage(d / "tiny_zimage")
    config = write_config(d, source)
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(zero3._free_port()), "--module", "tdm_r1", "train"]
    proc = zero3._launch([*cmd, "--config", str(config)], d / "ranks.log")
    try:
        with tiny.one_thread():
            train(load_config(config, [f"run_dir={d / 'single'}"]))
    finally:
        zero3._wait(proc, d / "ranks.log", "deepspeed launch")
    return d


def test_two_ranks_give_the_single_process_metrics(runs):
    a, b = zero3._metrics(runs / "ranks"), zero3._metrics(runs / "single")
    assert [r["epoch"] for r in a] == [1] == [r["epoch"] for r in b]
    ra, rb = zero3._deterministic(a[0]), zero3._deterministic(b[0])
    assert ra.keys() == rb.keys() and rb["adv_abs_mean"] > 0
    norms = [ra.pop(f"grad_norm_{r}") for r in ("generator", "fake", "surrogate")]  # one engine: the joint norm
    joint = math.sqrt(sum(rb.pop(f"grad_norm_{r}") ** 2 for r in ("generator", "fake", "surrogate")))
    assert norms == pytest.approx([joint] * 3, rel=RTOL)
    for k in ra:
        assert ra[k] == pytest.approx(rb[k], rel=RTOL, abs=ATOL), k
    sa = json.loads((runs / "ranks" / "summary.json").read_text())["tdm_r1_4nfe"]
    sb = json.loads((runs / "single" / "summary.json").read_text())["tdm_r1_4nfe"]
    assert sa["n"] == sb["n"] == 2 and sa["reward_mean"] == pytest.approx(sb["reward_mean"], rel=RTOL)


def test_each_rank_holds_half_of_every_adapter_tensor(runs):
    state = runs / "ranks" / "checkpoints" / "state_000001.shards"
    (r0, info), (r1, _) = (ckpt.read_train_state(ckpt.rank_file(state, r)) for r in (0, 1))
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    roles = {k.split("/")[0] for k in info["shapes"]}
    assert roles == {"generator", "generator_ema", "fake", "surrogate", "slow_surrogate"}
    for key, shape in info["shapes"].items():
        whole = math.prod(shape)
        assert r0["roles"][key].numel() == r1["roles"][key].numel() == math.ceil(whole / 2), key


def test_export_of_the_sharded_state_is_the_pipeline_the_ranks_wrote(runs, tmp_path):
    from diffusers import DiffusionPipeline

    state = runs / "ranks" / "checkpoints" / "state_000001.shards"
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(state), "--out", str(out)]) == 0
    with tiny.one_thread():
        exported = DiffusionPipeline.from_pretrained(out, local_files_only=True).transformer.state_dict()
        at_end = DiffusionPipeline.from_pretrained(runs / "ranks" / "pipeline", local_files_only=True)
        written = at_end.transformer.state_dict()
        noise = torch.randn((2, 4, tiny.HEIGHT // 2, tiny.WIDTH // 2), generator=torch.Generator().manual_seed(0))
        images = tiny.exported_pipeline_images(out, ["a green cat", "red cube"], noise, tiny.ZIMAGE_SEQ)
    assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in exported)
    assert images.shape == (2, 3, tiny.HEIGHT, tiny.WIDTH) and torch.isfinite(images).all()


# -- distill: TDM on 2 ranks --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distill_runs(tmp_path_factory):
    """`tdm-r1 distill` under `deepspeed` on 2 ranks (each rank rolls out 1 of each step's 2 prompts) and the same
    config in this process."""
    d = tmp_path_factory.mktemp("zero3_distill")
    with tiny.one_thread():
        source = tiny.build_tiny_zimage(d / "tiny_zimage")
    raw = yaml.safe_load(write_config(d, source).read_text())
    raw["distill"] = {"steps": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 1, "log_every": 1}
    config = d / "distill_ds.yaml"
    config.write_text(yaml.safe_dump(raw))
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(zero3._free_port()), "--module", "tdm_r1", "distill"]
    proc = zero3._launch([*cmd, "--config", str(config)], d / "ranks.log")
    try:
        from tdm_r1.commands.distill import distill

        with tiny.one_thread():
            distill(load_config(config, [f"run_dir={d / 'single'}"]))
    finally:
        zero3._wait(proc, d / "ranks.log", "deepspeed distill launch")
    return d


def test_distill_on_two_ranks_gives_the_single_process_steps(distill_runs):
    a, b = zero3._metrics(distill_runs / "ranks"), zero3._metrics(distill_runs / "single")
    assert [r["step"] for r in a] == [1, 2] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        ra, rb = zero3._deterministic(ra), zero3._deterministic(rb)
        for rec in (ra, rb):
            rec.pop("seconds_step")
        norms = [ra.pop(f"grad_norm_{r}") for r in ("generator", "fake")]  # one engine: the joint norm
        joint = math.sqrt(sum(rb.pop(f"grad_norm_{r}") ** 2 for r in ("generator", "fake")))
        assert norms == pytest.approx([joint] * 2, rel=RTOL)
        assert ra.keys() == rb.keys() and rb["loss_fake"] > 0
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=RTOL, abs=ATOL), k
    sa = json.loads((distill_runs / "ranks" / "summary.json").read_text())["student_heldout"]
    sb = json.loads((distill_runs / "single" / "summary.json").read_text())["student_heldout"]
    assert sa["n"] == sb["n"] == 2 and sa["reward_mean"] == pytest.approx(sb["reward_mean"], rel=RTOL)


def test_distill_on_two_ranks_writes_the_single_process_student(distill_runs):
    roles = load_config(distill_runs / "single" / "config.yaml").roles
    for name in ("student_adapter.safetensors", "student_fake_adapter.safetensors"):
        xa = ckpt.read_adapter(distill_runs / "ranks" / name, roles)
        xb = ckpt.read_adapter(distill_runs / "single" / name, roles)
        assert xa.keys() == xb.keys() and any(v.abs().max() > 0 for k, v in xb.items() if "lora_B" in k)
        for k in xa:
            torch.testing.assert_close(xa[k], xb[k], rtol=RTOL, atol=ATOL, msg=f"{name} {k}")
    assert (distill_runs / "ranks" / "student_pipeline" / "transformer").is_dir()
    assert (distill_runs / "ranks" / "checkpoints" / "state_000002.shards").is_dir()
