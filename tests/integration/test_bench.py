"""`tdm-r1 bench`: the reference, fused and fast loop paths train the same model, their model work is counted as the
algorithm prescribes (DESIGN section 5), and the results come out as JSON, CSV, markdown and a chart."""

import csv
import json

import pytest
import torch
from utils import TINY, save_tiny_teacher, train_epochs

from tdm_r1 import timing
from tdm_r1.bench import PATHS, PHASES, bench, write_results
from tdm_r1.cli import main
from tdm_r1.config import load_config

RUN = [
    "train.prompts_per_epoch=2",
    "train.group_size=3",
    "train.micro_batch_groups=1",
    "train.rewards=[{name: dark_fraction, weight: 1.0}]",
    "tdm.steps=4",
    "tdm.steps_per_batch=2",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "teacher.safetensors"
    save_tiny_teacher(path)
    return path


@pytest.fixture(scope="module")
def result(teacher, tmp_path_factory):
    cfg = load_config(None, [*TINY, *RUN, f"roles.teacher={teacher}", f"run_dir={tmp_path_factory.mktemp('r')}"])
    return bench(cfg, ["reference", "fused", "fast"], epochs=2, warmup=1)


def test_forward_counts_follow_the_algorithm(result):
    """Per image and epoch: the K-step rollout runs the generator K times; each of the M drawn steps runs the fake
    score (reference + fake with grad), the surrogate (surrogate with grad + reference + slow surrogate) and the
    generator (generator with grad + reference CFG pair + fake + surrogate CFG pair + reference at tau'); the
    reference loop also recomputes the generator's output once per drawn step."""
    k, m = 4, 2
    want = {"rollout": k, "fake": 2 * m, "surrogate": 3 * m, "generator": 7 * m}
    grads = {"fake": m, "surrogate": m, "generator": m}
    for name, r in result["paths"].items():
        expected = want | ({"recompute": m} if name == "reference" else {})
        assert r["forwards_per_image"] == pytest.approx(expected), name
        assert r["grad_forwards_per_image"] == pytest.approx(grads), name
        fe = sum(expected.values()) + 2 * sum(grads.values())
        assert r["forward_equivalents_per_image"] == pytest.approx(fe), name
        assert r["flops_per_epoch"] == pytest.approx(fe * result["images_per_epoch"] * result["flops_per_forward"])


def test_the_paths_train_the_same_model(result):
    # reference ops and fused kernels round differently; the first epoch's losses agree to float noise
    agree = result["agreement"]
    assert agree["reward_mean_first_epoch"] == 0.0  # the first rollout has not been trained on yet
    assert agree["loss_gen_first_epoch"] < 1e-5 and agree["loss_fake_first_epoch"] < 1e-5
    ref, fused, fast = (result["paths"][p]["metrics"] for p in ("reference", "fused", "fast"))
    assert len(ref) == len(fused) == len(fast) == 3  # warm-up + 2 timed epochs, each with its metrics


def test_overlapping_the_rewards_changes_no_number(teacher, tmp_path):
    """perf.overlap_reward moves the first fake-score update before the last rewards are awaited: the random draws
    and every update stay in order, so two epochs' metrics are bitwise those of waiting first (peft forwards both)."""
    rows = {}
    for overlap in (False, True):
        sets = [*TINY, *RUN, f"roles.teacher={teacher}", f"run_dir={tmp_path / str(overlap)}"]
        sets += ["perf.lora_forward=peft", f"perf.overlap_reward={overlap}"]
        rows[overlap] = train_epochs(sets)
    strip = lambda recs: [{k: v for k, v in r.items() if not k.startswith("sec_")} for r in recs]  # noqa: E731
    assert strip(rows[True]) == strip(rows[False])
    assert rows[True][0]["reward_mean"] > 0 and rows[True][1]["loss_sur"] != 0


def test_phase_seconds_add_up_to_the_epoch(result):
    for r in result["paths"].values():
        assert set(r["phases"]) == set(PHASES) and all(v >= 0 for v in r["phases"].values())
        assert sum(r["phases"].values()) == pytest.approx(r["epoch_s"], rel=1e-6)
        assert r["images_per_s"] == pytest.approx(6 / r["epoch_s"]) and len(r["epoch_s_each"]) == 2
        assert r["reward_s"] > 0 and 0 <= r["reward_hidden_s"] <= r["reward_s"]
        assert r["reward_hidden_pct"] == pytest.approx(100 * r["reward_hidden_s"] / r["reward_s"])
    assert result["ratios"]["reference/fused"] == pytest.approx(
        result["paths"]["reference"]["epoch_s"] / result["paths"]["fused"]["epoch_s"]
    )


def test_results_files(result, tmp_path):
    files = write_results(result, tmp_path / "train_tiny")
    assert [f.suffix for f in files] == [".json", ".csv", ".md", ".png"] and all(f.stat().st_size for f in files)
    data = json.loads(files[0].read_text())
    for r in data["paths"].values():  # what scripts read
        assert {"epoch_s", "images_per_s", "forward_equivalents_per_image", "phases"} <= set(r)
    rows = list(csv.DictReader(files[1].open()))
    assert {(r["path"], r["phase"]) for r in rows} == {(p, ph) for p in PATHS for ph in (*PHASES, "epoch")}
    assert "| **epoch** |" in files[2].read_text()


def test_recorder_is_a_no_op_when_inactive_and_times_nested_phases_exclusively():
    with timing.phase("outside"):  # nothing records
        timing.count_forward(5, grad=True)
    rec = timing.Recorder()
    with timing.recording(rec):
        with timing.phase("outer"):
            timing.count_forward(2, grad=False)
            with timing.phase("inner"):
                timing.count_forward(3, grad=True)
                torch.ones(1000).sum()
    assert dict(rec.forwards) == {"outer": 2, "inner": 3} and dict(rec.grad_forwards) == {"inner": 3}
    assert rec.forward_equivalents() == 2 + 3 + 2 * 3
    assert rec.calls == {"outer": 1, "inner": 1} and rec.seconds["outer"] >= 0 and rec.seconds["inner"] > 0


def test_cli_rejects_an_unknown_path(teacher, tmp_path, capsys):
    sets = [f"--set={s}" for s in [*TINY, *RUN, f"roles.teacher={teacher}", f"run_dir={tmp_path}"]]
    assert main(["bench", "--config", "configs/toy_ocr_r1.yaml", *sets, "--paths", "fastest"]) == 2
    assert "bench: unknown path(s) ['fastest']; choose from reference, fused, fast" in capsys.readouterr().err


def test_gpu_check_summary_reads_every_step(result, tmp_path):
    """benchmarks/gpu_summary.py (the table gpu_check.sh prints) over a bench result and a kernel row."""
    import importlib.util
    from pathlib import Path

    write_results(result, tmp_path / "sd35m_ocr")
    (tmp_path / "steps.tsv").write_text("tests\t0\t41\nsd35m_ocr\t0\t77\n")
    row = {"op": "sampler_step", "provider": "triton", "mode": "fwd", "n": 786432, "gbps": 2500.0, "pct_of_copy": 81.0,
           "speedup_vs_reference": 3.2}  # fmt: skip
    (tmp_path / "kernels.json").write_text(json.dumps([row, row | {"provider": "reference", "gbps": 700.0}]))
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_summary.py"
    spec = importlib.util.spec_from_file_location("gpu_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.summary(tmp_path)
    assert "| tests | 0 | 41 |" in text and "| sampler_step fwd | 786432 | 2500 | 81 | 3.20 |" in text
    assert text.count("| sampler_step fwd |") == 1  # the triton row only
    for name in ("reference", "fused", "fast"):
        epoch = result["paths"][name]["epoch_s"]
        assert f"| sd35m_ocr | {name} | {epoch:.1f} |" in text
