"""Adapter behaviour beyond the pipeline equivalence: loading errors, prompt cache, decode, precision, attention
backend fallback, gradient checkpointing, and how role copies share the frozen parts."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
from tiny_models import HEIGHT, PROMPTS, WIDTH, load, tiny_cfg

from tdm_r1.config import DiffusersConfig, ModelConfig
from tdm_r1.models.diffusers_common import ModelFolderError
from tdm_r1.models.load import load_diffusers_model
from tdm_r1.models.sd3 import DispatchJointAttnProcessor, SD3FlowModel
from tdm_r1.models.zimage import ZImageFlowModel

KINDS = ["sd3", "zimage"]


@pytest.fixture
def model(request):
    return request.getfixturevalue(f"{request.param}_model")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_through_config_dispatch(sd3_dir, zimage_dir):
    assert isinstance(load("sd3", sd3_dir), SD3FlowModel)
    assert isinstance(load("zimage", zimage_dir), ZImageFlowModel)
    with pytest.raises(ValueError, match="not a diffusers model"):
        load_diffusers_model(ModelConfig(kind="tiny_dit"), DiffusersConfig(path=str(sd3_dir)))


@pytest.mark.parametrize("kind", KINDS)
def test_missing_or_empty_path_is_a_clear_error(kind, tmp_path):
    with pytest.raises(ModelFolderError, match="diffusers.path is empty"):
        load_diffusers_model(ModelConfig(kind=kind), DiffusersConfig(path=""))
    with pytest.raises(ModelFolderError, match="not a local folder.*never from the Hub.*huggingface-cli download"):
        load_diffusers_model(ModelConfig(kind=kind), DiffusersConfig(path="org/some-hub-id"))


def test_incomplete_sd3_folder_names_every_missing_part(sd3_dir, tmp_path):
    broken = _copy(sd3_dir, tmp_path / "sd3")
    shutil.rmtree(broken / "text_encoder_3")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "tokenizer_2" / "tokenizer.json").unlink()
    (broken / "model_index.json").unlink()
    with pytest.raises(ModelFolderError) as e:
        load("sd3", broken)
    msg = str(e.value)
    for part in ("model_index.json", "text_encoder_3/", "vae/ weights", "tokenizer_2/ vocabulary"):
        assert part in msg, msg
    assert "stable-diffusion-3.5-medium" in msg


def test_missing_weight_shard_is_named(zimage_dir, tmp_path):
    broken = _copy(zimage_dir, tmp_path / "zi")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (broken / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=r"text_encoder/model-00001-of-00002.safetensors \(listed in"):
        load("zimage", broken)


def test_corrupt_weights_are_a_load_error_naming_the_folder(zimage_dir, tmp_path):
    broken = _copy(zimage_dir, tmp_path / "zi")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFolderError, match="could not load .* as a zimage diffusers folder"):
        load("zimage", broken)


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_latent_shape(model):
    assert model.latent_shape(HEIGHT, WIDTH) == (4, HEIGHT // 2, WIDTH // 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.latent_shape(HEIGHT + 2, WIDTH)


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_decode_in_chunks_matches_one_call_and_applies_scaling_and_shift(model):
    z = torch.randn(5, *model.latent_shape(HEIGHT, WIDTH))  # 5 = two chunks of 2 and a ragged chunk of 1
    images = model.decode(z)
    vae = model.vae
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    assert images.shape == (5, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, (ref / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


def _count_rows(encoders):
    rows = []
    hooks = [m.register_forward_hook(lambda mod, args, kw, out: rows.append(_batch(args, kw)), with_kwargs=True)
             for m in encoders]  # fmt: skip
    return rows, hooks


def _batch(args, kwargs) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.shape[0])


@pytest.mark.parametrize("kind", KINDS)
def test_each_unique_prompt_is_encoded_once(kind, request):
    model = load(kind, request.getfixturevalue(f"{kind}_dir"), prompt_cache_size=3, encode_batch_size=4)
    encoders = model._text_encoders()
    rows, hooks = _count_rows(encoders)
    calls, encode = [], model._encode
    model._encode = lambda prompts, device: calls.append(list(prompts)) or encode(prompts, device)
    try:
        group = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4  # two prompts, G = 4 samples each
        cond = model.encode_prompts(group)
        # one encoder call over the 2 unique prompts plus the empty prompt, padded to encode_batch_size
        assert calls == [[PROMPTS[0], PROMPTS[1], "", ""]] and rows == [4] * len(encoders)
        assert len(cond) == 8 and all(torch.equal(v[0], v[3]) for v in cond.fields.values())
        assert not torch.equal(cond.fields["prompt_embeds"][0], cond.fields["prompt_embeds"][4])
        again = model.encode_prompts([PROMPTS[1], PROMPTS[0]])
        assert len(calls) == 1 and rows == [4] * len(encoders)  # all cached
        assert torch.equal(again.fields["prompt_embeds"][1], cond.fields["prompt_embeds"][0])
        model.encode_prompts([PROMPTS[2], "one more"])  # cache holds 3: evicts the least recently used
        assert calls[1] == [PROMPTS[2], "one more", "", ""] and rows == [4] * (2 * len(encoders))
        assert list(model.frozen.cache) == [PROMPTS[0], PROMPTS[2], "one more"]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_a_prompts_embedding_does_not_depend_on_the_prompts_encoded_with_it(kind, request):
    # a resumed run's cache starts empty: its embeddings must equal those the uninterrupted run cached in other company
    model = load(kind, request.getfixturevalue(f"{kind}_dir"), encode_batch_size=4)
    together = model.encode_prompts(PROMPTS[:3]).fields
    for i, prompt in enumerate(PROMPTS[:3]):
        model.clear_prompt_cache()
        alone = model.encode_prompts([prompt]).fields
        for k in together:
            assert torch.equal(alone[k][0], together[k][i]), (prompt, k)


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_uncond_is_the_empty_prompt(model):
    cond = model.encode_prompts(PROMPTS[:2])
    empty = model.encode_prompts([""])
    for k, v in cond.uncond().fields.items():
        assert v.shape == cond.fields[k].shape
        assert torch.equal(v[1], empty.fields[k][0])


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_text_encoders_offload_and_come_back(model):
    model.offload_text_encoders()
    assert all(next(m.parameters()).device.type == "cpu" for m in model._text_encoders())
    model.clear_prompt_cache()
    cond = model.encode_prompts(["after offload"])
    assert cond.fields["prompt_embeds"].device == model.device


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_and_fp32_master_weights(kind, request):
    path = request.getfixturevalue(f"{kind}_dir")
    ref_model = request.getfixturevalue(f"{kind}_model")
    x = torch.randn(2, *ref_model.latent_shape(HEIGHT, WIDTH))
    s = torch.tensor([0.8, 0.4])
    ref = ref_model.velocity(x, s, ref_model.encode_prompts(PROMPTS[:2]))
    for master in (False, True):
        m = load(kind, path, dtype="bf16", master_weights_fp32=master)
        want = torch.float32 if master else torch.bfloat16
        assert {p.dtype for p in m.transformer.parameters()} == {want}
        assert {p.dtype for p in m.vae.parameters()} == {torch.bfloat16}
        v = m.velocity(x, s, m.encode_prompts(PROMPTS[:2]))
        assert v.dtype == torch.bfloat16
        # bf16 has 8 mantissa bits; measured max |diff| / max |ref|: SD3 7.0e-3 (pure bf16) / 6.0e-3 (fp32 master),
        # Z-Image 2.8e-2 / 1.7e-2
        err = ((v.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 6e-2, f"{kind} bf16 (master fp32={master}): relative error {err:.3g}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, package", [("flash", "flash_attn"), ("xformers", "xformers")])
def test_missing_attention_package_falls_back_to_sdpa_with_a_logged_reason(kind, backend, package, request, caplog):
    with caplog.at_level(logging.WARNING, logger="tdm_r1.models.diffusers_common"):
        m = load(kind, request.getfixturevalue(f"{kind}_dir"), attention_backend=backend)
    assert m.attention_backend == "sdpa"
    msg = caplog.text
    assert f"attention backend '{backend}' unavailable" in msg and f"`{package}` package is not installed" in msg
    assert "falling back to PyTorch SDPA" in msg


def test_sd3_dispatch_processor_equals_stock_processor(sd3_dir):
    # flash / xformers reach SD3 through this processor; with the native backend it must equal the stock one
    stock = load("sd3", sd3_dir)
    routed = load("sd3", sd3_dir)
    routed.transformer.set_attn_processor(DispatchJointAttnProcessor())
    routed.transformer.set_attention_backend("native")
    x = torch.randn(2, *stock.latent_shape(HEIGHT, WIDTH))
    s = torch.tensor([0.7, 0.2])
    cond = stock.encode_prompts(PROMPTS[:2])
    torch.testing.assert_close(routed.velocity(x, s, cond), stock.velocity(x, s, cond), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_switch_keeps_gradients(kind, request):
    path = request.getfixturevalue(f"{kind}_dir")
    grads = {}
    for ckpt in (False, True):
        m = load(kind, path, gradient_checkpointing=ckpt)
        assert m.transformer.gradient_checkpointing is ckpt
        x = torch.randn(2, *m.latent_shape(HEIGHT, WIDTH), generator=torch.Generator().manual_seed(0))
        m.velocity(x, torch.tensor([0.6, 0.3]), m.encode_prompts(PROMPTS[:2])).square().mean().backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in m.transformer.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_role_copies_share_frozen_parts_and_copy_the_transformer(model):
    clone = copy.deepcopy(model)
    assert clone.frozen is model.frozen  # text encoders, VAE, prompt cache: shared
    assert clone.transformer is not model.transformer
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith("transformer.") for n in names)  # only the transformer is a parameter owner


def test_tiny_cfg_is_a_valid_diffusers_section(sd3_dir):
    # the fixture config goes through the same strict loader as a YAML file would
    from tdm_r1.config import from_dict, to_dict

    cfg = tiny_cfg(sd3_dir, "sd3")
    assert from_dict(to_dict(cfg), DiffusersConfig) == cfg
