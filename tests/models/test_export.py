"""Export round trip: a trained generator (LoRA merged, LoRA kept as an adapter file, or full weights) written as a
diffusers folder that DiffusionPipeline.from_pretrained loads and samples from, giving our sampler's images."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import HEIGHT, PROMPTS, WIDTH, tiny_cfg

from tdm_r1.checkpoint.pipeline import EXPORT_INFO, LORA_FILE, export_diffusers_pipeline, split_lora
from tdm_r1.config import RolesConfig
from tdm_r1.models.lora import lora_target_regex
from tdm_r1.roles import build_roles
from tdm_r1.sampling import rollout

SHIFT = 2.0  # not the tiny folders' scheduler shift (3.0): the export must rewrite the scheduler
ALPHA = 8.0
# LoRA applied on the fly vs merged into the weights, and pipeline vs our loop: fp32 rounding only; measured max
# |image diff| 1.2e-6 (SD3 merged), at most 8.3e-7 for the others.
IMAGE_ATOL = 1e-5


def _trained_roles(model, kind: str):
    cfg = RolesConfig(mode="lora", lora_rank=4, lora_alpha=ALPHA, lora_targets=lora_target_regex(kind))
    roles = build_roles(cfg, model, surrogate=False, fake=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in roles.generator.parameters():  # stands in for training: lora_B away from zero
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return roles


def _our_images(role, noise):
    traj = rollout(role, role.encode_prompts(PROMPTS), noise, steps=4, shift=SHIFT)
    return role.decode(traj.sample)


def _pipeline_images(kind: str, path, out, noise, load_lora: bool):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    if load_lora:
        pipe.load_lora_weights(out, weight_name=LORA_FILE)
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((out / EXPORT_INFO).read_text())
    call = dict(info["pipeline_call"], max_sequence_length=tiny_cfg(path, kind).max_sequence_length)
    assert pipe.scheduler.config.shift == SHIFT and not pipe.scheduler.config.use_dynamic_shifting
    return pipe(
        prompt=list(PROMPTS), height=HEIGHT, width=WIDTH, latents=noise.clone(), output_type="pt", **call
    ).images


@pytest.mark.parametrize("mode", ["merged", "adapter", "full"])
@pytest.mark.parametrize("kind", ["sd3", "zimage"])
def test_export_round_trip(kind, mode, request, tmp_path):
    path = request.getfixturevalue(f"{kind}_dir")
    model = request.getfixturevalue(f"{kind}_model")
    roles = _trained_roles(model, kind)
    noise = torch.randn((len(PROMPTS), *model.latent_shape(HEIGHT, WIDTH)), generator=torch.Generator().manual_seed(3))
    ours = _our_images(roles.generator, noise)
    if mode == "full":
        state, merge = roles.export("generator"), False  # full weights, as full mode's roles hold them
    else:
        state, merge = roles.adapter_tensors("generator"), mode == "merged"
    link = mode == "full"  # the symlinked-components variant, once per model
    out = export_diffusers_pipeline(
        model, state, tmp_path / "export", merge_lora=merge, lora_alpha=ALPHA, shift=SHIFT, link_unchanged=link
    )
    assert (out / LORA_FILE).is_file() == (mode == "adapter")
    assert (out / "vae").is_symlink() == link and not (out / "transformer").is_symlink()
    theirs = _pipeline_images(kind, path, out, noise, load_lora=mode == "adapter")
    diff = (theirs - ours).abs().max().item()
    assert diff <= IMAGE_ATOL, f"{kind} {mode}: exported pipeline differs from our sampler by {diff:.3g}"
    # not vacuous: the trained generator samples differently from the untouched base
    base = _our_images(model, noise)
    assert (base - ours).abs().max() > 1e-2
    print(f"export {kind} {mode}: max|image diff| {diff:.3g}")


def test_export_refuses_bad_inputs(sd3_model, tmp_path):
    roles = _trained_roles(sd3_model, "sd3")
    lora = roles.adapter_tensors("generator")
    with pytest.raises(ValueError, match="lora_alpha"):
        export_diffusers_pipeline(sd3_model, lora, tmp_path / "a", merge_lora=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_diffusers_pipeline(sd3_model, lora, tmp_path / "b", merge_lora=True, lora_alpha=ALPHA)
    half = {k: v for k, v in lora.items() if "lora_A" in k}
    with pytest.raises(KeyError, match="without both lora_A and lora_B"):
        split_lora(half)
    assert not any(p.name.startswith(".a.tmp") for p in tmp_path.iterdir())  # no half-written folder left


def _reference_transformer(path, lora, state, dtype):
    """What export wrote before it streamed: the whole transformer loaded in fp32, the LoRA merged (or the full
    weights loaded), cast to `dtype`."""
    from tdm_r1.checkpoint.pipeline import merge_lora_into

    model = _transformer_cls(path).from_pretrained(path, subfolder="transformer", dtype=torch.float32)
    if lora is not None:
        merge_lora_into(model, lora, ALPHA)
    else:
        model.load_state_dict(state, strict=True)
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def _transformer_cls(path):
    from diffusers import SD3Transformer2DModel, ZImageTransformer2DModel

    name = json.loads((path / "transformer" / "config.json").read_text())["_class_name"]
    return {"SD3Transformer2DModel": SD3Transformer2DModel, "ZImageTransformer2DModel": ZImageTransformer2DModel}[name]


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("kind", ["sd3", "zimage"])
def test_export_streams_the_transformer_shard_by_shard(kind, mode, request, tmp_path, monkeypatch):
    """The merged transformer is written tensor by tensor from the source's (here sharded) safetensors files: equal,
    bit for bit, to loading it whole in fp32, merging and casting; no whole transformer is loaded on the way, and no
    written shard holds more than the shard size plus one tensor."""
    import shutil

    import safetensors.torch

    import tdm_r1.checkpoint.pipeline as pipeline
    from tdm_r1.models.sd3 import load_sd3
    from tdm_r1.models.zimage import load_zimage

    source = tmp_path / "sharded"  # the tiny folder with its transformer in several files, as real weights come
    shutil.copytree(request.getfixturevalue(f"{kind}_dir"), source)
    cls = _transformer_cls(source)
    whole = cls.from_pretrained(source, subfolder="transformer")
    shutil.rmtree(source / "transformer")
    whole.save_pretrained(source / "transformer", max_shard_size="40KB")
    assert len(list((source / "transformer").glob("*.safetensors"))) > 2
    model = (load_sd3 if kind == "sd3" else load_zimage)(tiny_cfg(source, kind))
    roles = _trained_roles(model, kind)
    lora = split_lora(roles.adapter_tensors("generator")) if mode == "lora" else None
    state = None if lora else {k.removeprefix("transformer."): v for k, v in roles.export("generator").items()}
    want = _reference_transformer(source, lora, state, torch.bfloat16)

    written = []
    real_save = safetensors.torch.save_file

    def save_file(tensors, *args, **kwargs):
        written.append(dict(tensors))
        return real_save(tensors, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    def no_whole_load(*args, **kwargs):
        raise AssertionError("export loaded the whole transformer")

    monkeypatch.setattr(cls, "from_pretrained", no_whole_load)
    shard = 8 << 10
    export = roles.adapter_tensors("generator") if mode == "lora" else roles.export("generator")
    monkeypatch.setattr(pipeline, "SHARD_BYTES", shard)
    out = export_diffusers_pipeline(model, export, tmp_path / "out", lora_alpha=ALPHA, dtype=torch.bfloat16)
    monkeypatch.undo()

    sizes = [sum(t.numel() * t.element_size() for t in s.values()) for s in written]
    largest = max(t.numel() * t.element_size() for s in written for t in s.values())
    assert len(written) > 2 and all(size < shard + largest for size in sizes), sizes
    assert json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    got = cls.from_pretrained(out, subfolder="transformer", dtype=torch.bfloat16).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]
    assert all(v.dtype == torch.bfloat16 for v in got.values() if v.is_floating_point())
