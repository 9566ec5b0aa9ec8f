"""Model-based rewards load only from a configured local path, with errors that name what is missing; PickScore on a
tiny random CLIP folder (saved with save_pretrained, loaded the way users load the real one) scores real images."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import _clip_tokenizer

from tdm_r1.config import RewardTermConfig
from tdm_r1.rewards import build_reward
from tdm_r1.rewards.base import RewardSetupError


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = _clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text |= dict(max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vision, patch_size=8), projection_dim=8))
    d = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(d)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(d)
    return d


def term(name: str, path: str) -> RewardTermConfig:
    return RewardTermConfig(name=name, path=path, device="cpu", batch_size=2)


def test_pickscore_scores_images_against_prompts(pickscore_dir):
    reward = build_reward(term("pickscore", str(pickscore_dir)))
    images = torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    prompts = ["red cube", "a cat", "two dogs"]
    scores = reward(images, prompts, [{}] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, reward(images, prompts, [{}] * 3))  # deterministic, batched in twos
    assert not torch.equal(scores, reward(images, ["a cat"] * 3, [{}] * 3))  # the prompt matters
    assert not torch.equal(scores, reward(images.flip(0), prompts, [{}] * 3))  # and so does the image
    one = reward(images[1:2], prompts[1:2], [{}])
    assert torch.allclose(one, scores[1:2], atol=1e-5)  # a sample's score does not depend on its batch


def test_pickscore_needs_its_local_folder(tmp_path, pickscore_dir):
    with pytest.raises(RewardSetupError, match="reward 'pickscore' needs a local PickScore folder: set its `path`"):
        build_reward(term("pickscore", ""))
    with pytest.raises(RewardSetupError, match=f"path '{tmp_path / 'nope'}' does not exist"):
        build_reward(term("pickscore", str(tmp_path / "nope")))
    (tmp_path / "config.json").write_text((pickscore_dir / "config.json").read_text())
    with pytest.raises(RewardSetupError, match="lacks preprocessor_config.json"):
        build_reward(term("pickscore", str(tmp_path)))


def test_geneval_names_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(RewardSetupError, match="reward 'geneval' needs a folder with the GenEval detector"):
        build_reward(term("geneval", ""))
    # the path exists; the detector package does not (as here): the error names it instead of scoring anything
    monkeypatch.setitem(sys.modules, "mmdet", None)
    with pytest.raises(RewardSetupError, match="reward 'geneval' needs the `mmdet` package"):
        build_reward(term("geneval", str(tmp_path)))
