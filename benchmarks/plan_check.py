"""`tdm-r1 plan` against a measured run: per-rank peak memory of a 2-rank CPU ZeRO-3 TDM-R1 step on a Z-Image-shaped
transformer of ~200M parameters (random weights, saved as a diffusers folder), predicted vs measured.

    python benchmarks/plan_check.py [--mode lora|full] [--dim 1024] [--layers 12]

The driver builds the folder (tiny text encoder and VAE, the transformer at the given size), writes a train config,
launches 2 ranks (`torchrun`, gloo, DS_ACCELERATOR=cpu) that each build the run's roles, then measure one micro-batch
of every backward and one optimizer step: peak resident memory over that step (VmHWM, reset after the build with
/proc/self/clear_refs and malloc_trim) minus the resident memory before any model was loaded. The load itself (each
rank reads the whole folder before ZeRO-3 partitions it) is a separate, earlier peak the plan does not cover.
Writes benchmarks/results/plan_check_<mode>.json and prints predicted vs measured by component.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def _tiny_models():
    spec = importlib.util.spec_from_file_location("tiny_models", ROOT / "tests" / "models" / "tiny_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_folder(path: Path, dim: int, layers: int) -> int:
    """A Z-Image folder whose transformer has `layers` main blocks of width `dim`; its parameter count."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tiny = _tiny_models()
    torch.manual_seed(0)
    tok = tiny._qwen_tokenizer()
    text = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    )  # fmt: skip
    heads = dim // 64
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=dim, n_layers=layers, n_refiner_layers=1, n_heads=heads, n_kv_heads=heads,
        cap_feat_dim=32, axes_dims=[16, 24, 24], axes_lens=[128, 32, 32],
    )  # fmt: skip
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny._vae(0.3611, 0.1159), text_encoder=text,
        tokenizer=tok, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return sum(p.numel() for p in transformer.parameters())


def write_config(d: Path, folder: Path, mode: str, group_size: int, prefetch: int) -> Path:
    tiny = _tiny_models()
    cfg = tiny.train_config(
        d, "zimage", folder, d / "run", {"group_size": group_size},
        diffusers={"height": 32, "width": 32, "max_sequence_length": 48},
        roles={"mode": mode, "lora_rank": 16, "lora_alpha": 16.0},
        distributed={"zero_stage": 3, "bf16": False, "param_persistence_threshold": 0,
                     "prefetch_bucket_size": prefetch},
    )  # fmt: skip
    path = d / "plan_check.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- one rank --------------------------------------------------------------------------------------------------


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def worker(config: str, out: str) -> None:
    from tdm_r1 import distributed
    from tdm_r1.config import load_config
    from tdm_r1.phases import advantage_phase, micro_batches, rollout_phase
    from tdm_r1.rewards import build_reward
    from tdm_r1.rewards.scorer import RewardScorer
    from tdm_r1.run import build_run
    from tdm_r1.updates import fake_score_backward, generator_backward, surrogate_backward
    from tdm_r1.worlds.stream import PromptStream

    torch.set_num_threads(1)
    cfg = load_config(config, [])
    import deepspeed  # noqa: F401  -- the libraries a run imports, resident before the baseline is read
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    _reset_peak()
    before = _status("VmRSS")
    run = build_run(cfg)
    dist, roles, tc = run.dist, run.roles, cfg.train
    _reset_peak()
    built = _status("VmRSS")
    scorer = RewardScorer([(build_reward("dark_fraction"), 1.0)])
    gen = torch.Generator().manual_seed(0)
    batch = rollout_phase(roles, run.world, PromptStream(run.world.items("train"), 0), scorer, tc, cfg.tdm, gen,
                          run.split)  # fmt: skip
    scorer.close()
    advantage_phase(batch, tc, dist)
    mb = micro_batches(batch)[0]
    phases = {"rollout": _status("VmHWM") - before}
    fake_score_backward(roles.fake, roles.reference, mb.cond, mb.traj, 0, cfg.tdm, gen, 1.0, mb.shard)
    phases["fake"] = _status("VmHWM") - before
    surrogate_backward(roles, mb, 1, tc, cfg.tdm, gen, 1.0, dist)
    phases["surrogate"] = _status("VmHWM") - before
    generator_backward(roles, mb, 0, tc, cfg.tdm, gen, 1.0)
    phases["generator"] = _status("VmHWM") - before
    held = distributed.memory_bytes(roles)
    for engine in set(run.opts.values()):
        engine.step()
    after = distributed.memory_bytes(roles)
    peak = _status("VmHWM")
    phases["step"] = peak - before
    rec = {
        "rank": dist.rank,
        "rss_before_load": before,
        "rss_after_build": built,
        "peak": peak,
        "measured": peak - before,
        "peak_after": phases,
        "bytes": held | {k: after[k] for k in ("optim", "whole_optim")},
    }
    rows = dist.all_gather_object(rec) if hasattr(dist, "all_gather_object") else None
    if rows is None:
        import torch.distributed as tdist

        rows = [None] * dist.world
        tdist.all_gather_object(rows, rec)
    if dist.is_main:
        Path(out).write_text(json.dumps(rows, indent=1) + "\n")


# -- driver ----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--group-size", type=int, default=4, help="samples of the one micro-batch (half per rank)")
    ap.add_argument("--prefetch", type=int, default=50_000_000, help="distributed.prefetch_bucket_size")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        from tdm_r1 import distributed

        distributed.run_script(worker, *args.worker)
        return
    from tdm_r1.config import load_config
    from tdm_r1.plan import GB, memory, setup_of, shape_of

    with tempfile.TemporaryDirectory(prefix="plan_check_") as tmp:
        d = Path(tmp)
        n_params = build_folder(d / "zimage", args.dim, args.layers)
        config = write_config(d, d / "zimage", args.mode, args.group_size, args.prefetch)
        out = d / "ranks.json"
        env = os.environ | {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ROOT / "build" / "torch_extensions")}
        # allocations of 64 KiB and more straight from mmap, returned at free: resident memory then follows the live
        # tensors instead of what glibc's arenas keep after a free
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               __file__, "--worker", str(config), str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        ranks = json.loads(out.read_text())
        cfg = load_config(str(config), [])
        shape = shape_of(cfg)
        predicted = memory(shape, setup_of(cfg, 2, cuda=False))
    # on CPU the text encoder never leaves: it is resident beside the roles
    predicted_total = predicted["total"] + predicted["text_encoders"]
    print(f"Z-Image-shaped transformer: {n_params / 1e6:.1f}M parameters, roles {args.mode}, ZeRO-3, 2 CPU ranks")
    print("predicted per rank: " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in predicted.items()) + " GiB")
    for r in ranks:
        ratio = predicted_total / r["measured"]
        print(f"rank {r['rank']}: measured {r['measured'] / GiB:.3f} GiB, predicted {predicted_total / GiB:.3f} GiB, "
              f"predicted / measured {ratio:.3f}")  # fmt: skip
    result = {
        "params_transformer": n_params,
        "mode": args.mode,
        "predicted_gib": {k: v / GB for k, v in predicted.items()},
        "predicted_total_gib": predicted_total / GB,
        "ranks": ranks,
        "ratio_predicted_measured": [predicted_total / r["measured"] for r in ranks],
    }
    path = ROOT / "benchmarks" / "results" / f"plan_check_{args.mode}_g{args.group_size}_p{args.prefetch}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
