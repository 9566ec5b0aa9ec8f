import json

import pytest
import torch
from safetensors.torch import save_file

from tdm_r1.cli import build_parser, main
from tdm_r1.config import load_config

TINY = [
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "model.text_layers=1",
    "pretrain.steps=4",
    "pretrain.batch_size=4",
    "pretrain.save_every=2",
    "pretrain.log_every=1",
    "pretrain.warmup_steps=1",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    rc = main(
        [
            "pretrain",
            "--config",
            "configs/toy_ocr_teacher.yaml",
            "--set",
            f"run_dir={run}",
            *sum((["--set", o] for o in TINY), []),
        ]
    )
    assert rc == 0
    return run


def test_pretrain_writes_config_metrics_and_checkpoints(teacher):
    cfg = load_config(teacher / "config.yaml")
    assert cfg.model.dim == 32 and cfg.pretrain.steps == 4
    lines = [json.loads(x) for x in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in lines)
    assert (teacher / "checkpoints" / "step_000002.safetensors").is_file()
    assert (teacher / "teacher.safetensors").is_file()


def _pretrain(run, *sets):
    return main(
        ["pretrain", "--config", "configs/toy_ocr_teacher.yaml", "--set", f"run_dir={run}"]
        + sum((["--set", o] for o in [*TINY, *sets]), [])
    )


def test_pretrain_init_continues_from_the_checkpoint_weights(teacher, tmp_path):
    from tdm_r1.checkpoint import read_model

    start, *_ = read_model(teacher / "teacher.safetensors")
    # lr 0: the model cannot move, so the EMA written after 2 steps is the init checkpoint's weights, bit for bit
    assert _pretrain(tmp_path / "a", f"pretrain.init={teacher / 'teacher.safetensors'}", "pretrain.lr=0.0") == 0
    same, *_ = read_model(tmp_path / "a" / "teacher.safetensors")
    assert same.keys() == start.keys() and all(torch.equal(same[k], start[k]) for k in start)
    # the same run without init starts from fresh weights (seed 0, as the fixture): not the fixture's trained ones
    assert _pretrain(tmp_path / "b", "pretrain.lr=0.0") == 0
    fresh, *_ = read_model(tmp_path / "b" / "teacher.safetensors")
    assert any(not torch.equal(fresh[k], start[k]) for k in start)
    # and with lr > 0 it trains on from the init weights on another world
    assert _pretrain(tmp_path / "c", f"pretrain.init={teacher / 'teacher.safetensors'}", "world.jitter_x=8") == 0
    moved, _, world, _ = read_model(tmp_path / "c" / "teacher.safetensors")
    assert world.jitter_x == 8 and any(not torch.equal(moved[k], start[k]) for k in start)


def test_pretrain_init_with_another_model_is_a_config_error(teacher, tmp_path, capsys):
    assert _pretrain(tmp_path / "x", f"pretrain.init={teacher / 'teacher.safetensors'}", "model.dim=48") == 2
    err = capsys.readouterr().err
    assert "pretrain.init=" in err and "'dim': (32, 48)" in err
    assert not (tmp_path / "x" / "teacher.safetensors").exists()


def test_eval_on_prompt_file_writes_json_and_grid(teacher, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("CAT\nDOG\nQUIZ\n")
    out = tmp_path / "ev" / "res.json"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(teacher / "teacher.safetensors"),
            "--prompts",
            str(words),
            "--nfe",
            "2",
            "--cfg",
            "2.0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n"] == 3 and 0.0 <= res["ocr_mean"] <= 1.0 and 0.0 <= res["ocr_exact"] <= 1.0
    assert out.with_suffix(".png").is_file()


def test_eval_over_seeds_pools_the_single_seed_runs(teacher, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("CAT\nDOG\nQUIZ\nAB\n")
    base = ["eval", "--checkpoint", str(teacher / "teacher.safetensors"), "--prompts", str(words), "--nfe", "2"]
    single = []
    for seed in (5, 6):
        out = tmp_path / f"s{seed}.json"
        assert main([*base, "--set", f"eval.seed={seed}", "--out", str(out)]) == 0
        single.append(json.loads(out.read_text()))
    out = tmp_path / "both.json"
    assert main([*base, "--set", "eval.seed=5", "--seeds", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    a, b = (r["ocr_mean"] for r in single)
    assert res["seeds"] == [5, 6] and res["ocr_mean_per_seed"] == [a, b]
    n = [r["n"] for r in single]
    assert res["n"] == sum(n) == 8
    assert res["ocr_mean"] == pytest.approx((a * n[0] + b * n[1]) / sum(n))
    assert res["ocr_exact"] == pytest.approx((single[0]["ocr_exact"] * n[0] + single[1]["ocr_exact"] * n[1]) / sum(n))
    assert res["ocr_mean_sem"] == pytest.approx(abs(a - b) / 2)  # sample std of two / sqrt(2)
    assert main([*base, "--seeds", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, pattern", [(b"CAT\nd0g\n", "words.txt:2:"), (b"", "empty"), (b"\xff\n", ":1: not valid UTF-8")]
)
def test_eval_rejects_malformed_prompt_file(teacher, tmp_path, capsys, content, pattern):
    words = tmp_path / "words.txt"
    words.write_bytes(content)
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(teacher / "teacher.safetensors"),
            "--prompts",
            str(words),
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 2
    assert pattern in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_eval_refuses_truncated_and_foreign_checkpoints(teacher, tmp_path, capsys):
    data = (teacher / "teacher.safetensors").read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    assert main(["eval", "--checkpoint", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    assert "truncated" in capsys.readouterr().err
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert main(["eval", "--checkpoint", str(foreign), "--out", str(tmp_path / "r.json")]) == 2
    assert "not a tdm-r1 model checkpoint" in capsys.readouterr().err


def test_sample_writes_png(teacher, tmp_path):
    out = tmp_path / "s.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(teacher / "teacher.safetensors"),
                "CAT",
                "HELLO",
                "--nfe",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.stat().st_size > 0


@pytest.mark.parametrize("command", ["pretrain", "eval", "sample"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_sample_from_a_pretrain_run_is_its_teacher(teacher, tmp_path, capsys):
    """A teacher's run directory (its newest training state, step 2: the EMA weights, or --role generator the online
    ones) samples what the EMA checkpoint written at that step samples."""
    common = ["CAT", "DOG", "--nfe", "2", "--cfg", "2", "--seed", "5"]
    for name, source, role in (("file", teacher / "checkpoints" / "step_000002.safetensors", []), ("run", teacher, []),
                               ("online", teacher, ["--role", "generator"])):  # fmt: skip
        out = tmp_path / name
        assert (
            main(
                [
                    "sample",
                    "--checkpoint",
                    str(source),
                    *role,
                    *common,
                    "--images",
                    str(out),
                    "--out",
                    str(out / "g.png"),
                ]
            )
            == 0
        )
    png = lambda d: [p.read_bytes() for p in sorted(d.glob("0*.png"))]
    assert png(tmp_path / "run") == png(tmp_path / "file") and len(png(tmp_path / "run")) == 2
    assert png(tmp_path / "online") != png(tmp_path / "file")
    assert (
        main(["sample", "--checkpoint", str(teacher), "--role", "fake", "CAT", "--out", str(tmp_path / "x.png")]) == 2
    )
    assert "a pretrain state: --role generator_ema (EMA) or generator" in capsys.readouterr().err
