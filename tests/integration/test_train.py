"""TDM-R1 trainer: deterministic rollouts, what each epoch trains, exact resume, reward failures."""

import json

import numpy as np
import pytest
import torch
from utils import TINY, role_named_parameters, save_tiny_teacher

from tdm_r1 import checkpoint as ckpt
from tdm_r1.commands.train import train
from tdm_r1.config import ConfigError, load_config
from tdm_r1.optim import build_optimizers, update_shadow
from tdm_r1.phases import advantage_phase, rollout_phase, update_phase
from tdm_r1.rewards import build_reward, register_reward
from tdm_r1.rewards.base import RewardFailureError
from tdm_r1.rewards.scorer import RewardScorer
from tdm_r1.roles import build_roles
from tdm_r1.run import build_run
from tdm_r1.worlds.stream import PromptStream

RUN = [
    "train.prompts_per_epoch=2",
    "train.group_size=3",
    "train.micro_batch_groups=1",
    "train.eval_every=0",
    "train.eval_baselines=false",
    "train.checkpoint_every=2",
    "train.tensorboard=false",
    "train.rewards=[{name: dark_fraction, weight: 1.0}]",
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("r1")
    save_tiny_teacher(d / "teacher.safetensors")
    (d / "heldout.txt").write_text("CAT\nDOG\n")
    return d


def make_cfg(paths, run_dir, *extra):
    return load_config(
        None,
        [
            *TINY,
            *RUN,
            f"roles.teacher={paths / 'teacher.safetensors'}",
            f"run_dir={run_dir}",
            f"world.heldout_words={paths / 'heldout.txt'}",
            *extra,
        ],
    )


def setup(cfg):
    run = build_run(cfg)
    roles, world = run.roles, run.world
    scorer = RewardScorer([(build_reward("dark_fraction"), 1.0)])
    return roles, world, scorer


def test_same_seed_gives_bitwise_identical_rollouts(paths, tmp_path):
    cfg = make_cfg(paths, tmp_path)
    roles, world, scorer = setup(cfg)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        runs.append(rollout_phase(roles, world, PromptStream(world.train_words, 3), scorer, cfg.train, cfg.tdm, gen))
    a, b = runs
    assert a.items == b.items and len(a.items) == 6
    assert torch.equal(a.traj.xs, b.traj.xs) and torch.equal(a.traj.v, b.traj.v)
    assert torch.equal(a.rewards, b.rewards)
    assert a.items[0] == a.items[1] == a.items[2] and a.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    scorer.close()


def test_advantages_are_normalised_per_group(paths, tmp_path):
    cfg = make_cfg(paths, tmp_path)
    roles, world, scorer = setup(cfg)
    batch = rollout_phase(
        roles, world, PromptStream(world.train_words, 0), scorer, cfg.train, cfg.tdm, torch.Generator().manual_seed(0)
    )
    advantage_phase(batch, cfg.train)
    r = batch.rewards.double()
    for g in (0, 1):
        m = batch.group_ids == g
        expected = (r[m] - r[m].mean()) / (r.std(unbiased=False) + cfg.train.adv_eps)
        assert torch.allclose(batch.adv[m].double(), expected.clamp(-5, 5), atol=1e-5)
        assert abs(float(batch.adv[m].sum())) < 1e-4
    scorer.close()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_epochs_change_every_trainable_parameter_and_no_frozen_one(mode, paths, tmp_path):
    cfg = make_cfg(paths, tmp_path, f"roles.mode={mode}", "optim.weight_decay=0.0")
    roles, world, scorer = setup(cfg)
    opts = build_optimizers(roles, cfg.optim)
    assert set(opts) == {"generator", "fake", "surrogate"}
    host = roles.host.model if mode == "lora" else None
    everything = {f"{n}/{k}": p for n, r in roles.active().items() for k, p in role_named_parameters(r, host)}
    before = {k: p.detach().clone() for k, p in everything.items()}
    stream, gen = PromptStream(world.train_words, 0), torch.Generator().manual_seed(0)
    for epoch in (1, 2):
        batch = rollout_phase(roles, world, stream, scorer, cfg.train, cfg.tdm, gen)
        advantage_phase(batch, cfg.train)
        assert batch.adv.abs().sum() > 0  # the reward separates samples, so the surrogate gets a signal
        update_phase(roles, opts, batch, cfg.train, cfg.tdm, cfg, epoch, gen)
    scorer.close()
    trainable = {id(p) for ps in roles.trainable().values() for p in ps}
    shadows = {id(p) for r in ("generator_ema", "slow_surrogate") for p in getattr(roles, r).parameters()}
    changed = {k for k, p in everything.items() if not torch.equal(p, before[k])}
    for k, p in everything.items():
        if id(p) in trainable or id(p) in shadows:
            assert k in changed, f"trainable {k} did not change"
        else:
            assert k not in changed, f"frozen {k} changed"
    assert {k.split("/")[0] for k in changed} == {"generator", "fake", "surrogate", "generator_ema", "slow_surrogate"}


def deterministic(rec):
    return {k: v for k, v in rec.items() if not k.startswith("sec_")}


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_four_epochs_equal_two_plus_resume_plus_two(paths, tmp_path):
    full = train(make_cfg(paths, tmp_path / "full", "train.epochs=4"))
    train(make_cfg(paths, tmp_path / "half", "train.epochs=2"))
    resumed = train(make_cfg(paths, tmp_path / "half", "train.epochs=4"), "auto")
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "half")
    assert [r["epoch"] for r in a] == [1, 2, 3, 4] == [r["epoch"] for r in b]
    assert [deterministic(r) for r in a] == [deterministic(r) for r in b]
    assert full["tdm_r1_4nfe"] == {
        **resumed["tdm_r1_4nfe"],
        "seconds_sampling": full["tdm_r1_4nfe"]["seconds_sampling"],
        "seconds_ocr": full["tdm_r1_4nfe"]["seconds_ocr"],
    }
    # the resumed summary's wall-clock counts the first process's epochs too
    first_two = sum(r[k] for r in b[:2] for k in ("sec_rollout_reward", "sec_update", "sec_eval"))
    assert resumed["minutes"] * 60 >= first_two + sum(r["sec_update"] for r in b[2:]) - 0.6
    ga, _, _, _ = ckpt.read_model(tmp_path / "full" / "generator.safetensors")
    gb, _, _, _ = ckpt.read_model(tmp_path / "half" / "generator.safetensors")
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    for name in ("report.md", "summary.json", "reward_curve.png", "samples_start.png", "samples_end.png"):
        assert (tmp_path / "full" / name).is_file(), name
    # the start grid was drawn by the first process, the end by the resumed one: the same pairs as uninterrupted
    pair = "samples_start_end.png"
    assert (tmp_path / "half" / pair).read_bytes() == (tmp_path / "full" / pair).read_bytes()


@register_reward("always_fails")
def _failing(term):
    return lambda images, prompts, targets: torch.full((images.shape[0],), float("nan"))


def test_reward_failure_stops_after_a_checkpoint(paths, tmp_path):
    cfg = make_cfg(paths, tmp_path, "train.epochs=3", "train.rewards=[{name: always_fails, weight: 1.0}]")
    with pytest.raises(RewardFailureError, match=r"6 of 6 samples could not be scored.*state saved at"):
        train(cfg)
    assert ckpt.list_train_states(tmp_path)  # nothing is lost: the run can resume


def test_unknown_reward_is_a_clear_error(paths, tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'nope'; registered: .*dark_fraction"):
        train(make_cfg(paths, tmp_path, "train.rewards=[{name: nope, weight: 1.0}]"))


def test_ablation_switches_run(paths, tmp_path):
    for i, extra in enumerate(["train.generator_loss=direct_rl", "train.eta=1.0", "train.surrogate_reference=ema"]):
        out = train(make_cfg(paths, tmp_path / str(i), "train.epochs=1", extra))
        assert np.isfinite(out["tdm_r1_4nfe"]["ocr_mean"])


def test_fresh_run_in_a_used_directory_keeps_the_earlier_run_apart(paths, tmp_path):
    first = train(make_cfg(paths, tmp_path, "train.epochs=2"))
    old_metrics = (tmp_path / "metrics.jsonl").read_text()
    old_generator = (tmp_path / "generator.safetensors").read_bytes()
    train(make_cfg(paths, tmp_path, "train.epochs=1", "seed=1"))
    prev = tmp_path / "previous_1"
    assert (prev / "metrics.jsonl").read_text() == old_metrics  # moved intact
    assert (prev / "generator.safetensors").read_bytes() == old_generator
    assert json.loads((prev / "summary.json").read_text())["epochs"] == first["epochs"] == 2
    assert [r["epoch"] for r in metrics(tmp_path)] == [1]  # the new run's log holds only its own epochs
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["state_000001.safetensors"]


def test_surrogate_probe_reads_a_training_state(paths, tmp_path, monkeypatch, capsys):
    import sys

    train(make_cfg(paths, tmp_path, "train.epochs=2"))
    probe = _tool("surrogate_probe")
    state = tmp_path / "checkpoints" / "state_000002.safetensors"
    monkeypatch.setattr(sys, "argv", ["probe", "--run", str(tmp_path), "--state", str(state), "--prompts", "2"])
    probe.main()
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("x_")]
    # 4 stored states; each row's tau lies above its s (x_1 at s=.9 has none of the probe's taus)
    assert {r[0] for r in rows} == {"x_2", "x_3", "x_4"}
    assert all(float(r[2]) > float(r[1]) and np.isfinite(float(r[4])) for r in rows)
    assert len([r for r in rows if r[0] == "x_4"]) == 6


def _tool(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_surrogate_fit_trains_the_surrogate_and_probes_it_each_pass(paths, tmp_path, monkeypatch, capsys):
    import sys

    from tdm_r1.config import save_config

    save_config(make_cfg(paths, tmp_path), tmp_path / "config.yaml")
    fit = _tool("surrogate_fit")
    argv = ["fit", "--config", str(tmp_path / "config.yaml"), "--epochs", "2", "--passes", "2", "--probe-prompts", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    fit.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("12 training samples") and "6 fresh held-out samples" in out[0]
    passes = [ln for ln in out if ln.startswith("pass ")]
    # one optimizer step per stored micro-batch (2 epochs x 2 micro-batches of one group) per pass
    assert passes == [p for p in passes if "surrogate steps" in p] and [p.split()[2] for p in passes] == ["4", "8"]
    cells = {}
    for ln in out:
        if ln.startswith(("in-sample", "fresh")):
            tag, *rest = ln.split()
            cells.setdefault(tag, []).append({c.split(":")[0]: c.split(":")[1] for c in rest})
    assert set(cells) == {"in-sample", "fresh"} and all(len(v) == 2 for v in cells.values())
    # states x3 (s = .75) and x4 (s = 0), each tau of the tool above its s
    assert set(cells["fresh"][0]) == {"x3/0.8", "x4/0.1", "x4/0.3", "x4/0.5", "x4/0.8"}
    # the surrogate moved away from the reference: l - l_ref is no longer 0 on its own samples
    diffs = [float(v.split("(")[1].rstrip(")")) for v in cells["in-sample"][-1].values()]
    assert any(d != 0.0 for d in diffs)


def test_best_of_k_tool_reports_a_nondecreasing_ceiling(paths, monkeypatch, capsys):
    import sys

    argv = ["best_of_k", "--checkpoint", str(paths / "teacher.safetensors"), "--words", "2", "--samples", "3"]
    argv += ["--set", f"world.heldout_words={paths / 'heldout.txt'}", "--set", "threads=1"]
    monkeypatch.setattr(sys, "argv", argv)
    _tool("best_of_k").main()
    out = capsys.readouterr().out.splitlines()
    assert "2 held-out words x 3 samples" in out[0]
    best = [(int(ln.split()[2].rstrip(":")), float(ln.split()[-1])) for ln in out if ln.startswith("best of")]
    assert [k for k, _ in best] == [1, 2, 3]
    assert all(a[1] <= b[1] for a, b in zip(best, best[1:])) and all(0.0 <= v <= 1.0 for _, v in best)


def test_error_positions_tool_reports_rates_and_the_worlds_renders(paths, monkeypatch, capsys):
    import sys

    argv = ["error_positions", "--checkpoint", str(paths / "teacher.safetensors"), "--samples", "2"]
    argv += ["--set", f"world.heldout_words={paths / 'heldout.txt'}", "--set", "threads=1"]
    monkeypatch.setattr(sys, "argv", argv)
    _tool("error_positions").main()
    out = capsys.readouterr().out.splitlines()
    n_words = len((paths / "heldout.txt").read_text().split())
    assert out[0].endswith(f"{2 * n_words} samples") and out[3] == f"the world's renders: {2 * n_words} samples"
    for line in (out[1], out[2], out[4], out[5]):
        rates = [float(c.split(":")[1]) for c in line.split(":", 1)[1].split()]
        assert rates and all(0.0 <= r <= 1.0 for r in rates)
    positions = [int(c.split(":")[0]) for c in out[1].split(":", 1)[1].split()]
    assert positions == list(range(1, len(positions) + 1))


def test_baselines_cache_follows_checkpoint_contents_not_paths(paths, tmp_path):
    cfg0 = make_cfg(paths, tmp_path / "a")
    teacher = ckpt.load_model(cfg0.roles.teacher)[0]
    init = tmp_path / "student_adapter.safetensors"

    def write_adapter(seed):
        roles = build_roles(cfg0.roles, teacher, surrogate=False, fake=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in roles.generator.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ckpt.save_adapter(init, {k: v for k, v in roles_adapter(roles).items()}, cfg0)

    def roles_adapter(roles):
        update_shadow(roles, "generator_ema", 0.0)
        return roles.adapter_tensors("generator_ema")

    extra = ("train.epochs=1", "train.eval_baselines=true", "sample.nfe=2", f"roles.generator_init={init}")
    write_adapter(1)
    first = train(make_cfg(paths, tmp_path / "a", *extra))
    key1 = json.loads((tmp_path / "a" / "baselines.json").read_text())["key"]
    write_adapter(2)  # another student at the same path
    second = train(make_cfg(paths, tmp_path / "a", *extra))
    key2 = json.loads((tmp_path / "a" / "baselines.json").read_text())["key"]
    assert key1["generator_init"] == key2["generator_init"] and key1["generator_init_id"] != key2["generator_init_id"]
    fresh = train(make_cfg(paths, tmp_path / "b", *extra))  # no cache: what the second run must have measured
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}
    assert strip(second["tdm_4nfe"]) == strip(fresh["tdm_4nfe"])
    assert strip(first["teacher_4nfe"]) == strip(second["teacher_4nfe"])


def test_baseline_rows_are_shared_between_runs_by_what_they_measured(paths, tmp_path, monkeypatch):
    import tdm_r1.evaluate as evaluate

    sampled = []
    real = evaluate.evaluate_role

    def spy(role, world, cfg, words, nfe, *args, **kwargs):
        sampled.append((nfe, kwargs.get("many_step", False)))
        return real(role, world, cfg, words, nfe, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_role", spy)  # the baselines' samplings (not the run's final rows)
    extra = ("train.epochs=1", "train.eval_baselines=true", "sample.nfe=2")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}
    rows = ("teacher_32nfe_cfg", "teacher_4nfe", "tdm_4nfe")

    first = train(make_cfg(paths, tmp_path / "a", *extra))
    assert len(sampled) == 3 and len(list((tmp_path / ".baseline_cache").glob("*.json"))) == 3
    sampled.clear()
    second = train(make_cfg(paths, tmp_path / "b", *extra))  # another run, the same teacher and start: no baseline
    assert sampled == []
    assert all(strip(first[r]) == strip(second[r]) for r in rows)
    sampled.clear()
    third = train(make_cfg(paths, tmp_path / "c", *extra, "sample.nfe=3"))  # the many-step sampler changed
    assert sampled == [(3, True)]  # that row alone is measured again
    assert strip(third["teacher_4nfe"]) == strip(first["teacher_4nfe"]) and third["teacher_32nfe_cfg"]["nfe"] == 3
    sampled.clear()
    alone = train(make_cfg(paths, tmp_path / "d", *extra, "eval.baseline_cache="))  # not shared: all measured
    assert len(sampled) == 3
    assert all(strip(alone[r]) == strip(first[r]) for r in rows)  # the shared rows are what a fresh measure gives


def test_summary_rows_at_several_eval_seeds_and_the_paired_gain(paths, tmp_path):
    extra = (
        "train.epochs=1",
        "train.eval_baselines=true",
        "sample.nfe=2",
        "eval.train_rows=true",
        "eval.train_subset=3",
    )
    one = train(make_cfg(paths, tmp_path / "one", *extra))
    two = train(make_cfg(paths, tmp_path / "two", *extra, "eval.seeds=2", "eval.reference_seeds=1"))
    assert "seeds" not in two["teacher_32nfe_cfg"] and "ocr_mean_sem" not in one["tdm_r1_4nfe"]
    assert two["teacher_32nfe_cfg"]["ocr_mean"] == one["teacher_32nfe_cfg"]["ocr_mean"]
    assert one["tdm_4nfe"]["n"] == 2 and one["tdm_4nfe_train"]["n"] == one["tdm_r1_4nfe_train"]["n"] == 3
    for key in ("teacher_4nfe", "tdm_4nfe", "tdm_r1_4nfe", "tdm_4nfe_train", "tdm_r1_4nfe_train"):
        r = two[key]
        assert r["seeds"] == [1234, 1235] and r["n"] == 2 * one[key]["n"]
        # the first seed is the single-seed run's evaluation (same training: eval does not touch the stream)
        assert r["ocr_mean_per_seed"][0] == pytest.approx(one[key]["ocr_mean"], abs=1e-6)
        assert r["ocr_mean"] == pytest.approx(sum(r["ocr_mean_per_seed"]) / 2, abs=1e-6)
    gain = two["gain_4nfe"]
    per = [b - a for a, b in zip(two["tdm_4nfe"]["ocr_mean_per_seed"], two["tdm_r1_4nfe"]["ocr_mean_per_seed"])]
    assert gain["per_seed"] == pytest.approx(per) and gain["sem"] == pytest.approx(abs(per[0] - per[1]) / 2)
    assert one["gain_4nfe"] == {"ocr_mean": pytest.approx(one["tdm_r1_4nfe"]["ocr_mean"] - one["tdm_4nfe"]["ocr_mean"])}
    train_gain = [
        b - a for a, b in zip(two["tdm_4nfe_train"]["ocr_mean_per_seed"], two["tdm_r1_4nfe_train"]["ocr_mean_per_seed"])
    ]
    assert two["gain_4nfe_train"]["per_seed"] == pytest.approx(train_gain)
    report = (tmp_path / "two" / "report.md").read_text()
    assert "(2 seeds)" in report and "On the train-split words" in report
    final, teacher = two["tdm_r1_4nfe"], two["teacher_32nfe_cfg"]
    diff = final["ocr_mean"] - teacher["ocr_mean"]
    headline = (
        f"**TDM-R1 at 4 NFE: {final['ocr_mean']:.3f} +- {final['ocr_mean_sem']:.3f} (2 seeds) held-out ocr vs the "
        f"teacher at 2 NFE + CFG {teacher['cfg']:g}: {teacher['ocr_mean']:.3f} ({diff:+.3f})"
    )
    assert report.split("\n")[2].startswith(headline), report.split("\n")[2]  # the report opens with it

    # the train-split rows at their own seed count, the held-out rows at one
    three = train(make_cfg(paths, tmp_path / "three", *extra, "eval.train_seeds=2"))
    for key in ("teacher_4nfe", "tdm_4nfe", "tdm_r1_4nfe"):
        assert "seeds" not in three[key] and three[key]["ocr_mean"] == pytest.approx(one[key]["ocr_mean"], abs=1e-6)
    for key in ("tdm_4nfe_train", "tdm_r1_4nfe_train"):
        assert three[key]["ocr_mean_per_seed"] == pytest.approx(two[key]["ocr_mean_per_seed"], abs=1e-6)
    assert three["gain_4nfe_train"]["sem"] == pytest.approx(two["gain_4nfe_train"]["sem"], abs=1e-6)
    assert "sem" not in three["gain_4nfe"]
    report = (tmp_path / "three" / "report.md").read_text()
    assert "set eval.seeds > 1" in report and "(2 seeds)" in report


@pytest.mark.parametrize("field", ["eval.seeds", "eval.reference_seeds", "eval.train_seeds"])
def test_eval_seeds_below_one_fail_before_training(paths, tmp_path, field):
    with pytest.raises(ConfigError, match=f"{field} must be >= 1, got 0"):
        train(make_cfg(paths, tmp_path / "run", f"{field}=0"))
    assert not (tmp_path / "run").exists()
