import numpy as np
import pytest
import torch

from tdm_r1.config import WorldConfig
from tdm_r1.worlds.ocr import PromptFileError, build_world, read_words


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(jitter_x=4, jitter_y=1, noise_std=0.02, font_sizes=[11, 12]))


def test_same_seed_same_images(world):
    a, pa = world.sample(16, np.random.default_rng(5))
    b, pb = world.sample(16, np.random.default_rng(5))
    c, _ = world.sample(16, np.random.default_rng(6))
    assert torch.equal(a, b) and pa == pb
    assert not torch.equal(a, c)


def test_images_shape_range_and_text_pixels(world):
    imgs, prompts = world.sample(8, np.random.default_rng(0))
    assert imgs.shape == (8, 1, 16, 64) and imgs.dtype == torch.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    clean = build_world(WorldConfig()).render_batch(["HELLO"], np.random.default_rng(0))
    # dark text (0.1) on light background (0.85): both levels present, text on the left part only
    assert (clean < 0.3).any() and (clean > 0.8).float().mean() > 0.5
    assert (clean[..., 50:] > 0.8).all()


def test_prompt_grammar_round_trip(world):
    p = world.prompt("CAT")
    assert p == 'a sign that says "CAT"'
    assert world.word_of(p) == "CAT"
    with pytest.raises(ValueError, match="template"):
        world.word_of("a dog")


def test_splits_disjoint_and_nonempty(world):
    assert len(world.train_words) >= 1000 and len(world.heldout_words) >= 100
    assert not set(world.train_words) & set(world.heldout_words)
    assert all(3 <= len(w) <= 5 for w in world.heldout_words)


def test_overlapping_lists_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("CAT\nDOG\n")
    (tmp_path / "b.txt").write_text("DOG\n")
    with pytest.raises(ValueError, match="overlap"):
        build_world(WorldConfig(train_words=str(tmp_path / "a.txt"), heldout_words=str(tmp_path / "b.txt")))


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"", "empty"),
        (b"CAT\n\xff\xfeDOG\n", ":2: not valid UTF-8"),
        (b"CAT\nDOG\nca7\n", ":3: 'ca7' has characters outside"),
        (b"CAT\n\nDOG\n", ":2: empty line"),
        (b"ABCDEFGHIJ\n", ":1: .* longer than"),
    ],
)
def test_malformed_word_files(tmp_path, content, pattern):
    p = tmp_path / "words.txt"
    p.write_bytes(content)
    with pytest.raises(PromptFileError, match=pattern):
        read_words(p, "ABCDEFGHIJKLMNOPQRSTUVWXYZ", 8)


def test_word_file_ok(tmp_path):
    p = tmp_path / "w.txt"
    p.write_text("CAT\n  DOG  \nFOX")
    assert read_words(p, "ABCDEFGHIJKLMNOPQRSTUVWXYZ", 8) == ["CAT", "DOG", "FOX"]
