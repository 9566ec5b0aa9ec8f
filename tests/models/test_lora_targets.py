"""LoRA targets per architecture: peft finds modules for every target on the tiny models, only inside the
transformer, and the roles code can put adapters on the diffusers adapters (reference = adapters disabled)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import HEIGHT, PROMPTS, WIDTH

from tdm_r1.config import RolesConfig
from tdm_r1.models.lora import lora_target_regex, lora_targets
from tdm_r1.roles import build_roles


def _lora_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]


@pytest.mark.parametrize("include_mlp", [False, True])
@pytest.mark.parametrize("kind", ["sd3", "zimage"])
def test_peft_finds_every_target(kind, include_mlp, request):
    model = copy.deepcopy(request.getfixturevalue(f"{kind}_model"))
    regex = lora_target_regex(kind, include_mlp)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=regex))
    found = _lora_modules(peft.base_model.model)
    assert found and all(n.startswith("transformer.") for n in found)
    for target in lora_targets(kind, include_mlp):
        hits = [n for n in found if n.endswith("." + target)]
        assert hits, f"{kind}: no module matches LoRA target {target!r}"
    # the list form on the bare transformer (peft's suffix matching) picks exactly the same modules
    bare = copy.deepcopy(request.getfixturevalue(f"{kind}_model").transformer)
    listed = get_peft_model(bare, LoraConfig(r=2, lora_alpha=4, target_modules=lora_targets(kind, include_mlp)))
    assert sorted(_lora_modules(listed.base_model.model)) == sorted(n.removeprefix("transformer.") for n in found)


def test_targets_match_the_architectures():
    assert lora_targets("zimage") == ["to_q", "to_k", "to_v", "to_out.0"]  # single stream: no add_* projections
    assert set(lora_targets("zimage", include_mlp=True)) - set(lora_targets("zimage")) == {
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    }
    assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= set(lora_targets("sd3"))
    assert not re.fullmatch(lora_target_regex("sd3"), "transformer.transformer_blocks.0.attn.to_out")
    with pytest.raises(ValueError, match="roles.lora_targets"):
        lora_targets("tiny_dit")


@pytest.mark.parametrize("kind", ["sd3", "zimage"])
def test_lora_roles_on_a_diffusers_adapter(kind, request):
    teacher = request.getfixturevalue(f"{kind}_model")
    cfg = RolesConfig(mode="lora", lora_rank=4, lora_alpha=8.0, lora_targets=lora_target_regex(kind))
    roles = build_roles(cfg, teacher, surrogate=False, fake=False)
    assert roles.host.model.frozen is teacher.frozen  # text encoders / VAE shared, not copied
    params = roles.generator.parameters()
    assert params and all(p.requires_grad for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)  # lora_B starts at zero: move it so the generator differs
    x = torch.randn(2, *teacher.latent_shape(HEIGHT, WIDTH))
    s = torch.tensor([0.9, 0.5])
    cond = teacher.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        v_teacher = teacher.velocity(x, s, cond)
        v_ref = roles.reference.velocity(x, s, cond)
        v_gen = roles.generator.velocity(x, s, cond)
    torch.testing.assert_close(v_ref, v_teacher, rtol=0, atol=1e-6)
    assert (v_gen - v_ref).abs().max() > 1e-3
