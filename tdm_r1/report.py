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
    # several rewards: each one's own mean beside their weighted sum
    names = sorted({k for m in metrics for k in m if k.startswith("reward_") and k.endswith("_mean")} - {"reward_mean"})
    for key in names:
        ax.plot(ep, [m.get(key, math.nan) for m in metrics], "--", lw=0.8, label=key.removesuffix("_mean"))
    gold = [(m["epoch"], m["heldout_gold_mean"]) for m in metrics if "heldout_gold_mean" in m]
    if gold:
        ax.plot(*zip(*gold), "s-", lw=1, label="held-out gold reward")
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


def gold_lines(gold: dict | None) -> list[str]:
    """train.gold: its score at every evaluation, the best generator kept, and any reward-hacking warning."""
    if not gold:
        return []
    points = ", ".join(f"{h['gold']:.3f} (epoch {h['epoch']})" for h in gold["history"])
    best = "none finite" if gold["best"] is None else f"{gold['best']:.3f} at epoch {gold['best_epoch']}"
    lines = ["", f"Gold reward `{gold['reward']}` (never trained on) on the held-out samples: {points}. Best: "
             f"{best} (the generator kept as `generator_best_gold.safetensors`)."]  # fmt: skip
    for epoch in gold["warnings"]:
        lines.append(
            f"**Warning (epoch {epoch}):** the training reward rose while gold fell for two evaluations in a row; "
            "the training reward may be gamed."
        )
    return lines


def report_markdown(summary: dict, ablations: dict[str, dict] | None = None, title: str = "TDM-R1 run") -> str:
    # toy world: OCR of held-out words; diffusers models: the configured reward on held-out prompts
    m = "ocr" if "ocr_mean" in summary.get("tdm_r1_4nfe", {"ocr_mean": 0}) else "reward"
    what = (
        "words, one sample per word, OCR (rapidocr) score" if m == "ocr" else "prompts, one sample per prompt, reward"
    )
    tiles = (
        "words and noise (each tile: the word, what the reward read, its score; green = exact)"
        if m == "ocr"
        else "prompts and noise (each tile: the prompt, what the reward found where it says, its score; green = full "
        "score)"
    )
    lines = [
        f"# {title}",
        "",
        *headline_lines(summary, m),
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
            lines.append(row(row_name(key, name, summary[key]), summary[key]))
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
    lines += gold_lines(summary.get("gold"))
    lines += [
        "",
        f"Epochs: {summary.get('epochs')}; wall-clock: {summary.get('minutes')} min; "
        f"checkpoint: `{summary.get('checkpoint')}`",
        "",
        "![reward curve](reward_curve.png)",
        "",
        f"The start and end generators on the same held-out {tiles}: ![start vs end](samples_start_end.png)",
        "",
        "Start: ![start](samples_start.png)",
        "",
        "End: ![end](samples_end.png)",
        "",
    ]
    return "\n".join(lines)


def row_name(key: str, name: str, result: dict) -> str:
    """A report row's name with the sampler it was evaluated with (the teacher's CFG scale, the NFE)."""
    if key == "teacher_32nfe_cfg" and "nfe" in result:
        return f"Teacher, {result['nfe']} NFE + CFG {result.get('cfg', '?'):g}"
    return name


def headline_lines(summary: dict, metric: str) -> list[str]:
    """The comparison a reader comes for, in one sentence: TDM-R1 at K steps against the teacher's many-step CFG row
    and the starting generator (paired over eval seeds when it was evaluated at several)."""
    final, teacher = summary.get("tdm_r1_4nfe"), summary.get("teacher_32nfe_cfg")
    if not final or not teacher or "nfe" not in teacher:
        return []
    key = f"{metric}_mean"

    def value(r: dict) -> str:
        sem = f" +- {r[f'{key}_sem']:.3f} ({len(r['seeds'])} seeds)" if f"{key}_sem" in r else ""
        return f"{r[key]:.3f}{sem}"

    text = (
        f"**TDM-R1 at {final.get('nfe', 4)} NFE: {value(final)} held-out {metric} vs the teacher at "
        f"{teacher.get('nfe', '?')} NFE + CFG {teacher.get('cfg', 0):g}: {value(teacher)} "
        f"({final[key] - teacher[key]:+.3f})"
    )
    gain = summary.get("gain_4nfe")
    if gain:
        text += f"; vs the TDM student at the same NFE: {gain[key]:+.3f}"
        if "sem" in gain:
            text += f" +- {gain['sem']:.3f} paired ({gain['seeds_positive']}/{len(gain['per_seed'])} seeds positive)"
    return [text + ".**", ""]


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
        exact = f"{metric}_exact_per_seed"
        if exact in start and exact in final:  # the rate of perfect scores (a like rule's rate), paired the same way
            per = [b - a for a, b in zip(start[exact], final[exact])]
            mean = sum(per) / k
            gain |= {"exact": mean, "exact_per_seed": per, "exact_seeds_positive": sum(d > 0 for d in per),
                     "exact_sem": math.sqrt(sum((d - mean) ** 2 for d in per) / (k - 1) / k)}  # fmt: skip
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
        if "exact" in gain:
            text += (
                f"; in {metric}_exact (the share of perfect scores) {gain['exact']:+.4f} +- {gain['exact_sem']:.4f} "
                f"({gain['exact_seeds_positive']}/{len(gain['exact_per_seed'])} seeds positive)"
            )
    else:
        text += f" (one eval seed, no error estimate: set {seeds_field} > 1 for one)"
    return text + "."


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def sample_captions(words: list[str], readings: list[str | None], scores: list[float]) -> list[list[str]]:
    """Caption lines of each tile: the target word, then what the reward read (if it reads) and its score."""
    out = []
    for word, reading, score in zip(words, readings, scores):
        got = "?" if reading is None else (reading[:16] or "(nothing)")
        out.append([word[:24], f"{got}  {score:.2f}"])
    return out


def save_labelled_grid(
    images: torch.Tensor,
    captions: list[list[str]],
    path: str | Path,
    cols: int = 4,
    scale: int = 3,
    marks: list[bool] | None = None,
) -> None:
    """images [B, 3, H, W] in [0, 1] -> one PNG grid, each tile upscaled `scale` x with its caption lines below it;
    a tile whose mark is True gets a green caption (e.g. an exact OCR reading), else red."""
    from PIL import ImageDraw

    b, _, h, w = images.shape
    if len(captions) != b:
        raise ValueError(f"save_labelled_grid: {b} images but {len(captions)} captions")
    font, line_h, gap = _font(12), 14, 6
    n_lines = max((len(c) for c in captions), default=0)
    tw, th = w * scale, h * scale + n_lines * line_h + 2
    tile_w = max(tw, 120)
    rows = max(1, math.ceil(b / cols))
    canvas = Image.new("RGB", (cols * (tile_w + gap) + gap, rows * (th + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        x0, y0 = gap + c * (tile_w + gap), gap + r * (th + gap)
        tile = Image.fromarray(arr[i]).resize((tw, h * scale), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        colour = (0, 0, 0) if marks is None else ((0, 110, 0) if marks[i] else (170, 0, 0))
        for k, line in enumerate(captions[i]):
            draw.text((x0, y0 + h * scale + 1 + k * line_h), line, fill=(0, 0, 0) if k == 0 else colour, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def save_start_end_grid(
    start: torch.Tensor,
    end: torch.Tensor,
    start_captions: list[list[str]],
    end_captions: list[list[str]],
    path: str | Path,
    pairs_per_row: int = 2,
    marks: tuple[list[bool], list[bool]] | None = None,
    names: tuple[str, str] = ("start", "end"),
) -> None:
    """The start and end generators' samples of the same words and noise side by side: tile 2i is the start's
    sample of word i ("start: ..."), tile 2i + 1 the end's ("end: ..."); `names` relabels them."""
    if start.shape != end.shape or not len(start_captions) == len(end_captions) == start.shape[0]:
        raise ValueError("save_start_end_grid: start and end must hold the same samples")
    images = torch.stack([start, end], 1).flatten(0, 1)
    captions, flags = [], []
    for i, (a, b) in enumerate(zip(start_captions, end_captions)):
        captions += [[a[0], f"{names[0]}: " + a[1]], [b[0], f"{names[1]}: " + b[1]]]
        if marks is not None:
            flags += [marks[0][i], marks[1][i]]
    save_labelled_grid(images, captions, path, cols=2 * pairs_per_row, marks=flags if marks is not None else None)


SAMPLE_TILES = 64  # labelled tiles per grid for small (toy) images; the start / end grid shows half of them as pairs
SAMPLE_TILES_LARGE = 16  # for larger images (diffusers runs)


def sample_tiles(images: torch.Tensor) -> int:
    """How many of a stage's samples the labelled grids show."""
    return SAMPLE_TILES if images.shape[-2] * images.shape[-1] <= 64 * 64 else SAMPLE_TILES_LARGE


def save_samples(path: Path, images: torch.Tensor, words: list[str]) -> None:
    """Samples as uint8 [N, C, H, W] with their words in the safetensors metadata."""
    from safetensors.torch import save_file

    u8 = (images.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).contiguous()
    save_file({"images": u8}, str(path), metadata={"words": json.dumps(words)})


def load_samples(path: Path) -> tuple[torch.Tensor, list[str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, images = f.metadata(), f.get_tensor("images")
    return images.float() / 255, json.loads(meta["words"])


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

    def keep_start(self, images: torch.Tensor, words: list[str]) -> None:
        """The starting generator's first samples: an unlabelled samples_start.png now, and the samples themselves
        (samples_start.safetensors, uint8) for the labelled grids at the end of the run, a resumed run included.
        `images` are the first of `words` (a distributed evaluation: rank 0's share)."""
        n = min(sample_tiles(images), len(images))
        save_grid(images[:n], self.run / "samples_start.png", cols=8)
        save_samples(self.run / "samples_start.safetensors", images[:n], words[:n])

    def kept_start(self) -> tuple[torch.Tensor, list[str]] | None:
        path = self.run / "samples_start.safetensors"
        return load_samples(path) if path.is_file() else None

    def labelled_samples(self, stage: str, images: torch.Tensor, words: list[str], readings: list, scores: list):
        """samples_<stage>.png: each tile labelled with its word, what the reward read and the score (green: exact)."""
        scale = max(1, min(3, 192 // images.shape[-1]))
        marks = [s >= 1.0 for s in scores]
        captions = sample_captions(words, readings, scores)
        save_labelled_grid(images, captions, self.run / f"samples_{stage}.png", cols=4, scale=scale, marks=marks)

    def start_end_pairs(self, start: tuple, end: tuple) -> None:
        """samples_start_end.png: half of the tiles as (start, end) pairs of the same words and noise; `start` and
        `end` are (images, words, readings, scores)."""
        k = min(len(start[1]), len(end[1])) // 2
        captions = [sample_captions(w[:k], r[:k], s[:k]) for _, w, r, s in (start, end)]
        marks = tuple([x >= 1.0 for x in s[:k]] for *_, s in (start, end))
        save_start_end_grid(start[0][:k], end[0][:k], *captions, self.run / "samples_start_end.png", marks=marks)

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
