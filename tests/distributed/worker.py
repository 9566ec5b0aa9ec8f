"""The ranks of tests/distributed/test_zero3.py: `torchrun --nproc_per_node 2 worker.py OUT TEACHER HELDOUT`.

Every rank writes OUT/rank<r>.json; rank 0 also writes the run directories. In order:
1. full mode, ZeRO-3: build the roles and engines, record each tensor's partition size on this rank, run one
   micro-batch of fake / surrogate / generator backward and record the bytes of parameters and gradients this rank
   holds between backward and step, and of optimizer states after the step;
2. `train` 1 epoch, then `train --resume` to 2 epochs (OUT/resumed);
3. lora mode, ZeRO-3: `train` 2 epochs (OUT/lora), and the partition sizes of the shared base.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tdm_r1 import distributed
from tdm_r1.checkpoint.sources import load_teacher
from tdm_r1.commands.train import train
from tdm_r1.config import load_config
from tdm_r1.roles import build_roles

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/toy_ocr_r1_tiny_ds.yaml"
TINY = ["model.dim=32", "model.depth=1", "model.heads=2", "model.text_layers=1"]
# P=2 prompts x G=4; one group per global micro-batch, so each group spans both ranks (2 samples each)
RUN = ["train.prompts_per_epoch=2", "train.group_size=4", "train.micro_batch_groups=1", "eval.train_subset=2"]


def overrides(teacher: str, heldout: str, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, *RUN, f"roles.teacher={teacher}", f"world.heldout_words={heldout}", f"run_dir={run_dir}", *extra]


def partitions(roles) -> dict[str, list[int]]:
    """{role/param: [numel of this rank's partition, numel of the whole tensor]} for every role, reference too."""
    out = {}
    for name, role in roles.active().items():
        named = roles.host.model.named_parameters() if roles.host is not None else role.module.named_parameters()
        for k, p in named:
            out.setdefault(f"{'base' if roles.host is not None else name}/{k}", [p.ds_tensor.numel(), p.ds_numel])
    return out


def memory(cfg) -> dict:
    """Partition sizes, and this rank's bytes after one micro-batch of every backward (benchmarks/zero_memory.py)."""
    spec = importlib.util.spec_from_file_location("zero_memory", ROOT / "benchmarks" / "zero_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    held, roles = bench.measure(cfg)
    return {"partitions": partitions(roles), "memory": held}


def main(out: Path, teacher: str, heldout: str) -> None:
    result = memory(load_config(CONFIG, overrides(teacher, heldout, out / "unused")))
    train(load_config(CONFIG, overrides(teacher, heldout, out / "resumed", "train.epochs=1")))
    train(load_config(CONFIG, overrides(teacher, heldout, out / "resumed", "train.epochs=2")), resume="auto")
    lora = load_config(CONFIG, overrides(teacher, heldout, out / "lora", "roles.mode=lora", "roles.lora_rank=4"))
    train(lora)
    dist = distributed.init(lora.distributed, lora.optim)
    roles = build_roles(lora.roles, load_teacher(lora), place=dist.place)  # partitioned, not wrapped in engines
    result["lora_partitions"] = partitions(roles)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    distributed.run_script(main, Path(sys.argv[1]), sys.argv[2], sys.argv[3])
