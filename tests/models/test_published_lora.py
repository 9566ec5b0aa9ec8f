"""Published LoRA files as a run's starting generator (roles.generator_init in lora mode): files written by peft's
`save_pretrained` and by diffusers' `save_lora_weights` (with and without its adapter metadata), and kohya key names,
on the tiny SD3 and Z-Image configs. The expectation is the source adapter's own merged update (peft's
get_delta_weight of the module that was saved): the generator built from the file carries exactly that update, under
a run whose lora_alpha differs from the file's."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from tdm_r1.checkpoint import CheckpointError
from tdm_r1.checkpoint.published_lora import read_lora_init, read_published_lora
from tdm_r1.config import RolesConfig
from tdm_r1.models.lora import lora_target_regex, lora_targets
from tdm_r1.roles import build_roles

KINDS = ["sd3", "zimage"]
RANK, FILE_ALPHA = 4, 8.0


def _kind(model) -> str:
    return "sd3" if "SD3" in type(model).__name__ else "zimage"


@pytest.fixture
def model(request):
    return request.getfixturevalue(f"{request.param}_model")


def roles_cfg(kind, rank=RANK, alpha=3.0, include_mlp=False) -> RolesConfig:
    return RolesConfig(mode="lora", lora_rank=rank, lora_alpha=alpha, lora_targets=lora_target_regex(kind, include_mlp))


def source_adapter(model, kind, alpha=FILE_ALPHA, include_mlp=False, diffusers_api=False):
    """A copy of the transformer with a LoRA (random A and B) as peft or diffusers add it, and its expected update per
    module path: peft's own delta weight."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    transformer = copy.deepcopy(model.transformer)
    config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=lora_targets(kind, include_mlp))
    if diffusers_api:
        transformer.add_adapter(config)
        wrapped = transformer
    else:
        wrapped = get_peft_model(transformer, config)
    g = torch.Generator().manual_seed(3)
    deltas = {}
    with torch.no_grad():
        for name, m in transformer.named_modules():
            if isinstance(m, LoraLayer):
                for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                deltas[name.removeprefix("base_model.model.")] = m.get_delta_weight("default").clone()
    return wrapped, config, deltas


def generator_deltas(model, tensors, cfg) -> dict[str, torch.Tensor]:
    """What the generator built from adapter tensors adds to each target's weight (its merged export minus the base)."""
    roles = build_roles(cfg, model, surrogate=False, fake=False, generator_init=tensors)
    merged = roles.export("generator")
    base = model.state_dict()
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    return {k[len("transformer.") : -len(".weight")]: merged[k] - base[k] for k in changed}


def assert_same_updates(got, want):
    assert sorted(got) == sorted(want)
    for name, d in want.items():
        torch.testing.assert_close(got[name], d, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_peft_save_pretrained_folder(model, tmp_path):
    kind = _kind(model)
    wrapped, _, deltas = source_adapter(model, kind)
    wrapped.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    cfg = roles_cfg(kind)
    tensors = read_lora_init(tmp_path / "peft", cfg, model)
    assert read_published_lora(tmp_path / "peft").kind == "peft"
    assert_same_updates(generator_deltas(model, tensors, cfg), deltas)


def _save_diffusers(kind, transformer, config, folder, with_metadata: bool):
    from diffusers import StableDiffusion3Pipeline, ZImagePipeline
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusion3Pipeline if kind == "sd3" else ZImagePipeline
    meta = config.to_dict() if with_metadata else None
    pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                               transformer_lora_adapter_metadata=meta)  # fmt: skip
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_diffusers_save_lora_weights_with_metadata(model, tmp_path):
    kind = _kind(model)
    transformer, config, deltas = source_adapter(model, kind, diffusers_api=True)
    path = _save_diffusers(kind, transformer, config, tmp_path / "d", with_metadata=True)
    assert all(k.startswith("transformer.") for k in load_file(str(path)))
    cfg = roles_cfg(kind)
    for where in (path, path.parent):  # the file or its folder
        assert_same_updates(generator_deltas(model, read_lora_init(where, cfg, model), cfg), deltas)


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_diffusers_file_without_metadata_means_alpha_equals_rank(model, tmp_path):
    kind = _kind(model)
    transformer, config, deltas = source_adapter(model, kind, alpha=float(RANK), diffusers_api=True)
    path = _save_diffusers(kind, transformer, config, tmp_path / "d", with_metadata=False)
    cfg = roles_cfg(kind, alpha=16.0)
    assert_same_updates(generator_deltas(model, read_lora_init(path, cfg, model), cfg), deltas)


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_kohya_key_names_with_alpha(model, tmp_path):
    kind = _kind(model)
    wrapped, _, deltas = source_adapter(model, kind, alpha=2.0)
    out = {}
    for k, v in wrapped.state_dict().items():
        if ".lora_A.default." in k or ".lora_B.default." in k:
            module = k.removeprefix("base_model.model.").split(".lora_")[0]
            flat = "lora_unet_" + module.replace(".", "_")
            out[f"{flat}.{'lora_down' if '.lora_A.' in k else 'lora_up'}.weight"] = v.contiguous()
            out[f"{flat}.alpha"] = torch.tensor(2.0)
    save_file(out, str(tmp_path / "kohya.safetensors"))
    cfg = roles_cfg(kind)
    tensors = read_lora_init(tmp_path / "kohya.safetensors", cfg, model)
    assert read_published_lora(tmp_path / "kohya.safetensors").kind == "kohya"
    assert_same_updates(generator_deltas(model, tensors, cfg), deltas)


def test_rank_and_target_mismatches_name_what_to_set(sd3_model, tmp_path):
    wrapped, _, _ = source_adapter(sd3_model, "sd3")
    wrapped.save_pretrained(tmp_path / "peft")
    rank = r"rank 4 at transformer_blocks\.0\..*roles\.lora_rank is 2: set roles\.lora_rank: 4"
    with pytest.raises(CheckpointError, match=rank):
        read_lora_init(tmp_path / "peft", roles_cfg("sd3", rank=2), sd3_model)
    with pytest.raises(CheckpointError, match=r"roles\.lora_targets modules the file lacks: \d+ \(.*ff\.net") as e:
        read_lora_init(tmp_path / "peft", roles_cfg("sd3", include_mlp=True), sd3_model)
    assert "layers outside" not in str(e.value)
    wide, _, _ = source_adapter(sd3_model, "sd3", include_mlp=True)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"peft LoRA\): layers outside roles\.lora_targets: \d+ \(.*ff"):
        read_lora_init(tmp_path / "wide", roles_cfg("sd3"), sd3_model)


def test_foreign_and_broken_files_are_named(sd3_model, tmp_path):
    cfg = roles_cfg("sd3")
    with pytest.raises(CheckpointError, match="no such LoRA file or folder"):
        read_lora_init(tmp_path / "absent", cfg, sd3_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no LoRA weights in this folder \(looked for adapter_model"):
        read_lora_init(tmp_path / "empty", cfg, sd3_model)
    save_file({"model.layer.weight": torch.zeros(2, 2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match=r"not a LoRA format tdm-r1 reads \(keys like \['model\.layer\.weight'\]"):
        read_lora_init(tmp_path / "foreign.safetensors", cfg, sd3_model)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable .safetensors LoRA file"):
        read_lora_init(tmp_path / "junk.safetensors", cfg, sd3_model)
    wrapped, _, _ = source_adapter(sd3_model, "sd3")
    wrapped.save_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="without adapter_config.json"):
        read_lora_init(tmp_path / "peft", cfg, sd3_model)
    a = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}
    save_file(a, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 layers have only one of lora_A / lora_B"):
        read_lora_init(tmp_path / "half.safetensors", cfg, sd3_model)
    save_file({**a, "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.zeros(8)},
              str(tmp_path / "dora.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match="a DoRA adapter"):
        read_lora_init(tmp_path / "dora.safetensors", cfg, sd3_model)


def test_a_lora_of_another_model_is_refused_by_shape(sd3_model, tmp_path):
    wrapped, _, _ = source_adapter(sd3_model, "sd3")
    wrapped.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(RANK, tensors[key].shape[1] + 1)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"has A \(4, \d+\) .* a LoRA of another model"):
        read_lora_init(tmp_path / "peft", roles_cfg("sd3"), sd3_model)


def test_roles_generator_init_and_fake_init_take_published_files(sd3_dir, sd3_model, tmp_path):
    """Through a run's config: generator_init a diffusers file, fake_init a peft folder (the loader a run uses)."""
    import yaml
    from tiny_models import train_config

    from tdm_r1.checkpoint.sources import load_run_generator_init
    from tdm_r1.config import load_config

    transformer, config, g_deltas = source_adapter(sd3_model, "sd3", diffusers_api=True)
    g_path = _save_diffusers("sd3", transformer, config, tmp_path / "g", with_metadata=True)
    wrapped, _, f_deltas = source_adapter(sd3_model, "sd3", alpha=1.0)
    wrapped.save_pretrained(tmp_path / "f")
    raw = train_config(tmp_path, "sd3", sd3_dir, tmp_path / "run", {})
    raw["roles"] |= {"generator_init": str(g_path), "fake_init": str(tmp_path / "f")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    generator = load_run_generator_init(cfg, sd3_model)
    fake = load_run_generator_init(cfg, sd3_model, field="fake_init")
    assert_same_updates(generator_deltas(sd3_model, generator, cfg.roles), g_deltas)
    assert_same_updates(generator_deltas(sd3_model, fake, cfg.roles), f_deltas)
