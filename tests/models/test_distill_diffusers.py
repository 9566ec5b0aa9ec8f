"""`tdm-r1 distill` on the tiny SD3 and Z-Image folders (tiny_models.py), through the command users run, with prompts
from files: the TDM loop of the toy (teacher -> 4-step student), LoRA roles as the recipes hold them.

Per model, two runs: `half` distils 1 step, then `--resume`s to 2; `full` distils 2 steps in one go. The roles each run
builds are caught at construction (a spy on build_roles) with a copy of every tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from test_train_diffusers import all_tensors, metrics, unreachable
from tiny_models import one_thread, train_config

import tdm_r1.roles
import tdm_r1.run
from tdm_r1 import checkpoint as ckpt
from tdm_r1.cli import main
from tdm_r1.config import load_config

DISTILL = {"steps": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 1, "log_every": 1}


def write_config(d: Path, kind: str, source: Path, run_dir: Path, steps: int, mode: str = "lora") -> Path:
    cfg = train_config(d, kind, source, run_dir, {}, diffusers={"vae_decode_chunk": 2}, optim={"weight_decay": 0.0})
    cfg["distill"] = DISTILL | {"steps": steps}
    cfg["roles"]["mode"] = mode
    out = d / f"{run_dir.name}_{steps}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@dataclass
class Runs:
    kind: str
    source: Path
    dir: Path
    half: tuple  # (roles of the 1-step run, their tensors at construction)
    full: tuple


def _spy(built: list):
    real = tdm_r1.roles.build_roles

    def spy(*args, **kwargs):
        roles = real(*args, **kwargs)
        built.append((roles, {k: p.detach().clone() for k, p in all_tensors(roles).items()}))
        return roles

    return spy


@pytest.fixture(scope="module", params=["sd3", "zimage"])
def runs(request, tmp_path_factory) -> Runs:
    kind = request.param
    source = request.getfixturevalue(f"{kind}_dir")
    d = tmp_path_factory.mktemp(f"distill_{kind}")
    built: list = []
    with one_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(tdm_r1.run, "build_roles", _spy(built))
        assert main(["distill", "--config", str(write_config(d, kind, source, d / "half", 1))]) == 0
        resume = write_config(d, kind, source, d / "half", 2)
        assert main(["distill", "--config", str(resume), "--resume"]) == 0
        assert main(["distill", "--config", str(write_config(d, kind, source, d / "full", 2))]) == 0
    return Runs(kind, source, d, built[0], built[2])


def test_two_steps_change_every_trainable_tensor_and_no_frozen_one(runs):
    roles, before = runs.full  # LoRA A matrices get gradients once B has moved: from the second step
    now = all_tensors(roles)
    assert set(roles.active()) == {"reference", "generator", "generator_ema", "fake"}  # no surrogate in TDM
    trainable = {id(p) for ps in roles.trainable().values() for p in ps}
    shadows = {id(p) for p in roles.generator_ema.parameters()}
    dead = unreachable(runs.kind, roles)
    changed = {k for k, p in now.items() if not torch.equal(p, before[k])}
    for k, p in now.items():
        if (id(p) in trainable or id(p) in shadows) and not (dead and dead in k):
            assert k in changed, f"trainable {k} did not change"
        else:
            assert k not in changed, f"frozen {k} changed"
    assert {k.split("/")[0] for k in changed} == {"generator", "fake", "generator_ema"}
    rec = metrics(runs.dir / "full")[0]
    assert rec["step"] == 1 and rec["loss_fake"] > 0 and rec["grad_norm_generator"] > 0


def test_resume_reproduces_the_uninterrupted_run_bitwise(runs):
    a, b = metrics(runs.dir / "half"), metrics(runs.dir / "full")
    assert [r["step"] for r in a] == [1, 2] == [r["step"] for r in b]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    sa = ckpt.read_train_state(runs.dir / "half" / "checkpoints" / "state_000002.safetensors")[0]["roles"]
    sb = ckpt.read_train_state(runs.dir / "full" / "checkpoints" / "state_000002.safetensors")[0]["roles"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    lora = load_config(runs.dir / "half" / "config.yaml").roles
    for name in ("student_adapter.safetensors", "student_fake_adapter.safetensors"):
        xa, xb = ckpt.read_adapter(runs.dir / "half" / name, lora), ckpt.read_adapter(runs.dir / "full" / name, lora)
        assert xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa), name


def test_the_student_is_written_evaluated_and_starts_a_tdm_r1_run(runs, tmp_path):
    run = runs.dir / "full"
    summary = json.loads((run / "summary.json").read_text())
    held = summary["student_heldout"]
    assert summary["steps"] == 2 and held["n"] == 2 and held["nfe"] == 4 and 0 < held["reward_mean"] < 1
    assert (run / "eval_student.png").is_file() and (run / "student_pipeline" / "tdm_r1_export.json").is_file()
    # the adapter is the EMA generator's: as TDM-R1's roles.generator_init it rebuilds exactly its tensors
    from tdm_r1.checkpoint.sources import load_run_generator_init

    cfg = load_config(run / "config.yaml", [f"roles.generator_init={run / 'student_adapter.safetensors'}"])
    roles = runs.full[0]
    start = load_run_generator_init(cfg, roles.host.model)
    assert start.keys() == roles.adapter_tensors("generator_ema").keys()
    assert all(torch.equal(start[k], v) for k, v in roles.adapter_tensors("generator_ema").items())
    fake = ckpt.read_adapter(run / "student_fake_adapter.safetensors", cfg.roles)
    assert all(torch.equal(fake[k], v) for k, v in roles.adapter_tensors("fake").items())


def test_full_mode_writes_student_and_fake_pipelines(zimage_dir, tmp_path):
    built: list = []
    with one_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(tdm_r1.run, "build_roles", _spy(built))
        config = write_config(tmp_path, "zimage", zimage_dir, tmp_path / "run", 1, mode="full")
        assert main(["distill", "--config", str(config)]) == 0
    roles = built[0][0]
    from diffusers import ZImageTransformer2DModel

    for folder, role in (("student_pipeline", "generator_ema"), ("student_fake_pipeline", "fake")):
        loaded = ZImageTransformer2DModel.from_pretrained(tmp_path / "run" / folder, subfolder="transformer")
        want = getattr(roles, role).module.transformer.state_dict()
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), folder
    assert not (tmp_path / "run" / "student_adapter.safetensors").exists()


def test_distill_takes_a_published_lora_as_the_start(runs, tmp_path):
    """A distillation can continue from a published LoRA (e.g. a few-step LoRA someone released)."""
    run = runs.dir / "full"
    adapter = ckpt.read_adapter(run / "student_adapter.safetensors", load_config(run / "config.yaml").roles)
    from diffusers import StableDiffusion3Pipeline, ZImagePipeline

    pipeline = StableDiffusion3Pipeline if runs.kind == "sd3" else ZImagePipeline
    layers = {k.removeprefix("transformer."): v for k, v in adapter.items()}
    meta = {"r": 4, "lora_alpha": 8.0}
    pipeline.save_lora_weights(tmp_path / "pub", transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
    config = write_config(tmp_path, runs.kind, runs.source, tmp_path / "cont", 1)
    with one_thread():
        code = main(["distill", "--config", str(config), "--set",
                     f"roles.generator_init={tmp_path / 'pub' / 'pytorch_lora_weights.safetensors'}"])  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "cont" / "summary.json").read_text())["steps"] == 1
