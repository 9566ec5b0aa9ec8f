"""The key correctness check of the adapters: our few-step sampler (tdm_r1.sampling.rollout, shift schedule) on the
adapter reproduces the diffusers pipeline (StableDiffusion3Pipeline / ZImagePipeline) for the same initial noise, with
the pipeline's scheduler set to the same sigmas. Any error in the time or velocity convention, prompt encoding, latent
layout, CFG combination or VAE scaling/shift shows up here.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import HEIGHT, PROMPTS, WIDTH, load, pipeline_for, pipeline_guidance, tiny_cfg

from tdm_r1.sampling import rollout, schedule

STEPS, SHIFT = 4, 3.0
# fp32 on CPU. Measured max |diff| on latents of magnitude ~4.5: 0.0 (bit-equal) for both models without CFG and for
# SD3 with CFG; 3.3e-6 for Z-Image with CFG (the pipeline combines pos + g (pos - neg) on raw outputs, we combine
# velocities). Images (our decode in chunks of 2 vs one VAE call): at most 8.3e-7.
LATENT_ATOL = {1.0: 1e-6, 4.5: 5e-5}
IMAGE_ATOL = 5e-6


def _noise(model, n: int) -> torch.Tensor:
    shape = model.latent_shape(HEIGHT, WIDTH)
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(1234))


@pytest.mark.parametrize("cfg", [1.0, 4.5])
@pytest.mark.parametrize("kind", ["sd3", "zimage"])
def test_rollout_reproduces_diffusers_pipeline(kind, cfg, request):
    path = request.getfixturevalue(f"{kind}_dir")
    model = load(kind, path)
    noise = _noise(model, len(PROMPTS))
    traj = rollout(model, model.encode_prompts(PROMPTS), noise, steps=STEPS, shift=SHIFT, cfg=cfg)

    pipe = pipeline_for(kind, path, SHIFT)
    u = torch.linspace(1.0, 0.0, STEPS + 1)[:-1].tolist()  # pre-shift points; the scheduler shifts them
    call = dict(
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        sigmas=u,
        guidance_scale=pipeline_guidance(kind, cfg),
        max_sequence_length=tiny_cfg(path, kind).max_sequence_length,
    )
    # list(...) each time: ZImagePipeline rewrites the caller's prompt list in place (chat template)
    latents = pipe(prompt=list(PROMPTS), latents=noise.clone(), output_type="latent", **call).images
    images = pipe(prompt=list(PROMPTS), latents=noise.clone(), output_type="pt", **call).images

    assert torch.allclose(pipe.scheduler.sigmas.float(), schedule(STEPS, SHIFT), atol=1e-6)
    diff = (latents - traj.sample).abs().max().item()
    assert diff <= LATENT_ATOL[cfg], f"{kind} cfg={cfg}: latents differ from the pipeline by {diff:.3g}"
    ours = model.decode(traj.sample)
    img_diff = (images - ours).abs().max().item()
    assert ours.shape == (len(PROMPTS), 3, HEIGHT, WIDTH)
    assert img_diff <= IMAGE_ATOL, f"{kind} cfg={cfg}: decoded images differ by {img_diff:.3g}"
    # the comparison is not vacuous: the model depends on the prompt and the sample moved away from the noise
    assert (traj.v[0, 0] - traj.v[0, 1]).abs().max() > 0.1
    assert (traj.sample - noise).abs().max() > 0.5
    print(f"{kind} cfg={cfg}: max|latent diff| {diff:.3g}, max|image diff| {img_diff:.3g}")


def test_sd3_velocity_is_transformer_output_at_1000s(sd3_model):
    x = torch.randn(2, *sd3_model.latent_shape(HEIGHT, WIDTH))
    s = torch.tensor([0.9, 0.3])
    cond = sd3_model.encode_prompts(PROMPTS[:2])
    raw = sd3_model.transformer(
        hidden_states=x,
        encoder_hidden_states=cond.fields["prompt_embeds"],
        pooled_projections=cond.fields["pooled"],
        timestep=s * 1000,
        return_dict=False,
    )[0]
    assert torch.equal(sd3_model.velocity(x, s, cond), raw)


def test_zimage_velocity_negates_output_and_reverses_time(zimage_model):
    x = torch.randn(2, *zimage_model.latent_shape(HEIGHT, WIDTH))
    s = torch.tensor([0.9, 0.3])
    cond = zimage_model.encode_prompts(PROMPTS[:2])
    embeds, mask = cond.fields["prompt_embeds"], cond.fields["prompt_mask"]
    caps = [embeds[i][mask[i]] for i in range(2)]
    raw = zimage_model.transformer(list(x.unsqueeze(2).unbind(0)), 1.0 - s, caps, return_dict=False)[0]
    # 1 - s here vs the pipeline's (1000 - 1000 s) / 1000 in the adapter: 1e-7 apart, times t_scale = 1000 inside the
    # sinusoidal time embedding; measured max |diff| 3.2e-5 on outputs of magnitude ~3
    torch.testing.assert_close(zimage_model.velocity(x, s, cond), -torch.stack(raw).squeeze(2), rtol=0, atol=1e-4)
    # ragged captions really are ragged, and padding is dropped before the transformer
    assert mask.sum(1)[0] != mask.sum(1)[1]
