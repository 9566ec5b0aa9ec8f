"""Run reports: the curve's held-out points and the report table."""

import pytest

from tdm_r1.report import paired_gain, plot_curves, report_markdown, summary_points


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
