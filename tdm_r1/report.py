"""Run artefacts: JSONL metric logs and sample grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class JsonlLogger:
    """Appends one JSON object per line; flushes every record so a crash loses nothing written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def save_grid(images: torch.Tensor, path: str | Path, cols: int = 8, scale: int = 2, gap: int = 2) -> None:
    """images [B, 3, H, W] in [0, 1] -> one PNG grid, `cols` per row, white gaps."""
    b, _, h, w = images.shape
    rows = max(1, math.ceil(b / cols))
    canvas = np.ones((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), np.float32)
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, cols)
        canvas[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = arr[i]
    img = Image.fromarray((canvas * 255 + 0.5).astype(np.uint8))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


ROWS = [
    ("teacher_32nfe_cfg", "Teacher, 32 NFE + CFG"),
    ("teacher_4nfe", "Teacher, 4 NFE (Euler)"),
    ("tdm_4nfe", "TDM student, 4 NFE"),
    ("tdm_r1_4nfe", "TDM-R1, 4 NFE"),
]


def summary_points(summary: dict) -> list[tuple[int, float]]:
    """Held-out points a run's summary adds to its curve: the starting generator at epoch 0 and the final EMA
    generator at the last epoch (evaluated at the end, not logged per epoch)."""
    points = []
    for key, epoch in (("tdm_4nfe", 0), ("tdm_r1_4nfe", summary.get("epochs"))):
        r = summary.get(key)
        if isinstance(r, dict) and epoch is not None:
            value = r.get("ocr_mean", r.get("reward_mean"))
            if value is not None:
                points.append((int(epoch), float(value)))
    return points


def plot_curves(metrics: list[dict], path: str | Path, extra_points: list[tuple[int, float]] = ()) -> None:
    """Reward (train rollouts) and held-out OCR per epoch; `extra_points` (epoch, value) join the held-out curve
    (the start and final evaluations of `summary_points`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ep = [m["epoch"] for m in metrics]
    ax.plot(ep, [m["reward_mean"] for m in metrics], label="train reward (rollouts)", lw=1)
    metric = "ocr" if any("heldout_ocr_mean" in m for m in metrics) else "reward"
    ev = [(m["epoch"], m[f"heldout_{metric}_mean"]) for m in metrics if f"heldout_{metric}_mean" in m]
    ev = sorted(dict([*ev, *extra_points]).items())
    if ev:
        ax.plot(*zip(*ev), "o-", label=f"held-out {metric.upper() if metric == 'ocr' else metric} (EMA, 4 NFE)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("OCR score" if metric == "ocr" else "reward")
    if metric == "ocr":
        ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_markdown(summary: dict, ablations: dict[str, dict] | None = None, title: str = "TDM-R1 run") -> str:
    # toy world: OCR of held-out words; diffusers models: the configured reward on held-out prompts
    m = "ocr" if "ocr_mean" in summary.get("tdm_r1_4nfe", {"ocr_mean": 0}) else "reward"
    what = (
        "words, one sample per word, OCR (rapidocr) score" if m == "ocr" else "prompts, one sample per prompt, reward"
    )
    lines = [
        f"# {title}",
        "",
        f"Held-out {what}; a row evaluated at several eval seeds pools them (n samples) and gives the standard error "
        "of its per-seed means.",
        "",
        f"| model | {m}_mean | {m}_exact | n |",
        "|---|---|---|---|",
    ]

    def row(name: str, r: dict) -> str:
        mean = f"{r[f'{m}_mean']:.3f}"
        if f"{m}_mean_sem" in r:
            mean += f" +- {r[f'{m}_mean_sem']:.3f} ({len(r['seeds'])} seeds)"
        return f"| {name} | {mean} | {r[f'{m}_exact']:.3f} | {r['n']} |"

    for key, name in ROWS:
        if key in summary:
            lines.append(row(name, summary[key]))
    for name, s in (ablations or {}).items():
        lines.append(row(f"ablation: {name}, 4 NFE", s["tdm_r1_4nfe"]))
    lines += ["", gain_line(summary["gain_4nfe"], m)] if summary.get("gain_4nfe") else []
    lines += ablation_lines(summary, ablations, "tdm_r1_4nfe", m)
    if "tdm_r1_4nfe_train" in summary:
        lines += ["", "On the train-split words the run trains on (eval.train_rows):", ""]
        lines += [f"| model | {m}_mean | {m}_exact | n |", "|---|---|---|---|"]
        for key, name in (("tdm_4nfe_train", "TDM student, 4 NFE"), ("tdm_r1_4nfe_train", "TDM-R1, 4 NFE")):
            if key in summary:
                lines.append(row(name, summary[key]))
        for name, s in (ablations or {}).items():
            if "tdm_r1_4nfe_train" in s:
                lines.append(row(f"ablation: {name}, 4 NFE", s["tdm_r1_4nfe_train"]))
        if summary.get("gain_4nfe_train"):
            lines += ["", gain_line(summary["gain_4nfe_train"], m, seeds_field="eval.train_seeds")]
        lines += ablation_lines(summary, ablations, "tdm_r1_4nfe_train", m)
    lines += [
        "",
        f"Epochs: {summary.get('epochs')}; wall-clock: {summary.get('minutes')} min; "
        f"checkpoint: `{summary.get('checkpoint')}`",
        "",
        "![reward curve](reward_curve.png)",
        "",
        "Start (same seed): ![start](samples_start.png)",
        "",
        "End: ![end](samples_end.png)",
        "",
    ]
    return "\n".join(lines)


def paired_gain(start: dict, final: dict, metric: str = "ocr") -> dict:
    """final - start in <metric>_mean; when both were evaluated at the same seeds, each seed's difference, their
    standard error (the paired comparison: both models see the same noise and prompts per seed) and how many are
    positive."""
    key = f"{metric}_mean"
    gain = {key: final[key] - start[key]}
    per_key = f"{key}_per_seed"
    if per_key in start and per_key in final and start.get("seeds") == final.get("seeds"):
        per = [b - a for a, b in zip(start[per_key], final[per_key])]
        k = len(per)
        mean = sum(per) / k
        sem = math.sqrt(sum((d - mean) ** 2 for d in per) / (k - 1) / k)
        gain |= {"seeds": start["seeds"], "per_seed": per, "sem": sem, "seeds_positive": sum(d > 0 for d in per)}
    return gain


def ablation_lines(summary: dict, ablations: dict | None, key: str, metric: str) -> list[str]:
    """TDM-R1 minus each ablation in row `key`, paired per eval seed when both were evaluated at the same seeds (the
    paper's ordering is TDM-R1 above both ablations)."""
    lines = []
    for name, s in (ablations or {}).items():
        if key in summary and key in s:
            d = paired_gain(s[key], summary[key], metric)
            text = f"TDM-R1 minus ablation {name}: {d[f'{metric}_mean']:+.4f}"
            if "sem" in d:
                text += f" +- {d['sem']:.4f} ({d['seeds_positive']}/{len(d['per_seed'])} seeds positive)"
            lines.append(text + ".")
    return ["", *lines] if lines else []


def gain_line(gain: dict, metric: str = "ocr", seeds_field: str = "eval.seeds") -> str:
    """The TDM-R1 row minus the starting generator's, with the paired per-seed standard error when there is one."""
    text = f"Gain of TDM-R1 over the starting 4-step generator: {gain[f'{metric}_mean']:+.4f}"
    if "sem" in gain:
        per = " ".join(f"{d:+.3f}" for d in gain["per_seed"])
        text += (
            f" +- {gain['sem']:.4f} (standard error of the paired per-seed differences; "
            f"{gain['seeds_positive']}/{len(gain['per_seed'])} seeds positive: {per})"
        )
    else:
        text += f" (one eval seed, no error estimate: set {seeds_field} > 1 for one)"
    return text + "."


class RunReporter:
    """Per-epoch JSONL (+ TensorBoard when available), sample grids, reward curve and report.md."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run = Path(run_dir)
        self.jsonl = JsonlLogger(self.run / "metrics.jsonl")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run / "tensorboard"))
            except ImportError:
                import logging

                logging.getLogger(__name__).warning("tensorboard is not installed; logging JSONL only")

    def log(self, record: dict, step: int) -> None:
        self.jsonl.log(record)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, step)

    def grid(self, images: torch.Tensor, name: str, n: int = 64) -> None:
        save_grid(images[:n], self.run / name, cols=8)

    def finish(self, summary: dict, ablations: dict[str, dict] | None = None) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        metrics = [json.loads(x) for x in (self.run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        if metrics:
            plot_curves(metrics, self.run / "reward_curve.png", summary_points(summary))
        (self.run / "report.md").write_text(report_markdown(summary, ablations))


def write_report(run_dir: str | Path, ablations: dict[str, str | Path] | None = None) -> Path:
    """Regenerate report.md and reward_curve.png of a finished train run, with ablation rows."""
    run = Path(run_dir)
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: is {run} a finished `tdm-r1 train` run?")
    summary = json.loads(summary_path.read_text())
    abl = {}
    for name, path in (ablations or {}).items():
        p = Path(path) / "summary.json"
        if not p.is_file():
            raise FileNotFoundError(f"ablation {name!r}: {p} not found")
        abl[name] = json.loads(p.read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if metrics:
        plot_curves(metrics, run / "reward_curve.png", summary_points(summary))
    out = run / "report.md"
    out.write_text(report_markdown(summary, abl))
    return out
