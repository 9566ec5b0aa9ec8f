"""Run reports: the curve's held-out points and the report table."""

from tdm_r1.report import plot_curves, report_markdown, summary_points


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
