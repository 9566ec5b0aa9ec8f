"""One table from a `benchmarks/gpu_check.sh` run: each step's status and seconds, the fused kernels' share of copy
bandwidth at real latent sizes, and the SD3.5-M / Z-Image phase benchmarks (epoch seconds, images/s, TFLOP/s, MFU,
peak memory) for the fused and fast paths.

    python benchmarks/gpu_summary.py benchmarks/results/gpu_check
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(out: Path) -> str:
    lines = ["| step | exit | seconds |", "|---|---:|---:|"]
    for row in (out / "steps.tsv").read_text().splitlines():
        name, rc, sec = row.split("\t")
        lines.append(f"| {name} | {rc} | {sec} |")
    kernels = out / "kernels.json"
    if kernels.is_file():
        rows = [r for r in json.loads(kernels.read_text()) if r["provider"] == "triton" and r["gbps"] is not None]
        lines += ["", "| kernel (triton, bf16) | elements | GB/s | % of copy | x reference |"]
        lines.append("|---|---:|---:|---:|---:|")
        for r in rows:
            lines.append(
                f"| {r['op']} {r['mode']} | {r['n']} | {r['gbps']:.0f} | {r['pct_of_copy']:.0f} | "
                f"{r['speedup_vs_reference'] or float('nan'):.2f} |"
            )
    lines += ["", "| recipe (random weights) | path | epoch s | images/s | TFLOP/s | MFU | peak GiB |",
              "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for f in sorted(out.glob("*.json")):
        if f.name == "kernels.json":
            continue
        data = json.loads(f.read_text())
        for name, p in data["paths"].items():
            mfu = p.get("mfu")
            lines.append(
                f"| {f.stem} | {name} | {p['epoch_s']:.1f} | {p['images_per_s']:.2f} | {p['achieved_tflops']:.1f} | "
                f"{'-' if mfu is None else f'{mfu:.3f}'} | {p['peak_memory_bytes'] / 2**30:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu_check")), end="")
