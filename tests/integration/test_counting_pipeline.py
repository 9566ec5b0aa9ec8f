"""The counting world through the whole pipeline at the TINY size: pretrain -> distill -> TDM-R1 with the counting
reward -> eval and the counting probe, from the shipped recipes with only the model shrunk and the budgets cut."""

import json
import subprocess
import sys
from pathlib import Path

from utils import TINY

from tdm_r1.cli import main
from tdm_r1.commands.distill import distill
from tdm_r1.commands.pretrain import pretrain
from tdm_r1.commands.train import train
from tdm_r1.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_counting_pipeline_end_to_end(tmp_path):
    teacher_run = tmp_path / "teacher"
    sets = [*TINY, "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.save_every=0", f"run_dir={teacher_run}"]
    pretrain(load_config("configs/toy_counting_teacher_base.yaml", sets))
    teacher = teacher_run / "teacher.safetensors"
    student_run = tmp_path / "student"
    distill(load_config("configs/toy_counting_distill.yaml", [*TINY, f"roles.teacher={teacher}", "distill.steps=1",
                        "distill.batch_size=2", "distill.eval_every=0", "distill.eval_at_end=false",
                        f"run_dir={student_run}"]))  # fmt: skip
    sets = [*TINY, f"roles.teacher={teacher}", f"roles.generator_init={student_run / 'student_adapter.safetensors'}",
            f"roles.fake_init={student_run / 'student_fake_adapter.safetensors'}", "train.epochs=1",
            "train.prompts_per_epoch=2", "train.group_size=2", "train.micro_batch_groups=1", "train.eval_every=0",
            "train.eval_baselines=false", "train.tensorboard=false", "eval.seeds=1",
            f"run_dir={tmp_path / 'r1'}"]  # fmt: skip
    summary = train(load_config("configs/toy_counting_r1.yaml", sets))
    final = summary["tdm_r1_4nfe"]  # the 64 held-out prompts, scored by the strict count reward
    assert final["n"] == 64 and 0.0 <= final["reward_mean"] <= 1.0 and "ocr_mean" not in final
    row = json.loads((tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward_failed"] == 0 and 0.0 <= row["reward_mean"] <= 1.0

    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "r1" / "generator.safetensors"), "--nfe", "4", "--cfg", "1",
                 "--prompts", "configs/words/counting_heldout.txt", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())  # no --config: the counting world's own reward scores it
    assert result["n"] == 64 and result["reward_mean"] == final["reward_mean"]  # eval seed 1234 both times

    probe = subprocess.run(
        [sys.executable, "tools/counting_probe.py", "--checkpoint", str(teacher), "--seed", "1234", "--seeds", "2",
         "--adapter", str(student_run / "student_adapter.safetensors"), "--set", "threads=1", "--markdown",
         str(tmp_path / "probe.md"), "--label", "student"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    profile = json.loads(probe.stdout.splitlines()[0])
    assert sorted(profile["by_count"]) == ["1", "2", "3", "4", "5", "6"]
    assert sum(r["n"] for r in profile["by_count"].values()) == 128  # 64 held-out prompts x 2 seeds
    assert abs(sum(profile["difference"].values()) - 1.0) < 1e-9
    assert (tmp_path / "probe.md").read_text().startswith("### student")
