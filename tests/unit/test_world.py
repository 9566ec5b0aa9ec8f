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


def test_prompt_grammar_and_reward_targets(world):
    assert world.prompt("CAT") == 'a sign that says "CAT"'
    assert world.targets(["CAT", "DOG"]) == [{"text": "CAT"}, {"text": "DOG"}]  # the OCR reward's targets


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


def test_blot_covers_half_the_word_in_the_text_colour():
    # blot_prob 1: every render equals the clean one (same draws; no jitter) except one solid block of text colour,
    # ceil(0.5 x ink width) columns wide, over all ink rows, inside the word's ink span.
    clean_world = build_world(WorldConfig())
    blot_world = build_world(WorldConfig(blot_prob=1.0, blot_frac=0.5))
    for seed, word in enumerate(["HELLO", "AX", "WORDWIDE"]):
        clean = clean_world.render(word, np.random.default_rng(seed))[..., 0]
        blot = blot_world.render(word, np.random.default_rng(seed))[..., 0]
        ink = clean < 0.475  # alpha > 0.5 between background 0.85 and text 0.1
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        changed = np.argwhere(blot != clean)
        (r0, c0), (r1, c1) = changed.min(0), changed.max(0)
        width = int(np.ceil(0.5 * (cols[-1] - cols[0] + 1)))
        assert c1 - c0 + 1 <= width and cols[0] <= c0 and c1 <= cols[-1]
        block = blot[rows[0] : rows[-1] + 1]
        solid = np.flatnonzero((block == np.float32(0.1)).all(0))
        assert len(solid) == width and solid[-1] - solid[0] + 1 == width  # one contiguous block of text colour
        assert rows[0] <= r0 and r1 <= rows[-1]
        assert (
            np.delete(blot, slice(solid[0], solid[-1] + 1), axis=1)
            == np.delete(clean, slice(solid[0], solid[-1] + 1), axis=1)
        ).all()


def test_blot_probability_and_default_stream():
    words = ["HELLO"] * 2000
    plain = build_world(WorldConfig()).render_batch(words[:64], np.random.default_rng(3))
    # blot_prob 0 draws nothing extra: the default world's images are unchanged by the knob's existence
    assert torch.equal(
        plain, build_world(WorldConfig(blot_prob=0.0)).render_batch(words[:64], np.random.default_rng(3))
    )
    imgs = build_world(WorldConfig(blot_prob=0.3)).render_batch(words, np.random.default_rng(4))
    blotted = ((imgs[:, 0] == np.float32(0.1)).sum((1, 2)) > (plain[0, 0] == np.float32(0.1)).sum()).float().mean()
    assert abs(blotted.item() - 0.3) < 0.04  # binomial SE 0.010


@pytest.mark.parametrize(
    "field, value", [("blot_prob", 1.5), ("blot_prob", -0.1), ("blot_frac", 0.0), ("blot_frac", 2.0)]
)
def test_blot_knobs_validated(field, value):
    with pytest.raises(ValueError, match=f"world.{field}"):
        build_world(WorldConfig(**{field: value}))
