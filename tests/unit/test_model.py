import pytest
import torch

from tdm_r1.config import ModelConfig, WorldConfig
from tdm_r1.models.tiny_dit import build_tiny_dit, tokenize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_tiny_dit(ModelConfig(), WorldConfig())
    torch.nn.init.normal_(m.out.weight, std=0.02)  # zero-initialised head would make every test trivial
    torch.nn.init.normal_(m.t_mod[1].weight, std=0.02)
    return m.eval()


def test_default_model_is_under_two_million_parameters(model):
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e6 < n < 2.0e6


def test_velocity_shape_dtype_and_prompt_dependence(model):
    x, s = torch.randn(2, 1, 16, 64), torch.tensor([0.3, 0.3])
    cond = model.encode_prompts(['a sign that says "CAT"', 'a sign that says "DOG"'])
    v = model.velocity(torch.cat([x[:1], x[:1]]), s, cond)
    assert v.shape == (2, 1, 16, 64) and v.dtype == torch.float32
    assert not torch.allclose(v[0], v[1])  # same x and s, different prompt
    v_u = model.velocity(x[:1], s[:1], cond[:1].uncond())
    assert not torch.allclose(v[0], v_u[0])


def test_padding_does_not_leak_into_the_result(model):
    # A short prompt batched with a long one must give the same output as alone: padded keys are masked.
    x, s = torch.randn(1, 1, 16, 64), torch.tensor([0.5])
    alone = model.velocity(x, s, model.encode_prompts(['a sign that says "AB"']))
    both = model.velocity(torch.cat([x, x]), s.repeat(2), model.encode_prompts(['a sign that says "AB"', "x" * 32]))
    assert torch.allclose(alone[0], both[0], atol=1e-5)


def test_tokenize_bounds():
    t = tokenize(["AB", ""], 4)
    assert t.tolist() == [[1, ord("A") - 30, ord("B") - 30, 0, 0], [1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="at most model.text_len=4"):
        tokenize(["ABCDE"], 4)
    with pytest.raises(ValueError, match="printable ASCII"):
        tokenize(["é"], 4)


def test_decode_maps_pixels_to_rgb_unit_range(model):
    x0 = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    img = model.decode(x0)
    assert img.shape == (1, 3, 1, 5)
    assert torch.allclose(img[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert model.latent_shape(16, 64) == (1, 16, 64)


def test_bad_geometry_is_rejected():
    with pytest.raises(ValueError, match="divisible by model.patch"):
        build_tiny_dit(ModelConfig(patch=5), WorldConfig())
