"""Run reports: the curve's held-out points, the report table and headline, labelled sample grids."""

import numpy as np
import pytest
import torch
from PIL import Image

from tdm_r1.evaluate import read_and_score
from tdm_r1.report import (
    RunReporter,
    headline_lines,
    paired_gain,
    plot_curves,
    report_markdown,
    sample_captions,
    save_labelled_grid,
    save_start_end_grid,
    summary_points,
)


def _eval(v, exact=0.5):
    return {"ocr_mean": v, "ocr_exact": exact, "n": 4}


def test_summary_points_add_the_start_and_final_evaluations():
    summary = {"tdm_4nfe": _eval(0.7), "tdm_r1_4nfe": _eval(0.8), "epochs": 12, "teacher_4nfe": _eval(0.6)}
    assert summary_points(summary) == [(0, 0.7), (12, 0.8)]
    # a run without baselines has only its final point; diffusers runs report reward_mean
    assert summary_points({"tdm_r1_4nfe": _eval(0.8), "epochs": 3}) == [(3, 0.8)]
    assert summary_points({"tdm_r1_4nfe": {"reward_mean": 0.25}, "epochs": 2}) == [(2, 0.25)]
    assert summary_points({}) == []


def test_curve_and_table_are_written(tmp_path):
    metrics = [{"epoch": e, "reward_mean": 0.5 + 0.01 * e} for e in range(1, 5)]
    metrics[1]["heldout_ocr_mean"] = 0.71
    plot_curves(metrics, tmp_path / "curve.png", [(0, 0.7), (4, 0.75)])
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = {"teacher_32nfe_cfg": _eval(0.74, 0.42), "tdm_r1_4nfe": _eval(0.784, 0.445), "epochs": 4}
    text = report_markdown(summary, {"direct_rl": {"tdm_r1_4nfe": _eval(0.741, 0.383)}})
    assert "| TDM-R1, 4 NFE | 0.784 | 0.445 | 4 |" in text
    assert "| ablation: direct_rl, 4 NFE | 0.741 | 0.383 | 4 |" in text


def test_rows_with_several_seeds_show_their_standard_error_and_the_paired_gain():
    start = {**_eval(0.77), "seeds": [1, 2], "ocr_mean_per_seed": [0.76, 0.78], "ocr_mean_sem": 0.01}
    final = {**_eval(0.80), "seeds": [1, 2], "ocr_mean_per_seed": [0.785, 0.815], "ocr_mean_sem": 0.015}
    summary = {"tdm_4nfe": start, "tdm_r1_4nfe": final, "gain_4nfe": paired_gain(start, final), "epochs": 2}
    text = report_markdown(summary)
    assert "| TDM-R1, 4 NFE | 0.800 +- 0.015 (2 seeds) | 0.500 | 4 |" in text
    # per seed +0.025 and +0.035: mean +0.03, SE = |a - b| / 2 = 0.005
    assert "Gain of TDM-R1 over the starting 4-step generator: +0.0300 +- 0.0050" in text
    assert "2/2 seeds positive: +0.025 +0.035" in text
    summary |= {"tdm_4nfe_train": _eval(0.70), "tdm_r1_4nfe_train": _eval(0.79)}
    summary["gain_4nfe_train"] = paired_gain(summary["tdm_4nfe_train"], summary["tdm_r1_4nfe_train"])
    ablation = {"tdm_r1_4nfe": _eval(0.75), "tdm_r1_4nfe_train": _eval(0.72)}
    lines = report_markdown(summary, {"eta_1": ablation}).splitlines()
    train_table = lines[lines.index("On the train-split words the run trains on (eval.train_rows):") :]
    assert "| ablation: eta_1, 4 NFE | 0.720 | 0.500 | 4 |" in train_table
    assert "| ablation: eta_1, 4 NFE | 0.750 | 0.500 | 4 |" in lines
    assert any("+0.0900 (one eval seed" in x for x in train_table)
    assert "TDM-R1 minus ablation eta_1: +0.0700." in train_table  # 0.79 - 0.72
    assert "TDM-R1 minus ablation eta_1: +0.0500." in lines  # 0.80 - 0.75
    single = {"tdm_4nfe": _eval(0.77), "tdm_r1_4nfe": _eval(0.78)}
    single["gain_4nfe"] = paired_gain(single["tdm_4nfe"], single["tdm_r1_4nfe"])
    assert "+0.0100 (one eval seed, no error estimate" in report_markdown(single)


def test_ablations_are_compared_with_tdm_r1_seed_by_seed():
    seeds = {"seeds": [1, 2, 3]}
    final = {**_eval(0.80), **seeds, "ocr_mean_per_seed": [0.78, 0.80, 0.82]}
    ablation = {**_eval(0.76), **seeds, "ocr_mean_per_seed": [0.77, 0.75, 0.76]}
    other = {**_eval(0.81), "seeds": [4, 5, 6], "ocr_mean_per_seed": [0.81, 0.81, 0.81]}
    summary = {"tdm_r1_4nfe": final, "epochs": 1}
    text = report_markdown(summary, {"eta_1": {"tdm_r1_4nfe": ablation}, "direct_rl": {"tdm_r1_4nfe": other}})
    # differences +0.01, +0.05, +0.06: mean +0.04, sample std sqrt(0.0007), SE sqrt(0.0007 / 3) = 0.0153
    assert "TDM-R1 minus ablation eta_1: +0.0400 +- 0.0153 (3/3 seeds positive)." in text
    # evaluated at other seeds: not paired, the difference of the means only
    assert "TDM-R1 minus ablation direct_rl: -0.0100." in text


def test_paired_gain_differences_per_seed():
    a = {"ocr_mean": 0.7, "seeds": [5, 6, 7], "ocr_mean_per_seed": [0.70, 0.68, 0.72]}
    b = {"ocr_mean": 0.72, "seeds": [5, 6, 7], "ocr_mean_per_seed": [0.73, 0.69, 0.74]}
    g = paired_gain(a, b)
    assert g["per_seed"] == pytest.approx([0.03, 0.01, 0.02])
    # differences 0.03, 0.01, 0.02: sample std 0.01, SE 0.01 / sqrt(3)
    assert g["ocr_mean"] == pytest.approx(0.02) and g["sem"] == pytest.approx(0.01 / 3**0.5)
    assert g["seeds_positive"] == 3 and g["seeds"] == [5, 6, 7]
    # rows at other seeds are not paired: only the difference of the means
    assert paired_gain(a, {**b, "seeds": [1, 2, 3]}) == {"ocr_mean": pytest.approx(0.02)}
    assert paired_gain({"reward_mean": 1.0}, {"reward_mean": 1.5}, "reward") == {"reward_mean": 0.5}


def test_headline_compares_tdm_r1_with_the_teacher_and_the_student():
    teacher = {**_eval(0.838), "nfe": 32, "cfg": 3.0}
    start = {**_eval(0.82), "seeds": [1, 2], "ocr_mean_per_seed": [0.81, 0.83], "ocr_mean_sem": 0.01}
    final = {**_eval(0.976), "nfe": 4, "seeds": [1, 2], "ocr_mean_per_seed": [0.97, 0.982], "ocr_mean_sem": 0.006}
    summary = {"teacher_32nfe_cfg": teacher, "tdm_4nfe": start, "tdm_r1_4nfe": final}
    summary["gain_4nfe"] = paired_gain(start, final)  # per seed +0.16, +0.152: mean +0.156, SE 0.004
    assert headline_lines(summary, "ocr") == [
        "**TDM-R1 at 4 NFE: 0.976 +- 0.006 (2 seeds) held-out ocr vs the teacher at 32 NFE + CFG 3: 0.838 (+0.138); "
        "vs the TDM student at the same NFE: +0.156 +- 0.004 paired (2/2 seeds positive).**",
        "",
    ]
    text = report_markdown(summary)
    assert text.split("\n")[2] == headline_lines(summary, "ocr")[0]  # the report opens with it
    assert "| Teacher, 32 NFE + CFG 3 | 0.838 | 0.500 | 4 |" in text and "samples_start_end.png" in text
    assert headline_lines({"tdm_r1_4nfe": final}, "ocr") == []  # no teacher row: no comparison to make
    assert "(each tile: the word, what the reward read, its score; green = exact)" in text
    # a run scored by its train.rewards (the counting world, diffusers prompts) labels its tiles with prompts
    scored = {
        k: {"reward_mean": r["ocr_mean"], "reward_exact": 0.5, "n": 4} for k, r in summary.items() if "gain" not in k
    }
    assert "held-out prompts and noise (each tile: the prompt," in report_markdown(scored)


def test_captions_name_the_word_the_reading_and_the_score():
    captions = sample_captions(["CAT", "DOG", "EMU"], ["CAT", "", None], [1.0, 0.0, 0.25])
    assert captions == [["CAT", "CAT  1.00"], ["DOG", "(nothing)  0.00"], ["EMU", "?  0.25"]]


def _grey_tiles(values):  # [B, 3, 4, 8] tiles of one grey level each
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 8).clone()


def test_labelled_grid_places_each_upscaled_tile_with_its_caption(tmp_path):
    images = _grey_tiles([0.0, 0.5, 1.0])
    save_labelled_grid(images, [["A", "x"], ["B", "y"], ["C", "z"]], tmp_path / "g.png", cols=2, scale=3,
                       marks=[True, False, True])  # fmt: skip
    img = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    tile_w, tile_h = 120, 4 * 3 + 2 * 14 + 2  # tiles are at least 120 px wide; two caption lines of 14 px
    assert img.shape == (6 + 2 * (tile_h + 6), 6 + 2 * (tile_w + 6), 3)
    for i, grey in enumerate([0, 128, 255]):
        r, c = divmod(i, 2)
        y, x = 6 + r * (tile_h + 6), 6 + c * (tile_w + 6)
        assert (img[y : y + 12, x : x + 24] == grey).all(), i  # the 4 x 8 tile at 3x
        caption = img[y + 12 : y + tile_h, x : x + tile_w].astype(int)
        green = ((caption[..., 1] - caption[..., 0]) > 60).any()
        red = ((caption[..., 0] - caption[..., 1]) > 60).any()
        assert (green, red) == ((True, False) if i != 1 else (False, True)), i  # the mark colours the second line
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        save_labelled_grid(images, [["A"], ["B"]], tmp_path / "bad.png")


def test_start_end_grid_pairs_the_same_word_side_by_side(tmp_path):
    start, end = _grey_tiles([0.0, 0.2]), _grey_tiles([1.0, 0.6])
    save_start_end_grid(start, end, [["A", "a"], ["B", "b"]], [["A", "a2"], ["B", "b2"]], tmp_path / "p.png",
                        pairs_per_row=1)  # fmt: skip
    img = np.asarray(Image.open(tmp_path / "p.png").convert("L"))
    tile_h = 12 + 2 * 14 + 2
    greys = [[img[6 + r * (tile_h + 6) + 1, 6 + c * 126 + 1] for c in range(2)] for r in range(2)]
    assert greys == [[0, 255], [51, 153]]  # row i: word i's start, then its end
    with pytest.raises(ValueError, match="same samples"):
        save_start_end_grid(start, end[:1], [["A", "a"]] * 2, [["A", "a"]], tmp_path / "bad.png")


class _Reader:
    def read(self, images):
        return ["CAT", "DGO"][: len(images)]


class _World:
    def prompt(self, w):
        return f'a sign that says "{w}"'

    def targets(self, words):
        return [{"text": w} for w in words]


def test_read_and_score_uses_the_readings_of_a_reading_reward():
    readings, scores = read_and_score(_Reader(), torch.rand(2, 3, 4, 8), ["CAT", "DOG"], _World())
    assert readings == ["CAT", "DGO"] and scores == [1.0, pytest.approx(1 / 3)]  # DGO: 2 edits of 3 letters
    dark = lambda images, prompts, targets: images.mean((1, 2, 3))  # noqa: E731  (a reward that does not read)
    readings, scores = read_and_score(dark, _grey_tiles([0.25, 0.75]), ["CAT", "DOG"], _World())
    assert readings == [None, None] and scores == [0.25, 0.75]


def test_reporter_keeps_the_start_samples_and_labels_them_with_the_end(tmp_path):
    rep = RunReporter(tmp_path, tensorboard=False)
    assert rep.kept_start() is None
    rep.keep_start(_grey_tiles([0.0, 0.5]), ["CAT", "DOG"])
    assert (tmp_path / "samples_start.png").is_file()
    images, words = RunReporter(tmp_path, tensorboard=False).kept_start()  # e.g. the resumed process
    assert words == ["CAT", "DOG"] and torch.equal(images, _grey_tiles([0.0, 128 / 255]))  # stored as uint8
    rep.labelled_samples("end", _grey_tiles([1.0, 1.0]), ["CAT", "DOG"], ["CAT", "DOC"], [1.0, 2 / 3])
    rep.start_end_pairs(
        (images, words, ["CAT", ""], [1.0, 0.0]), (_grey_tiles([1.0, 1.0]), words, ["CAT"] * 2, [1.0] * 2)
    )
    for name in ("samples_end.png", "samples_start_end.png"):
        assert Image.open(tmp_path / name).size[0] > 0, name


def test_paired_gain_in_the_exact_rate_by_hand():
    from tdm_r1.report import gain_line, paired_gain

    start = {"ocr_mean": 0.5, "seeds": [1, 2, 3], "ocr_mean_per_seed": [0.5, 0.4, 0.6],
             "ocr_exact_per_seed": [0.2, 0.3, 0.1]}  # fmt: skip
    final = {"ocr_mean": 0.7, "seeds": [1, 2, 3], "ocr_mean_per_seed": [0.7, 0.6, 0.8],
             "ocr_exact_per_seed": [0.5, 0.4, 0.4]}  # fmt: skip
    g = paired_gain(start, final)
    # exact differences 0.3, 0.1, 0.3: mean 0.7 / 3, sample sd sqrt(((0.0667)^2 * 2 + (0.1333)^2) / 2) / sqrt(3)
    assert g["exact"] == pytest.approx(0.7 / 3) and g["exact_seeds_positive"] == 3
    assert g["exact_sem"] == pytest.approx(((2 * (0.3 - 0.7 / 3) ** 2 + (0.1 - 0.7 / 3) ** 2) / 2 / 3) ** 0.5)
    assert "in ocr_exact (the share of perfect scores) +0.2333 +- 0.0667 (3/3 seeds positive)" in gain_line(g)
