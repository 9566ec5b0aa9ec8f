"""`tdm-r1 train` on the tiny SD3 and Z-Image folders (tiny_models.py), through the command users run, with a cheap
non-differentiable reward (dark_fraction) on the decoded images and prompts from files.

Per model, three runs of the recipe's setup (LoRA roles, P=2 prompts x G=2 samples, two optimizer steps per epoch):
`half` trains 1 epoch, then `--resume`s to 2; `full` trains 2 epochs in one go. The roles each run builds are caught at
construction (a spy on build_roles) with a copy of every tensor, so the tests see what training did to each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import PROMPTS, SD3_SEQ, ZIMAGE_SEQ, exported_pipeline_images, one_thread, train_config
from utils import role_named_parameters

import tdm_r1.roles
import tdm_r1.run
from tdm_r1 import checkpoint as ckpt
from tdm_r1.cli import main
from tdm_r1.sampling import rollout

HELDOUT = ['a sign that says "mat"', "a blue cat"]  # what tiny_models.train_config writes
FROZEN_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
# exported pipeline vs our sampler on the live EMA generator: fp32 rounding only (measured <= 1.2e-6 in test_export)
IMAGE_ATOL = 1e-5


def write_config(d: Path, kind: str, path: Path, run_dir: Path, epochs: int) -> Path:
    train = {
        "epochs": epochs,
        "optimizer_steps_per_epoch": 2,  # LoRA A matrices get gradients once B has moved, at the second step
        "eval_baselines": True,
    }
    cfg = train_config(
        d,
        kind,
        path,
        run_dir,
        train,
        diffusers={"vae_decode_chunk": 2},
        optim={"weight_decay": 0.0},  # a tensor without gradient must not move
        sample={"nfe": 2},  # the teacher baseline's sampler
    )
    out = d / f"{run_dir.name}_{epochs}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def all_tensors(roles) -> dict[str, torch.Tensor]:
    """Every tensor a run holds: each role's own (adapters in lora mode, the shared base under `reference`) and the
    frozen text encoders and VAE."""
    host = roles.host.model if roles.host is not None else None
    out = {f"{n}/{k}": p for n, r in roles.active().items() for k, p in role_named_parameters(r, host)}
    pipe = (host or roles.reference.module).frozen.pipe
    for part in FROZEN_PARTS:
        module = getattr(pipe, part, None)
        if module is not None:
            out |= {f"frozen/{part}/{k}": p for k, p in module.named_parameters()}
    return out


@dataclass
class Runs:
    kind: str
    source: Path
    dir: Path
    half: tuple  # (roles of the 1-epoch run, their tensors at construction)
    full: tuple  # the same for the uninterrupted 2-epoch run


@pytest.fixture(scope="module", params=["sd3", "zimage"])
def runs(request, tmp_path_factory) -> Runs:
    kind = request.param
    source = request.getfixturevalue(f"{kind}_dir")
    d = tmp_path_factory.mktemp(f"train_{kind}")
    built = []
    real = tdm_r1.roles.build_roles

    def spy(*args, **kwargs):
        roles = real(*args, **kwargs)
        built.append((roles, {k: p.detach().clone() for k, p in all_tensors(roles).items()}))
        return roles

    with one_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(tdm_r1.run, "build_roles", spy)  # the run builder wires the roles
        assert main(["train", "--config", str(write_config(d, kind, source, d / "half", 1))]) == 0
        resume = write_config(d, kind, source, d / "half", 2)
        assert main(["train", "--config", str(resume), "--resume"]) == 0
        assert main(["train", "--config", str(write_config(d, kind, source, d / "full", 2))]) == 0
    return Runs(kind, source, d, built[0], built[2])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def unreachable(kind: str, roles) -> str | None:
    """Name fragment of the adapters no loss can reach: SD3's last block is context_pre_only, so the text stream's
    output after it is discarded and its text query projection (add_q_proj) has no gradient path."""
    if kind != "sd3":
        return None
    base = roles.host.model if roles.host is not None else roles.reference.module
    return f"transformer_blocks.{len(base.transformer.transformer_blocks) - 1}.attn.add_q_proj."


def test_one_epoch_changes_every_trainable_tensor_of_every_role_and_no_frozen_one(runs):
    roles, before = runs.half
    now = all_tensors(roles)
    trainable = {id(p) for ps in roles.trainable().values() for p in ps}
    shadows = {id(p) for r in ("generator_ema", "slow_surrogate") for p in getattr(roles, r).parameters()}
    assert trainable and shadows
    dead = unreachable(runs.kind, roles)
    changed = {k for k, p in now.items() if not torch.equal(p, before[k])}
    for k, p in now.items():
        if (id(p) in trainable or id(p) in shadows) and not (dead and dead in k):
            assert k in changed, f"trainable {k} did not change"
        else:
            assert k not in changed, f"frozen {k} changed"
    assert {k.split("/")[0] for k in changed} == {"generator", "fake", "surrogate", "generator_ema", "slow_surrogate"}
    assert any(k.startswith("frozen/vae/") for k in now) and any(k.startswith("reference/") for k in now)
    rec = metrics(runs.dir / "half")[0]
    assert rec["epoch"] == 1 and rec["adv_abs_mean"] > 0  # the reward separates samples within groups


def test_run_writes_summary_checkpoint_report_and_pipeline(runs):
    run = runs.dir / "full"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["checkpoint"] == str(run / "pipeline")
    for key in ("teacher_32nfe_cfg", "teacher_4nfe", "tdm_4nfe", "tdm_r1_4nfe"):
        result = summary[key]
        assert result["n"] == len(HELDOUT) and result["n_failed"] == 0 and 0 < result["reward_mean"] < 1, key
    assert summary["teacher_32nfe_cfg"]["nfe"] == 2 and summary["tdm_r1_4nfe"]["nfe"] == 4
    assert [p.name for p in ckpt.list_train_states(run)] == ["state_000001.safetensors", "state_000002.safetensors"]
    info = ckpt.read_train_state(ckpt.list_train_states(run)[-1])[1]
    assert info["config"]["model"]["kind"] == runs.kind and info["config"]["prompts"]["heldout"].endswith("heldout.txt")
    assert "| TDM-R1, 4 NFE |" in (run / "report.md").read_text() and (run / "samples_end.png").is_file()
    assert (run / "pipeline" / "tdm_r1_export.json").is_file() and (run / "pipeline" / "vae").is_symlink()
    assert all(math.isfinite(r["loss_gen"]) and math.isfinite(r["loss_sur"]) for r in metrics(run))


def test_resume_reproduces_the_uninterrupted_run(runs):
    a, b = metrics(runs.dir / "half"), metrics(runs.dir / "full")
    assert [r["epoch"] for r in a] == [1, 2] == [r["epoch"] for r in b]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("sec_")}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    sa = ckpt.read_train_state(runs.dir / "half" / "checkpoints" / "state_000002.safetensors")[0]["roles"]
    sb = ckpt.read_train_state(runs.dir / "full" / "checkpoints" / "state_000002.safetensors")[0]["roles"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("lora", ["merge", "adapter"])
def test_export_writes_a_pipeline_that_samples_the_ema_generator(runs, lora, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(runs.dir / "full"), "--out", str(out), "--lora", lora]) == 0
    assert not any(p.is_symlink() for p in out.iterdir())  # standalone, unlike the run's own pipeline/
    roles = runs.full[0]
    with one_thread(), torch.no_grad():
        ema = roles.generator_ema
        noise = torch.randn((len(PROMPTS), *ema.latent_shape(16, 24)), generator=torch.Generator().manual_seed(5))
        ours = ema.decode(rollout(ema, ema.encode_prompts(PROMPTS), noise, steps=4, shift=3.0).sample)
        seq = SD3_SEQ if runs.kind == "sd3" else ZIMAGE_SEQ
        theirs = exported_pipeline_images(out, PROMPTS, noise, seq)
        at_end = exported_pipeline_images(runs.dir / "full" / "pipeline", PROMPTS, noise, seq)
        base = roles.reference
        untrained = base.decode(rollout(base, base.encode_prompts(PROMPTS), noise, steps=4, shift=3.0).sample)
    assert (theirs - ours).abs().max() <= IMAGE_ATOL
    assert (at_end - ours).abs().max() <= IMAGE_ATOL
    assert (untrained - ours).abs().max() > 1e-4  # not vacuous: training moved the EMA generator's samples


def test_export_refuses_a_non_empty_folder(runs, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(runs.dir / "full"), "--out", str(out)]) == 2
    assert f"{out} exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_missing_prompt_files_are_a_clear_cli_error(sd3_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, "sd3", sd3_dir, tmp_path / "run", 1)
    assert main(["train", "--config", str(cfg), "--set", "prompts.heldout="]) == 2
    assert "prompts.heldout is empty" in capsys.readouterr().err
    missing = tmp_path / "nope.txt"
    assert main(["train", "--config", str(cfg), "--set", f"prompts.train={missing}"]) == 2
    assert f"prompt file not found: {missing}" in capsys.readouterr().err
    # the ocr reward reads the quoted text of every prompt: a prompt without one is refused before any model loads
    assert main(["train", "--config", str(cfg), "--set", "train.rewards=[{name: ocr}]"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'train.txt'}:2: 'red cube' has no double-quoted target text" in err


def test_full_mode_run_exports_the_ema_transformer(zimage_dir, tmp_path):
    """full mode: every role its own transformer copy; the export writes the EMA generator's whole transformer (its
    buffers taken from the source folder, since training states hold parameters only)."""
    cfg = write_config(tmp_path, "zimage", zimage_dir, tmp_path / "run", 1)
    built = []
    real = tdm_r1.roles.build_roles
    with one_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(tdm_r1.run, "build_roles", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
        overrides = ["--set", "roles.mode=full", "--set", "train.eval_baselines=false"]
        assert main(["train", "--config", str(cfg), *overrides]) == 0
        assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
        ema = built[0].generator_ema
        assert built[0].mode == "full" and ema.module is not built[0].reference.module
        noise = torch.randn((len(PROMPTS), *ema.latent_shape(16, 24)), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ours = ema.decode(rollout(ema, ema.encode_prompts(PROMPTS), noise, steps=4, shift=3.0).sample)
            ref = built[0].reference
            untrained = ref.decode(rollout(ref, ref.encode_prompts(PROMPTS), noise, steps=4, shift=3.0).sample)
        theirs = exported_pipeline_images(tmp_path / "export", PROMPTS, noise, ZIMAGE_SEQ)
    assert (theirs - ours).abs().max() <= IMAGE_ATOL
    assert (untrained - ours).abs().max() > 1e-4
