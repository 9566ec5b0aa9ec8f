"""`tdm-r1 sample` and `tdm-r1 eval` on diffusers runs (tiny SD3 / Z-Image folders, tiny_models.py): every source a
user has - the run directory, a training state, the run's student_pipeline/, `tdm-r1 export` folders (LoRA merged or
kept beside the transformer) - samples what diffusers' own pipeline makes from the exported folder, and eval pairs two
models on the same noise."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_distill_diffusers import write_config
from tiny_models import HEIGHT, SD3_SEQ, WIDTH, ZIMAGE_SEQ, exported_pipeline_images, load

from tdm_r1.cli import main
from tdm_r1.config import load_config

PROMPTS = ["a green cat", "red cube", 'a sign that says "hi"']


@dataclass
class Run:
    kind: str
    source: Path
    dir: Path
    config: Path

    @property
    def seq(self) -> int:
        return SD3_SEQ if self.kind == "sd3" else ZIMAGE_SEQ

    def sets(self) -> list[str]:
        """What a bare folder needs to be sampled like the run (the run's own config carries it)."""
        out = []
        for k, v in (("height", HEIGHT), ("width", WIDTH), ("dtype", "fp32"), ("max_sequence_length", self.seq)):
            out += ["--set", f"diffusers.{k}={v}"]
        return out + ["--set", "diffusers.vae_decode_chunk=2"]


@pytest.fixture(scope="module", params=["sd3", "zimage"])
def run(request, tmp_path_factory) -> Run:
    kind = request.param
    source = request.getfixturevalue(f"{kind}_dir")
    d = tmp_path_factory.mktemp(f"eval_{kind}")
    config = write_config(d, kind, source, d / "run", 2)  # 2 steps: every LoRA matrix has moved
    raw = yaml.safe_load(config.read_text())
    raw["optim"] |= {"generator_lr": 1e-2, "generator_ema_decay": 0.0}  # samples that differ from the teacher's
    config.write_text(yaml.safe_dump(raw))
    assert main(["distill", "--config", str(config)]) == 0
    assert main(["export", "--checkpoint", str(d / "run"), "--out", str(d / "merged")]) == 0
    assert main(["export", "--checkpoint", str(d / "run"), "--lora", "adapter", "--out", str(d / "adapter")]) == 0
    return Run(kind, source, d, config)


def _png_images(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("[0-9]*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files]).float() / 255


def _noise(run: Run, n: int, seed: int) -> torch.Tensor:
    shape = load(run.kind, run.dir / "merged").latent_shape(HEIGHT, WIDTH)
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_every_source_samples_what_the_exported_pipeline_makes(run, tmp_path):
    theirs = exported_pipeline_images(run.dir / "merged", PROMPTS, _noise(run, len(PROMPTS), 7), run.seq)
    teacher = None
    sources = {
        "run directory": run.dir / "run",
        "training state": run.dir / "run" / "checkpoints" / "state_000002.safetensors",
        "student_pipeline/": run.dir / "run" / "student_pipeline",
        "export (merged)": run.dir / "merged",
        "export (adapter kept)": run.dir / "adapter",
        "teacher folder": run.source,
    }
    for name, src in sources.items():
        out = tmp_path / name.replace(" ", "_").replace("/", "")
        args = ["sample", "--checkpoint", str(src), *PROMPTS, "--seed", "7", "--out", str(out / "grid.png")]
        extra = ["--nfe", "4", "--cfg", "1", "--shift", "3"] if name == "teacher folder" else []
        assert main([*args, *extra, "--images", str(out), *run.sets()]) == 0, name
        ours = _png_images(out)
        assert (out / "prompts.txt").read_text().splitlines() == PROMPTS and (out / "grid.png").is_file()
        if name == "teacher folder":
            teacher = ours
            continue
        # the same generator and noise; PNGs round to 1/255 (the float images agree to 1e-5: test_train_diffusers)
        assert (ours - theirs).abs().max() <= 1.0 / 255 + 1e-6, name
    assert (teacher - theirs).abs().max() > 4.0 / 255  # not vacuous: distilling moved the samples


def test_eval_pairs_two_models_on_the_same_items_noise_and_seeds(run, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(run.dir / "run"), "--against", str(run.source), "--seeds", "2"]
    assert main([*args, "--config", str(run.config), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    b, paired = r["against"], r["paired"]
    heldout = (run.dir / "heldout.txt").read_text().splitlines()
    assert r["n"] == b["n"] == 2 * len(heldout) and r["seeds"] == b["seeds"] == [1234, 1235]
    assert (r["nfe"], r["cfg"]) == (4, 1.0)  # a state samples as the few-step generator it is
    sample = load_config(str(run.config)).sample  # a plain folder (the teacher) as the config's sample section says
    assert (b["nfe"], b["cfg"], b["shift"]) == (sample.nfe, sample.cfg, sample.shift) and sample.nfe > 4
    per = [x - y for x, y in zip(r["reward_mean_per_seed"], b["reward_mean_per_seed"])]
    assert paired["per_seed"] == pytest.approx(per)
    assert paired["items_better"] + paired["items_equal"] + paired["items_worse"] == r["n"]
    assert len(r["per_item"]) == 2 and all(len(s) == len(heldout) for s in r["per_item"])
    assert r["per_item"] != b["per_item"]
    assert out.with_suffix(".png").is_file() and (tmp_path / "eval_pairs.png").is_file()

    same = tmp_path / "same.json"  # a model against itself: every paired difference is exactly 0
    args = ["eval", "--checkpoint", str(run.dir / "merged"), "--against", str(run.dir / "run"), "--seeds", "2"]
    args += ["--config", str(run.config), "--prompts", str(run.dir / "train.txt")]
    assert main([*args, "--out", str(same)]) == 0
    s = json.loads(same.read_text())
    assert s["split"].endswith("train.txt") and s["n"] == 2 * 4
    flat = lambda r: [v for seed in r["per_item"] for v in seed]
    assert flat(s) == pytest.approx(flat(s["against"]), abs=1e-5)
    assert s["paired"]["reward_mean"] == pytest.approx(0.0, abs=1e-5)


def test_sources_that_are_not_models_are_named(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    adapter = run.dir / "run" / "student_adapter.safetensors"
    cases = [
        (["--checkpoint", str(empty)], "neither a diffusers pipeline folder"),
        (["--checkpoint", str(tmp_path / "nope")], "no such file or folder"),
        (["--checkpoint", str(adapter)], "is loaded through roles.generator_init"),
        (["--checkpoint", str(run.dir / "merged"), "--role", "fake"], "only a training state or run directory"),
        (["--checkpoint", str(run.dir / "run"), "--role", "surrogate"], "has no role 'surrogate'"),
    ]
    for args, message in cases:
        assert main(["sample", *args, "red cube", "--out", str(tmp_path / "x.png"), *run.sets()]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "x.png").exists()


def test_export_reads_no_model_weights_but_the_transformer_s(run, tmp_path, monkeypatch):
    """`tdm-r1 export` streams the transformer from the source folder: the pipeline (text encoders, VAE) and the
    transformer are never loaded, and what it writes is the fixture's export, bit for bit."""
    import diffusers
    import safetensors.torch

    import tdm_r1.models.load

    def refuse(*args, **kwargs):
        raise AssertionError("export loaded a model")

    monkeypatch.setattr(tdm_r1.models.load, "load_diffusers_model", refuse)
    for cls in (diffusers.SD3Transformer2DModel, diffusers.ZImageTransformer2DModel, diffusers.DiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    assert main(["export", "--checkpoint", str(run.dir / "run"), "--out", str(tmp_path / "again")]) == 0
    monkeypatch.undo()
    weights = lambda d: safetensors.torch.load_file(str(d / "transformer" / "diffusion_pytorch_model.safetensors"))
    a, b = weights(tmp_path / "again"), weights(run.dir / "merged")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
