"""The trainer benchmark (`tdm-r1 bench`): whole TDM-R1 epochs of one config, timed phase by phase, on several loop
paths in one process. The paths' epochs interleave (reference, fused, reference, fused, ...) so that drift of the
machine falls on every path alike, and every ratio is computed within the run.

Paths (each a set of `perf:` settings; all train the same model up to float rounding):
  reference  the official release's loop structure with the eager PyTorch reference ops (kernels/reference.py): CFG
             pairs as two forwards, the generator output recomputed at every drawn step, prompts encoded per batch
  fused      the fused kernels (native on CPU, Triton on CUDA), batched CFG, the rollout's output reused, prompts
             encoded once per epoch; peft's forward everywhere, every reward awaited before the updates
  fast       the trainer's defaults: `fused` plus merged no-grad LoRA forwards (perf.lora_forward) and the first
             fake-score update overlapped with the last rewards (perf.overlap_reward)

Per path: wall seconds per epoch and per phase (`tdm_r1.timing`), images per second, model forward-equivalents per
image counted in the roles (forwards + 2 x forwards with autograd), FLOPs from torch.utils.flop_counter (one forward
counted on the meta device, times the counted forward-equivalents), on CUDA TFLOP/s and MFU, the reward's seconds on
its own thread and how many of them the sampling hid, peak memory, and each epoch's training metrics (the paths agree
to rounding).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time

import torch

from tdm_r1 import timing
from tdm_r1.config import Config, ConfigError, PerfConfig
from tdm_r1.phases import train_epoch
from tdm_r1.rewards.scorer import build_scorer
from tdm_r1.run import Run, build_run

PATHS: dict[str, PerfConfig] = {
    "reference": PerfConfig(
        kernels="reference",
        cfg_batching="separate",
        reuse_rollout_output=False,
        encode_once=False,
        lora_forward="peft",
        overlap_reward=False,
    ),
    "fused": PerfConfig(lora_forward="peft", overlap_reward=False),
    "fast": PerfConfig(),
}
# The order phases are reported in ("other": the epoch's seconds outside every marked phase).
PHASES = (
    "encode",
    "rollout",
    "decode",
    "reward_wait",
    "advantages",
    "recompute",
    "fake",
    "surrogate",
    "generator",
    "optimizer",
    "other",
)
# Dense bf16 peak TFLOP/s of the GPUs MFU is computed against (by a substring of the device name).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def machine() -> dict:
    """What the figures were measured on."""
    info = {
        "cpu": _cpu_model(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forward_flops(cfg: Config) -> float:
    """FLOPs of one sample's generator forward, counted on the meta device (tdm_r1.plan.shape_of): torch's flop
    counter does not see the fused CPU attention kernel, so a count on real CPU tensors would leave attention out."""
    from pathlib import Path

    from tdm_r1.config import is_diffusers
    from tdm_r1.plan import shape_of

    published = is_diffusers(cfg) and not (Path(cfg.diffusers.path) / "transformer" / "config.json").is_file()
    return shape_of(cfg, published).forward_flops


def run_epoch(run: Run, scorer, epoch: int) -> dict:
    """One TDM-R1 epoch of `run` (its own data and random streams), as `tdm-r1 train` runs it; its metrics."""
    rec = train_epoch(run, scorer, epoch)
    run.progress.step = epoch
    return rec


def random_init_config(cfg: Config, workdir, micro_batches: int | None = None) -> Config:
    """`--random-init`: the config's diffusers architecture with random weights and stub text encoders (no starting
    adapters), at the recipe's per-GPU share in one process: distributed.micro_batch_per_gpu samples per micro-batch
    (as whole groups of that size) and P x G / N samples per epoch, N the GPUs the recipe's global micro-batch spans.
    `micro_batches` shortens the epoch to that many micro-batches. Prompt files that do not exist are replaced by
    generated sign prompts in `workdir` (the shapes are what count)."""
    import random
    from pathlib import Path

    from tdm_r1.config import is_diffusers

    if not is_diffusers(cfg):
        raise ConfigError("bench --random-init builds a diffusers architecture (model.kind sd3 / zimage)")
    tc = cfg.train
    per_gpu = cfg.distributed.micro_batch_per_gpu or tc.micro_batch_groups * tc.group_size
    gpus = max(1, tc.micro_batch_groups * tc.group_size // per_gpu)
    prompts_per_epoch = micro_batches or max(1, tc.prompts_per_epoch * tc.group_size // gpus // per_gpu)
    train = dataclasses.replace(tc, group_size=per_gpu, micro_batch_groups=1, prompts_per_epoch=prompts_per_epoch)
    files = {}
    for split, n in (("train", 256), ("heldout", 32)):
        path = getattr(cfg.prompts, split)
        if not path or not Path(path).is_file():
            rng = random.Random(split)
            letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
            words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]
            path = Path(workdir) / f"{split}.txt"
            path.write_text("".join(f'a sign that says "{w}"\n' for w in words))
        files[split] = str(path)
    return dataclasses.replace(
        cfg,
        diffusers=dataclasses.replace(cfg.diffusers, random_init=True),
        roles=dataclasses.replace(cfg.roles, generator_init=None, fake_init=None),
        prompts=dataclasses.replace(cfg.prompts, **files),
        train=train,
        distributed=dataclasses.replace(cfg.distributed, micro_batch_per_gpu=0),
    )


def bench(cfg: Config, paths: list[str], epochs: int = 2, warmup: int = 1) -> dict:
    """Time `epochs` epochs per path (after `warmup` untimed ones), interleaved; the result `write_results` writes."""
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ConfigError(f"bench: unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    if epochs < 1 or warmup < 0:
        raise ConfigError(f"bench: needs epochs >= 1 and warmup >= 0, got {epochs} and {warmup}")
    runs = {p: build_run(dataclasses.replace(cfg, perf=PATHS[p]), "train") for p in paths}
    flops = forward_flops(runs[paths[0]].cfg)
    scorer = build_scorer(cfg)
    recorders = {p: timing.Recorder() for p in paths}
    walls: dict[str, list[float]] = {p: [] for p in paths}
    metrics: dict[str, list[dict]] = {p: [] for p in paths}
    try:
        for epoch in range(1, warmup + epochs + 1):
            for p in paths:
                measured = epoch > warmup
                recorder = recorders[p] if measured else timing.Recorder()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                with runs[p].kernels(), timing.recording(recorder):
                    t0 = time.perf_counter()
                    metrics[p].append(run_epoch(runs[p], scorer, epoch))
                    wall = time.perf_counter() - t0
                if measured:
                    walls[p].append(wall)
    finally:
        scorer.close()
    images = cfg.train.prompts_per_epoch * cfg.train.group_size
    result = {
        "machine": machine(),
        "config": {"prompts_per_epoch": cfg.train.prompts_per_epoch, "group_size": cfg.train.group_size},
        "epochs": epochs,
        "warmup": warmup,
        "images_per_epoch": images,
        "flops_per_forward": flops,
        "paths": {p: path_result(recorders[p], walls[p], metrics[p], images, flops) for p in paths},
    }
    result["ratios"] = ratios(result["paths"])
    result["agreement"] = agreement(metrics)
    return result


def path_result(rec: timing.Recorder, walls: list[float], metrics: list[dict], images: int, flops: float) -> dict:
    """One path's figures per epoch (means over the timed epochs)."""
    n = len(walls)
    epoch_s = statistics.fmean(walls)
    phases = {name: v["seconds"] / n for name, v in rec.as_dict().items() if name in PHASES}
    phases["other"] = max(0.0, epoch_s - sum(phases.values()))
    fe = rec.forward_equivalents() / (n * images)
    reward_s = rec.background.get("reward", 0.0) / n
    hidden = max(0.0, reward_s - phases.get("reward_wait", 0.0))
    out = {
        "epoch_s": epoch_s,
        "epoch_s_each": walls,
        "images_per_s": images / epoch_s,
        "forward_equivalents_per_image": fe,
        "forwards_per_image": {k: v / (n * images) for k, v in rec.forwards.items() if v},
        "grad_forwards_per_image": {k: v / (n * images) for k, v in rec.grad_forwards.items() if v},
        "phases": {k: phases.get(k, 0.0) for k in PHASES},
        "reward_s": reward_s,
        "reward_hidden_s": hidden,
        "reward_hidden_pct": 100.0 * hidden / reward_s if reward_s else None,
        "flops_per_epoch": fe * images * flops,
        "achieved_tflops": fe * images * flops / epoch_s / 1e12,
        "peak_memory_bytes": _peak_memory(),
        "metrics": metrics,
    }
    if torch.cuda.is_available():
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        out["mfu"] = out["achieved_tflops"] / peak if peak else None
    return out


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # the process's peak (KiB on Linux)


def ratios(paths: dict) -> dict:
    """Wall-time ratios of every path to every other, from this run."""
    return {f"{a}/{b}": paths[a]["epoch_s"] / paths[b]["epoch_s"] for a in paths for b in paths if a != b}


def agreement(metrics: dict[str, list[dict]]) -> dict:
    """Largest relative difference between paths of each epoch's reward and losses (they train the same model up to
    float rounding; the reference ops and fused kernels round differently, which grows over epochs)."""
    names = list(metrics)
    keys = ("reward_mean", "loss_gen", "loss_fake", "loss_sur")
    out = {}
    for key in keys:
        worst = 0.0
        for i, recs in enumerate(zip(*(metrics[p] for p in names))):
            vals = [r[key] for r in recs]
            scale = max(abs(v) for v in vals) or 1.0
            worst = max(worst, (max(vals) - min(vals)) / scale)
            if i == 0:
                out[f"{key}_first_epoch"] = (max(vals) - min(vals)) / scale
        out[key] = worst if math.isfinite(worst) else None
    return out


# -- outputs ---------------------------------------------------------------------------------------------------


def markdown_table(result: dict) -> str:
    """Per-phase seconds per epoch of each path, with the totals, throughput and the counted work."""
    paths = result["paths"]
    names = list(paths)
    m = result["machine"]
    lines = [
        f"{result['images_per_epoch']} images per epoch, mean of {result['epochs']} timed epochs per path after "
        f"{result['warmup']} warm-up, interleaved; {m['cpu']} ({m['cpu_isa']}, {m['threads']} threads)"
        + (f", {m['gpu']}" if m["gpu"] else "")
        + f", torch {m['torch']}.",
        "",
        "| phase (s / epoch) | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for ph in PHASES:
        lines.append(f"| {ph} | " + " | ".join(f"{paths[p]['phases'][ph]:.2f}" for p in names) + " |")
    rows = [
        ("**epoch**", lambda r: f"**{r['epoch_s']:.2f}**"),
        ("images / s", lambda r: f"{r['images_per_s']:.2f}"),
        ("forward-equivalents / image", lambda r: f"{r['forward_equivalents_per_image']:.1f}"),
        ("achieved TFLOP/s", lambda r: f"{r['achieved_tflops']:.4f}"),
        ("reward on its thread (hidden) s", lambda r: f"{r['reward_s']:.2f} ({r['reward_hidden_s']:.2f})"),
        ("reward hidden %", lambda r: "-" if r["reward_hidden_pct"] is None else f"{r['reward_hidden_pct']:.0f}"),
    ]
    for label, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(paths[p]) for p in names) + " |")
    lines += ["", "Ratios of epoch wall time: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items())]
    return "\n".join(lines) + "\n"


def write_results(result: dict, stem) -> list:
    """<stem>.json (everything), .csv (path, phase, seconds), .md (the table) and .png (per-phase bars)."""
    import csv
    import json
    from pathlib import Path

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(s) for s in (".json", ".csv", ".md", ".png")]
    out[0].write_text(json.dumps(result, indent=2) + "\n")
    with open(out[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "phase", "seconds_per_epoch"])
        for p, r in result["paths"].items():
            w.writerows([[p, ph, f"{r['phases'][ph]:.4f}"] for ph in PHASES] + [[p, "epoch", f"{r['epoch_s']:.4f}"]])
    out[2].write_text(markdown_table(result))
    plot_phases(result, out[3])
    return out


def plot_phases(result: dict, path) -> None:
    """Stacked bars: each path's epoch split into its phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["paths"])
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.5 * len(names)))
    left = [0.0] * len(names)
    colors = plt.get_cmap("tab20").colors
    for i, ph in enumerate(PHASES):
        vals = [result["paths"][p]["phases"][ph] for p in names]
        ax.barh(names, vals, left=left, color=colors[i % len(colors)], label=ph)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("seconds per epoch")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
