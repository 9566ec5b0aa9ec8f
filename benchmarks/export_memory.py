"""Peak host memory of writing a LoRA-merged transformer: streamed (the export's way) vs loaded whole in fp32.

    .venv/bin/python benchmarks/export_memory.py [--dim 1536] [--layers 6] [--rank 32]

Builds a random Z-Image-architecture transformer (dim / layers scaled down from Z-Image-Turbo's 3840 / 30), saves it
in bf16 in 200 MB shards as a downloaded model comes, and a rank-r LoRA on every attention and MLP projection. Each
way then runs in a fresh process, which reports the rise of its peak resident memory over its resident
memory just before writing (Linux: /proc/self/status VmHWM):
  stream - tdm_r1.checkpoint.pipeline.stream_transformer (what `tdm-r1 export` and the end of a run do);
  whole  - from_pretrained in fp32, merge, cast to bf16, save_pretrained (what export did before).
Prints a row per way in bytes per transformer parameter and writes benchmarks/results/export_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def build(folder: Path, dim: int, layers: int, rank: int) -> int:
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        in_channels=16,
        dim=dim,
        n_layers=layers,
        n_refiner_layers=1,
        n_heads=dim // 128,
        n_kv_heads=dim // 128,
        cap_feat_dim=dim // 2,
        axes_dims=[32, 48, 48],
        axes_lens=[256, 64, 64],
    ).to(torch.bfloat16)
    model.save_pretrained(folder / "transformer", max_shard_size="200MB")
    lora = {}
    g = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            a = torch.randn((rank, module.in_features), generator=g) * 0.01
            b = torch.randn((module.out_features, rank), generator=g) * 0.01
            lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"] = a, b
    from safetensors.torch import save_file

    save_file(lora, str(folder / "lora.safetensors"))
    return sum(p.numel() for p in model.parameters())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's high-water resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_one(way: str, folder: Path, shard_bytes: int) -> None:
    """In a fresh process: write folder/out_<way> and print the peak rise in bytes."""
    from safetensors.torch import load_file

    from tdm_r1.checkpoint.pipeline import merge_lora_into, split_lora, stream_transformer

    lora = split_lora(load_file(str(folder / "lora.safetensors")))
    before = rss_bytes()
    dst = folder / f"out_{way}"
    if way == "stream":
        stream_transformer(folder / "transformer", dst, torch.bfloat16, lora, 64.0, shard_bytes=shard_bytes)
    else:
        from diffusers import ZImageTransformer2DModel

        model = ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=torch.float32)
        merge_lora_into(model, lora, 64.0)
        model.to(torch.bfloat16).save_pretrained(dst)
    peak = peak_rss_bytes()
    print(json.dumps({"way": way, "rise_bytes": max(0, peak - before), "before": before, "peak": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--shard-mb", type=int, default=128, help="the streamed export's shard size (the export's: 2048)")
    p.add_argument("--one", nargs=3, metavar=("WAY", "FOLDER", "SHARD_MB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run_one(args.one[0], Path(args.one[1]), int(args.one[2]) << 20)
        return
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache" if (ROOT / ".cache").is_dir() else None) as tmp:
        folder = Path(tmp)
        params = build(folder, args.dim, args.layers, args.rank)
        rows = []
        # glibc returns large freed blocks to the system only below its (otherwise growing) mmap threshold: fixed
        # here, so the peak is that of live memory, not of what the allocator kept
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        for way in ("stream", "whole"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", way, str(folder), str(args.shard_mb)],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["bytes_per_param"] = round(row["rise_bytes"] / params, 3)
            rows.append(row)
            print(f"{way:>6}: peak rise {row['rise_bytes'] / 2**20:8.1f} MiB = {row['bytes_per_param']:.3f} B/param")
        from safetensors.torch import load_file

        def weights(d: Path) -> dict:
            return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

        streamed, whole = weights(folder / "out_stream"), weights(folder / "out_whole")
        same = streamed.keys() == whole.keys() and all(torch.equal(v, whole[k]) for k, v in streamed.items())
    result = {
        "transformer_params": params,
        "dim": args.dim,
        "layers": args.layers,
        "lora_rank": args.rank,
        "shard_mb": args.shard_mb,
        "rows": rows,
        "outputs_equal": same,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    print(f"transformer {params / 1e6:.0f}M parameters; the two outputs are bitwise equal: {same}")
    out = ROOT / "benchmarks" / "results" / "export_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
