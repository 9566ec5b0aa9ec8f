"""The counting world (prompts, splits, renders, the miscount defect) and the counting reward: its own renders score 1,
blank images 0, hand-drawn images (not the world's renderer) as counted by hand, and touching objects as documented."""

import numpy as np
import pytest
import torch

from tdm_r1.config import ConfigError, WorldConfig
from tdm_r1.rewards import build_reward
from tdm_r1.rewards.base import score_images
from tdm_r1.rewards.counting import CountingOptions, count_score, find_objects
from tdm_r1.worlds import build_world
from tdm_r1.worlds.counting import BACKGROUND, COLOURS, SHAPES, PromptFileError, parse_prompt, phrase

RED, BLUE = np.asarray(COLOURS["red"]), np.asarray(COLOURS["blue"])


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(name="counting", channels=3))


def canvas(h=16, w=64):
    return np.broadcast_to(np.asarray(BACKGROUND, np.float32), (h, w, 3)).copy()


def score(images: np.ndarray | list, targets: list[dict], kind: str = "strict") -> list[float]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return score_images(build_reward("counting", score=kind), x, [""] * len(targets), targets).tolist()


def target(count, colour="red", shape="square"):
    return {"count": count, "colour": colour, "shape": shape}


def test_prompt_grammar_both_number_forms():
    assert parse_prompt("3 red squares") == parse_prompt("three red squares")
    assert parse_prompt("one blue disc").target() == {"count": 1, "colour": "blue", "shape": "disc"}
    assert phrase(1, "green", "triangle") == "1 green triangle" and phrase(6, "black", "diamond", True) == (
        "six black diamonds"
    )
    for bad, why in [("3 red", "3 words"), ("7 red squares", "outside 1-6"), ("3 pink squares", "colour"),
                     ("3 red squares extra", "3 words"), ("3 red circles", "shape"), ("3 red square", "form"),
                     ("seven red squares", "count")]:  # fmt: skip
        with pytest.raises(ValueError, match=why.split()[-1]):
            parse_prompt(bad)


def test_splits_share_no_combination_and_cover_every_attribute(world):
    train, held = world.items("train"), world.items("heldout")
    assert len(held) >= 64 and len(train) >= 64 and not set(train) & set(held)
    key = lambda item: tuple(world.targets([item])[0].values())  # noqa: E731
    assert not {key(i) for i in train} & {key(i) for i in held}
    targets = world.targets(train)
    for field, values in (("count", range(1, 7)), ("colour", COLOURS), ("shape", SHAPES)):
        assert {t[field] for t in targets} == set(values)
    assert {(t["count"], t["shape"]) for t in targets} == {(c, s) for c in range(1, 7) for s in SHAPES}


def test_bad_prompt_files_and_options_are_named(tmp_path):
    (tmp_path / "t.txt").write_text("3 red squares\n2 blue discs\n")
    (tmp_path / "h.txt").write_text("1 green triangle\nthree red squares\n")
    (tmp_path / "bad.txt").write_text("1 green triangle\n4 purple discs\n")
    opts = {"train_prompts": str(tmp_path / "t.txt"), "heldout_prompts": str(tmp_path / "h.txt")}
    with pytest.raises(PromptFileError, match=r"share 1 .*\(3, 'red', 'square'\)"):
        build_world(WorldConfig(name="counting", channels=3, options=opts))
    with pytest.raises(PromptFileError, match=r"bad.txt:2: '4 purple discs': colour 'purple'"):
        bad = opts | {"heldout_prompts": str(tmp_path / "bad.txt")}
        build_world(WorldConfig(name="counting", channels=3, options=bad))
    with pytest.raises(ConfigError, match="world.channels must be 3"):
        build_world(WorldConfig(name="counting", channels=1))
    with pytest.raises(ConfigError, match=r"unknown keys \['blot'\]"):
        build_world(WorldConfig(name="counting", channels=3, options={"blot": 1}))
    with pytest.raises(ConfigError, match="miscount_prob"):
        build_world(WorldConfig(name="counting", channels=3, options={"miscount_prob": 1.5}))


def test_renders_are_seeded_and_score_one(world):
    items = world.items("train") + world.items("heldout")
    a = world.render_batch(items, np.random.default_rng(3))
    assert torch.equal(a, world.render_batch(items, np.random.default_rng(3)))
    assert a.shape == (len(items), 3, 16, 64) and 0 <= a.min() and a.max() <= 1
    for kind in ("strict", "partial"):
        s = score_images(build_reward("counting", score=kind), a, items, world.targets(items))
        assert float(s.mean()) >= 0.98, kind  # measured: 1.0 on every prompt of both splits at seeds 0 and 3


def test_miscount_defect_shows_one_object_off_at_its_rate():
    w = build_world(WorldConfig(name="counting", channels=3, options={"miscount_prob": 0.4}))
    items = w.items("train") * 4  # 512 renders
    imgs = w.render_batch(items, np.random.default_rng(0)).permute(0, 2, 3, 1).numpy()
    off = [len(find_objects(x, CountingOptions())) - t["count"] for x, t in zip(imgs, w.targets(items), strict=True)]
    assert set(off) == {-1, 0, 1}
    rate = np.mean([o != 0 for o in off])
    assert abs(rate - 0.4) < 3 * np.sqrt(0.4 * 0.6 / len(off))  # a binomial share within 3 standard errors


def test_blank_images_score_zero():
    blank = [canvas(), np.zeros((16, 64, 3), np.float32), np.ones((16, 64, 3), np.float32)]
    assert score(blank, [target(1)] * 3) == [0.0] * 3
    assert score(blank, [target(3)] * 3, "partial") == [0.0] * 3


def draw_square(img, x, y, side, colour):
    img[y : y + side, x : x + side] = colour


def draw_disc(img, cx, cy, r, colour):
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def test_hand_drawn_counts_over_and_under():
    # squares of side 6 (not the world's 7) at positions of no slot grid; the expected scores by hand
    def squares(n, colour=RED):
        img = canvas()
        for i in range(n):
            draw_square(img, 3 + 9 * i, 4 + (i % 3), 6, colour)
        return img

    images = [squares(3), squares(4), squares(2), squares(3, BLUE)]
    assert score(images, [target(3)] * 4) == [1.0, 0.0, 0.0, 0.0]
    # partial: (1 - |found - 3| / 3) x (right / found)
    assert score(images, [target(3)] * 4, "partial") == pytest.approx([1.0, 2 / 3, 2 / 3, 0.0])
    mixed = squares(2)
    draw_disc(mixed, 40, 8, 3.5, RED)  # two red squares and a red disc, asked for three red squares
    assert [f.shape for f in find_objects(mixed, CountingOptions())] == ["square", "square", "disc"]
    assert score([mixed], [target(3)], "partial") == pytest.approx([2 / 3])
    assert score([mixed], [target(2)]) == [0.0]  # strict: nothing but the asked objects


def test_noise_and_specks_do_not_count():
    rng = np.random.default_rng(0)
    img = canvas()
    draw_square(img, 5, 5, 6, RED)
    draw_disc(img, 30, 8, 3.5, RED)
    img[1, 60] = 0.0  # a one-pixel speck
    noisy = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)
    assert [f.shape for f in find_objects(noisy, CountingOptions())] == ["square", "disc"]


def test_touching_and_overlapping_objects_count_as_one_unshaped_object():
    touching, overlapping = canvas(), canvas()
    draw_square(touching, 10, 5, 7, RED)
    draw_square(touching, 17, 5, 7, RED)  # shares an edge with the first
    draw_disc(overlapping, 20, 8, 3.5, BLUE)
    draw_disc(overlapping, 24, 8, 3.5, BLUE)
    for img, colour in ((touching, "red"), (overlapping, "blue")):
        found = find_objects(img, CountingOptions())
        assert [(f.shape, f.colour) for f in found] == [("other", colour)]
    assert score([touching], [target(2)]) == [0.0] and score([touching], [target(1)]) == [0.0]


def test_every_shape_and_colour_is_told_apart(world):
    for shape in SHAPES:
        for colour in COLOURS:
            item = phrase(5, colour, shape)
            img = world.render_batch([item], np.random.default_rng(1), counts=[5])[0].permute(1, 2, 0).numpy()
            assert {(f.shape, f.colour) for f in find_objects(img, CountingOptions())} == {(shape, colour)}


def test_the_grid_caption_says_what_was_found():
    from tdm_r1.evaluate import read_and_score
    from tdm_r1.rewards.scorer import RewardScorer

    w = build_world(WorldConfig(name="counting", channels=3))
    items = ["3 red squares", "2 blue discs", "one green triangle"]
    images = w.render_batch(items, np.random.default_rng(0), counts=[4, 2, 1])
    images[2, :, :, 61:64] = torch.tensor(COLOURS["red"]).view(3, 1, 1)  # a red bar right of every slot
    scorer = RewardScorer([(build_reward("counting"), 1.0)])
    readings, scores = read_and_score(scorer, images, items, w)
    assert readings == ["4 found", "2 found", "2 found, 1 wrong"] and scores == [0.0, 1.0, 0.0]


def test_a_target_without_a_count_is_a_failure_to_judge():
    assert np.isnan(score([canvas()], [{"text": "CAT"}])[0])
    assert count_score([], target(2), "partial") == 0.0
