"""Model roles: adapter / copy wiring, gradient isolation, shadows, export."""

import pytest
import torch

from tdm_r1.checkpoint import read_adapter, save_adapter
from tdm_r1.config import Config, ConfigError, ModelConfig, RolesConfig, WorldConfig
from tdm_r1.models.tiny_dit import build_tiny_dit
from tdm_r1.optim import update_shadow
from tdm_r1.roles import build_roles

MODEL = ModelConfig(dim=32, depth=2, heads=2, text_layers=1)
WORLD = WorldConfig(width=32)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    m = build_tiny_dit(MODEL, WORLD).eval()
    with torch.no_grad():
        for p in m.parameters():  # the zero-initialised output layer would hide every other weight
            p.add_(torch.randn_like(p) * 0.05)
    return m.requires_grad_(False)


@pytest.fixture
def inputs(teacher):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 16, 32, generator=g)
    return x, torch.rand(3, generator=g), teacher.encode_prompts(["a", "bc", ""])


def _perturb(params, scale=0.1):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_every_role_starts_at_the_teacher(mode, teacher, inputs):
    roles = build_roles(RolesConfig(mode=mode), teacher)
    v_t = teacher.velocity(*inputs)
    assert set(roles.active()) == {"reference", "generator", "generator_ema", "fake", "surrogate", "slow_surrogate"}
    for name, role in roles.active().items():
        assert torch.allclose(role.velocity(*inputs), v_t, atol=1e-6), name


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("trained", ["generator", "fake", "surrogate"])
def test_gradient_reaches_only_the_role_used(mode, trained, teacher, inputs):
    roles = build_roles(RolesConfig(mode=mode), teacher)
    if mode == "lora":  # lora_B starts at zero, which would block lora_A's gradient
        _perturb([p for r in roles.active().values() for p in r.parameters()], 0.01)
    roles.reference.velocity(*inputs)  # peft's disable_adapter toggles requires_grad; it must be restored
    getattr(roles, trained).velocity(*inputs).square().mean().backward()
    for name, role in roles.active().items():
        for p in role.parameters():
            if name == trained:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
    assert all(p.grad is None for p in teacher.parameters())
    if mode == "lora":
        base = [p for n, p in roles.host.model.named_parameters() if "lora_" not in n]
        assert base and all(not p.requires_grad and p.grad is None for p in base)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reference_ignores_trained_roles_and_teacher_is_untouched(mode, teacher, inputs):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    roles = build_roles(RolesConfig(mode=mode), teacher)
    _perturb(roles.generator.parameters())
    _perturb(roles.fake.parameters())
    v_t = teacher.velocity(*inputs)
    assert torch.allclose(roles.reference.velocity(*inputs), v_t, atol=1e-6)
    assert not torch.allclose(roles.generator.velocity(*inputs), v_t, atol=1e-3)
    assert not torch.allclose(roles.generator.velocity(*inputs), roles.fake.velocity(*inputs), atol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_shadow_ema_and_export(mode, teacher, inputs):
    roles = build_roles(RolesConfig(mode=mode), teacher, surrogate=False)
    assert roles.surrogate is None and roles.slow_surrogate is None
    _perturb(roles.generator.parameters())
    gen, ema = roles.generator.parameters(), roles.generator_ema.parameters()
    old = [p.clone() for p in ema]
    update_shadow(roles, "generator_ema", 0.75)
    for o, e, g in zip(old, ema, gen):
        assert torch.allclose(e, 0.75 * o + 0.25 * g)
    update_shadow(roles, "generator_ema", 0.0)
    model = build_tiny_dit(MODEL, WORLD).eval()
    model.load_state_dict(roles.export("generator_ema"))
    assert torch.allclose(model.velocity(*inputs), roles.generator.velocity(*inputs), atol=1e-5)


def test_state_tensors_round_trip_and_mismatch(teacher, inputs):
    a = build_roles(RolesConfig(), teacher, surrogate=False)
    _perturb([p for r in a.active().values() for p in r.parameters()])
    b = build_roles(RolesConfig(), teacher, surrogate=False)
    b.load_state_tensors(a.state_tensors())
    assert torch.equal(a.fake.velocity(*inputs), b.fake.velocity(*inputs))
    with pytest.raises(KeyError, match="missing"):
        build_roles(RolesConfig(), teacher).load_state_tensors(a.state_tensors())
    with pytest.raises(KeyError, match="missing"):
        build_roles(RolesConfig(mode="full"), teacher, surrogate=False).load_state_tensors(a.state_tensors())


def test_lora_generator_starts_from_saved_adapter(teacher, inputs, tmp_path):
    cfg = Config(model=MODEL, world=WORLD)
    a = build_roles(cfg.roles, teacher, surrogate=False)
    _perturb(a.generator.parameters())
    update_shadow(a, "generator_ema", 0.0)
    save_adapter(tmp_path / "ad.safetensors", a.adapter_tensors("generator_ema"), cfg)
    b = build_roles(cfg.roles, teacher, generator_init=read_adapter(tmp_path / "ad.safetensors", cfg.roles))
    assert torch.equal(b.generator.velocity(*inputs), a.generator.velocity(*inputs))
    assert torch.equal(b.generator_ema.velocity(*inputs), a.generator.velocity(*inputs))
    assert torch.allclose(b.fake.velocity(*inputs), teacher.velocity(*inputs), atol=1e-6)
    with pytest.raises(Exception, match="lora settings"):
        read_adapter(tmp_path / "ad.safetensors", RolesConfig(lora_rank=8))


def test_full_generator_starts_from_given_model(teacher, inputs):
    student = build_tiny_dit(MODEL, WORLD).eval()
    roles = build_roles(RolesConfig(mode="full"), teacher, generator_init=student)
    assert torch.equal(roles.generator.velocity(*inputs), student.velocity(*inputs))
    assert torch.equal(roles.generator_ema.velocity(*inputs), student.velocity(*inputs))
    assert torch.allclose(roles.fake.velocity(*inputs), teacher.velocity(*inputs))
    with pytest.raises(TypeError):
        build_roles(RolesConfig(mode="lora"), teacher, generator_init=student)


def test_lora_fake_starts_from_saved_adapter(teacher, inputs, tmp_path):
    """roles.fake_init: the distillation run's fake adapter seeds TDM-R1's fake score; nothing else moves."""
    cfg = Config(model=MODEL, world=WORLD)
    a = build_roles(cfg.roles, teacher, surrogate=False)
    _perturb(a.fake.parameters())
    save_adapter(tmp_path / "fake.safetensors", a.adapter_tensors("fake"), cfg)
    fake = read_adapter(tmp_path / "fake.safetensors", cfg.roles)
    b = build_roles(cfg.roles, teacher, fake_init=fake)
    v_t = teacher.velocity(*inputs)
    assert torch.equal(b.fake.velocity(*inputs), a.fake.velocity(*inputs))
    assert not torch.allclose(b.fake.velocity(*inputs), v_t, atol=1e-3)
    for name in ("generator", "generator_ema", "surrogate", "slow_surrogate", "reference"):
        assert torch.allclose(getattr(b, name).velocity(*inputs), v_t, atol=1e-6), name
    with pytest.raises(ValueError, match="no fake score"):
        build_roles(cfg.roles, teacher, fake=False, fake_init=fake)


def test_full_fake_starts_from_given_model(teacher, inputs):
    other = build_tiny_dit(MODEL, WORLD).eval()
    roles = build_roles(RolesConfig(mode="full"), teacher, fake_init=other)
    assert torch.equal(roles.fake.velocity(*inputs), other.velocity(*inputs))
    assert torch.allclose(roles.generator.velocity(*inputs), teacher.velocity(*inputs))
    with pytest.raises(TypeError):
        build_roles(RolesConfig(mode="full"), teacher, fake_init={"w": torch.zeros(1)})


def test_run_loads_fake_init_from_config(teacher, inputs, tmp_path):
    from tdm_r1.checkpoint.sources import load_run_generator_init

    cfg = Config(model=MODEL, world=WORLD)
    a = build_roles(cfg.roles, teacher, surrogate=False)
    _perturb(a.fake.parameters())
    save_adapter(tmp_path / "fake.safetensors", a.adapter_tensors("fake"), cfg)
    cfg.roles.fake_init = str(tmp_path / "fake.safetensors")
    assert load_run_generator_init(cfg, teacher) is None  # generator_init stays unset
    b = build_roles(cfg.roles, teacher, fake_init=load_run_generator_init(cfg, teacher, field="fake_init"))
    assert torch.equal(b.fake.velocity(*inputs), a.fake.velocity(*inputs))
    cfg.roles.fake_init = str(tmp_path / "missing.safetensors")
    with pytest.raises(Exception, match="missing.safetensors"):
        load_run_generator_init(cfg, teacher, field="fake_init")


def test_surrogate_lora_rank_is_its_own(teacher, inputs):
    """roles.surrogate_lora_rank: the surrogate and its slow copy get that rank at the same alpha / rank scale;
    every other adapter keeps lora_rank, and a generator adapter saved at lora_rank still loads."""
    cfg = Config(model=MODEL, world=WORLD, roles=RolesConfig(lora_rank=8, lora_alpha=16.0, surrogate_lora_rank=2))
    roles = build_roles(cfg.roles, teacher)
    ranks = {}
    for name, module in roles.host.model.named_modules():
        if hasattr(module, "lora_A") and "surrogate" in module.lora_A:
            for adapter, lin in module.lora_A.items():
                ranks.setdefault(adapter, set()).add(lin.out_features)
                assert module.scaling[adapter] == pytest.approx(2.0), (name, adapter)  # 16 / 8 == 4 / 2
    assert ranks == {"generator": {8}, "generator_ema": {8}, "fake": {8}, "surrogate": {2}, "slow_surrogate": {2}}
    v_t = teacher.velocity(*inputs)
    assert torch.allclose(roles.surrogate.velocity(*inputs), v_t, atol=1e-6)
    _perturb(roles.surrogate.parameters())
    assert not torch.allclose(roles.surrogate.velocity(*inputs), v_t, atol=1e-3)
    update_shadow(roles, "slow_surrogate", 0.0)
    assert torch.equal(roles.slow_surrogate.velocity(*inputs), roles.surrogate.velocity(*inputs))
    full_rank = build_roles(RolesConfig(lora_rank=8, lora_alpha=16.0), teacher)
    with pytest.raises(KeyError, match="surrogate"):
        full_rank.load_state_tensors(roles.state_tensors())  # a resume with another surrogate rank is refused
    _perturb(full_rank.generator.parameters())
    student = full_rank.adapter_tensors("generator")
    b = build_roles(cfg.roles, teacher, generator_init=student)
    assert torch.equal(b.generator.velocity(*inputs), full_rank.generator.velocity(*inputs))
    with pytest.raises(ConfigError, match="surrogate_lora_rank must be >= 1"):
        build_roles(RolesConfig(surrogate_lora_rank=0), teacher)


def _velocities(roles, inputs) -> dict:
    with torch.no_grad():
        return {n: r.velocity(*inputs) for n, r in roles.active().items()}


def test_merged_no_grad_forwards_equal_peft_and_follow_every_write(teacher, inputs):
    """perf.lora_forward=merged: every role's no-grad velocity equals peft's forward up to rounding (the reference,
    which has no adapter, bitwise), also after an optimizer step and an EMA write to the adapters (nothing cached),
    and forwards with grad still go through peft (the adapters get their gradients)."""
    roles = build_roles(RolesConfig(mode="lora", lora_rank=4), teacher)
    for params in roles.trainable().values():
        _perturb(params)
    opt = torch.optim.SGD(roles.generator.parameters(), lr=0.5)
    for step in range(2):
        want = _velocities(roles, inputs)
        for r in roles.active().values():
            r.merged_no_grad = True
        got = _velocities(roles, inputs)
        for r in roles.active().values():
            r.merged_no_grad = False
        assert torch.equal(got["reference"], want["reference"])
        for name in got:
            scale = float(want[name].abs().max())
            # measured up to 1.7e-5 of max |v| with these adapters (perturbed by 0.1, larger than trained ones; AVX2 and
            # ATEN_CPU_CAPABILITY=default alike): 6x margin
            assert float((got[name] - want[name]).abs().max()) <= 1e-4 * scale, (step, name)
        assert not torch.equal(got["generator"], got["reference"])
        assert not torch.equal(got["generator"], want["generator"]) or step == 0  # another order of the sum
        # train the generator one step with merged forwards on: grad forwards use peft, so A and B get gradients
        for r in roles.active().values():
            r.merged_no_grad = True
        opt.zero_grad()
        roles.generator.velocity(*inputs).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in roles.generator.parameters())
        opt.step()
        update_shadow(roles, "generator_ema", 0.5)
        for r in roles.active().values():
            r.merged_no_grad = False


def test_merged_forward_shares_the_hosts_tensors(teacher):
    """The plain copy holds the peft base's own tensors (no second model in memory)."""
    roles = build_roles(RolesConfig(mode="lora", lora_rank=4), teacher)
    merged = roles.host.merged_forward()
    base = {p.data_ptr() for n, p in roles.host.model.named_parameters() if "lora_" not in n}
    plain = list(merged.plain.parameters())
    assert plain and all(p.data_ptr() in base for p in plain)
    assert len(merged.targets) == 4 * MODEL.depth  # qkv, proj, fc1, fc2 of every DiT block
