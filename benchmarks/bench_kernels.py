"""Fused-kernel benchmark: every op and size against the eager reference, torch.compile and the copy ceiling.

    python benchmarks/bench_kernels.py [--quick] [--json FILE] [--sizes 1048576,16777216] [--dtype fp32]

Providers (exact names): reference (eager kernels/reference.py), compile (torch.compile of the reference),
native (CMake-built CPU library), triton (CUDA only). Each (op, mode, size) is checked against the reference
before it is timed; GB/s uses the explicit bytes-moved formula of the case (logical reads + writes, fp32
per-sample outputs ignored), and pct_of_copy compares with `dst.copy_(src)` of n elements into a preallocated
buffer, timed round-robin with the providers in the same run. The note also gives `src.clone()` (the same copy
into a freshly allocated tensor, paying the page faults an allocating op pays) from the same window.
Rows go to stdout, benchmarks/results/bench_kernels_<device>.csv and, with --json, a JSON list.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tdm_r1_kernels as K  # noqa: E402
from tdm_r1_kernels import reference as R  # noqa: E402
from tdm_r1_kernels._common import HAS_TRITON  # noqa: E402
from tdm_r1_kernels.dispatch import load_native  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Correctness gate before timing: max-norm relative error against the reference on the same inputs.
GATE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BATCH = 4  # samples per call; n elements are split into BATCH rows
GROUP = 24  # group size of group_preference
FULL_SIZES = [1 << 16, 1 << 20, 1 << 22, 1 << 24]
QUICK_SIZES = [1 << 20, 1 << 24]

Outputs = tuple[torch.Tensor, ...]


@dataclass
class Case:
    """One benchmarked op/mode: inputs for (n, dtype, device), bytes moved, and one callable per provider."""

    op: str
    mode: str
    bytes_moved: Callable[[int, int], int]  # (n, element size) -> bytes read + written
    setup: Callable[[int, torch.dtype, torch.device], dict]
    reference: Callable[[dict], Callable[..., Outputs]]  # inputs -> function(**inputs) -> outputs
    fused: Callable[[dict, str], Outputs]  # (inputs, backend) -> outputs
    backward: bool = False  # time forward + backward from output[0] (see _loss_grad)


def _rows(n: int, dtype: torch.dtype, device: torch.device, k: int) -> list[torch.Tensor]:
    return [torch.randn(BATCH, n // BATCH, device=device).to(dtype) for _ in range(k)]


def _levels(device: torch.device) -> dict[str, torch.Tensor]:
    s = torch.tensor([0.9, 0.75, 0.5, 0.3], device=device)[:BATCH]
    return dict(s=s, s_next=s - 0.15, s_prev=torch.clamp(s + 0.1, max=0.95), tau=s - 0.1)


def _setup_step(n, dtype, device):
    x, v, prev, noise = _rows(n, dtype, device, 4)
    return dict(x=x, v=v, prev=prev, noise=noise, **_levels(device))


def _setup_vmse(n, dtype, device):
    x, noise, v = _rows(n, dtype, device, 3)
    lv = _levels(device)
    return dict(x=x, noise=noise, v=v, s=lv["s_next"], tau=lv["s"])


def _setup_x0(n, dtype, device):
    x0, tk, tc, tr, rr, rs = _rows(n, dtype, device, 6)
    # per-sample (w_kl, w_cfg, w_reward): TDM-R1 steps before trunc_steps and one truncated step (w_tdm 0.3)
    w = torch.tensor([[1.0, 0.3, 0.7], [0.3, 0.3, 0.0], [1.0, 0.3, 0.7], [1.0, 0.3, 0.7]], device=device)[:BATCH]
    return dict(x0=x0, tk=tk, tc=tc, tr=tr, rr=rr, rs=rs, w=w)


def _setup_gp(n, dtype, device):
    l = torch.rand(n, device=device) + 0.1
    return dict(
        l=l.to(dtype),
        l_ref=(l + 0.05 * torch.randn_like(l)).to(dtype),
        l_old=(l * torch.exp(0.003 * torch.randn_like(l))).to(dtype),
        adv=torch.randn(n, device=device).to(dtype),
        group=torch.arange(n, device=device) // GROUP,
        groups=(n + GROUP - 1) // GROUP,
    )


def _loss_grad(inputs: dict, key: str, fn: Callable[[], Outputs]) -> Outputs:
    """Forward + backward from fn()[0] (a per-sample loss, or a tensor given the upstream gradient inputs["g"]);
    returns (fn()[0], grad wrt inputs[key])."""
    leaf = inputs[key]
    leaf.grad = None
    out = fn()
    if "g" in inputs:
        out[0].backward(inputs["g"])
    else:
        out[0].sum().backward()
    return out[0].detach(), leaf.grad


def _with_grad(setup, key):
    def make(n, dtype, device):
        inputs = setup(n, dtype, device)
        inputs[key] = inputs[key].requires_grad_()
        return inputs

    return make


CASES = [
    Case("sampler_step", "euler", lambda n, e: 4 * n * e, _setup_step,
         lambda i: lambda x, v, s, s_next, **_: R.sampler_step_ref(x, v, s, s_next)[:2],
         lambda i, be: K.fused_sampler_step(i["x"], i["v"], i["s"], i["s_next"], backend=be)[:2]),
    Case("sampler_step", "dpm2m", lambda n, e: 5 * n * e, _setup_step,
         lambda i: lambda x, v, s, s_next, prev, s_prev, **_: R.sampler_step_ref(x, v, s, s_next, prev, s_prev)[:2],
         lambda i, be: K.fused_sampler_step(i["x"], i["v"], i["s"], i["s_next"], x0_prev=i["prev"],
                                            s_prev=i["s_prev"], backend=be)[:2]),
    Case("sampler_step+renoise", "fwd", lambda n, e: 6 * n * e, _setup_step,
         lambda i: lambda x, v, s, s_next, noise, tau, **_: R.sampler_step_ref(x, v, s, s_next, noise=noise, tau=tau),
         lambda i, be: K.fused_sampler_step(i["x"], i["v"], i["s"], i["s_next"], noise=i["noise"], tau=i["tau"],
                                            backend=be)[:3]),
    Case("renoise", "fwd", lambda n, e: 3 * n * e, _setup_step,
         lambda i: lambda x, noise, s_next, tau, **_: R.renoise_ref(x, noise, s_next, tau)[:1],
         lambda i, be: K.fused_renoise(i["x"], i["noise"], i["s_next"], i["tau"], backend=be)[:1]),
    Case("velocity_target_mse", "fwd", lambda n, e: 3 * n * e, _setup_vmse,
         lambda i: lambda x, noise, s, tau, v, **_: (R.velocity_target_mse_ref(x, noise, s, tau, v),),
         lambda i, be: (K.fused_velocity_target_mse(i["x"], i["noise"], i["s"], i["tau"], i["v"], backend=be),)),
    # forward reads x, n, v_pred; backward reads them again and writes grad_v_pred
    Case("velocity_target_mse", "fwd+bwd", lambda n, e: 7 * n * e, _with_grad(_setup_vmse, "v"),
         lambda i: lambda x, noise, s, tau, v, **_: (R.velocity_target_mse_ref(x, noise, s, tau, v),),
         lambda i, be: (K.fused_velocity_target_mse(i["x"], i["noise"], i["s"], i["tau"], i["v"], backend=be),),
         backward=True),
    Case("revised_x0_loss", "fwd", lambda n, e: 6 * n * e, _setup_x0,
         lambda i: lambda x0, tk, tc, tr, rr, rs, w, **_: R.revised_x0_loss_ref(x0, tk, tc, tr, rr, rs, w),
         lambda i, be: K.fused_revised_x0_loss(i["x0"], i["tk"], i["tc"], i["tr"], i["rr"], i["rs"], i["w"],
                                               backend=be)),
    # forward reads x0_hat, 3 targets, 2 normaliser references; backward reads x0_hat, 3 targets, writes the grad
    Case("revised_x0_loss", "fwd+bwd", lambda n, e: 11 * n * e, _with_grad(_setup_x0, "x0"),
         lambda i: lambda x0, tk, tc, tr, rr, rs, w, **_: R.revised_x0_loss_ref(x0, tk, tc, tr, rr, rs, w),
         lambda i, be: K.fused_revised_x0_loss(i["x0"], i["tk"], i["tc"], i["tr"], i["rr"], i["rs"], i["w"],
                                               backend=be), backward=True),
    # per sample: scores read l, l_ref, A (e) and group (8); weights read S_g (4), l, l_ref, l_old, A (4e),
    # group (8) and write w (4) and two bool masks (2)
    Case("group_preference", "fwd", lambda n, e: n * (3 * e + 8 + 4 + 4 * e + 8 + 4 + 2), _setup_gp,
         lambda i: lambda l, l_ref, l_old, adv, group, groups, **_: tuple(
             R.group_preference_ref(l, l_ref, l_old, adv, group, groups, 10.0, GROUP, 1e-3, ref_div=0.1)),
         lambda i, be: tuple(K.fused_group_preference(i["l"], i["l_ref"], i["l_old"], i["adv"], i["group"],
                                                      i["groups"], 10.0, GROUP, 1e-3, ref_div=0.1, backend=be))),
]  # fmt: skip


def _setup_step_grad(n, dtype, device):
    """The generator step with grad: v requires grad, and x0_hat receives a given upstream gradient g."""
    inputs = _with_grad(_setup_step, "v")(n, dtype, device)
    inputs["g"] = torch.randn_like(inputs["x"])
    return inputs


# forward reads x, v and writes x_next, x0_hat; backward reads g (the gradient of x0_hat) and writes grad_v
SAMPLER_BWD = Case(
    "sampler_step", "fwd+bwd", lambda n, e: 6 * n * e, _setup_step_grad,
    lambda i: lambda x, v, s, s_next, **_: R.sampler_step_ref(x, v, s, s_next)[1:2],
    lambda i, be: K.fused_sampler_step(i["x"], i["v"], i["s"], i["s_next"], backend=be)[1:2],
    backward=True,
)  # fmt: skip


def _with_out(setup, count):
    """Inputs plus `count` preallocated output buffers (a rollout writing into its trajectory storage)."""

    def make(n, dtype, device):
        inputs = setup(n, dtype, device)
        inputs["out"] = tuple(torch.empty_like(inputs["x"]) for _ in range(count))
        return inputs

    return make


# out= variants: the kernels write into preallocated buffers (no page faults on fresh outputs); the eager
# reference and torch.compile still allocate, as they would in a rollout loop.
OUT_CASES = [
    Case("sampler_step", "euler-out", lambda n, e: 4 * n * e, _with_out(_setup_step, 2),
         lambda i: lambda x, v, s, s_next, **_: R.sampler_step_ref(x, v, s, s_next)[:2],
         lambda i, be: K.fused_sampler_step(i["x"], i["v"], i["s"], i["s_next"], out=i["out"], backend=be)[:2]),
    Case("sampler_step+renoise", "fwd-out", lambda n, e: 6 * n * e, _with_out(_setup_step, 3),
         lambda i: lambda x, v, s, s_next, noise, tau, **_: R.sampler_step_ref(x, v, s, s_next, noise=noise, tau=tau),
         lambda i, be: K.fused_sampler_step(i["x"], i["v"], i["s"], i["s_next"], noise=i["noise"], tau=i["tau"],
                                            out=i["out"], backend=be)[:3]),
    Case("renoise", "fwd-out", lambda n, e: 3 * n * e, _with_out(_setup_step, 1),
         lambda i: lambda x, noise, s_next, tau, **_: R.renoise_ref(x, noise, s_next, tau)[:1],
         lambda i, be: K.fused_renoise(i["x"], i["noise"], i["s_next"], i["tau"], out=i["out"][0], backend=be)[:1]),
]  # fmt: skip


CASES.insert(2, SAMPLER_BWD)
for _case in OUT_CASES:  # next to the allocating variant of the same op
    CASES.insert(max(i for i, c in enumerate(CASES) if c.op == _case.op) + 1, _case)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(
    fn: Callable[[], object], device: torch.device, min_reps: int, min_time: float, warm: bool = False
) -> float:
    """Median wall time in ms over at least min_reps runs and min_time seconds (max 200), after one warm-up
    call unless the caller has just run fn (warm)."""
    if not warm:
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any() or a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def provider_fn(case: Case, provider: str, inputs: dict) -> Callable[[], Outputs]:
    """A zero-argument callable running the case with this provider (forward, or forward + backward)."""
    if provider == "reference":
        ref = case.reference(inputs)
        fwd = lambda: ref(**inputs)
    elif provider == "compile":
        compiled = torch.compile(case.reference(inputs), dynamic=False)
        fwd = lambda: compiled(**inputs)
    else:
        fwd = lambda: case.fused(inputs, provider)
    if not case.backward:
        return fwd
    key = "v" if "v" in inputs and inputs["v"].requires_grad else "x0"
    return lambda: _loss_grad(inputs, key, fwd)


def copy_gbps(n: int, dtype: torch.dtype, device: torch.device, min_reps: int, min_time: float) -> tuple[float, float]:
    """(copy_ GB/s into a preallocated buffer, clone GB/s including the allocation) for n elements of dtype."""
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    nbytes = 2 * n * src.element_size()
    ms_copy = time_ms(lambda: dst.copy_(src), device, min_reps, min_time)
    ms_clone = time_ms(lambda: src.clone(), device, min_reps, min_time)
    return nbytes / ms_copy / 1e6, nbytes / ms_clone / 1e6


def header(device: torch.device) -> dict[str, str]:
    """Device, versions, git sha, threads and load (other processes on the machine change CPU timings)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "kernels", "benchmarks", "CMakeLists.txt"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        sha += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    triton_version = "not installed"
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": sha,
        "native": "built" if load_native() else "not built",
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    min_reps, min_time = (3, 0.0) if args.quick else (7, 0.5)
    providers = ["reference", "compile", "native" if device.type == "cpu" else "triton"]
    if args.providers:
        providers = args.providers.split(",")
    cases = [c for c in CASES if not args.ops or c.op in args.ops.split(",")]
    head = header(device)
    for k, v in head.items():
        print(f"# {k}: {v}")
    rows: list[dict] = []
    failed = False
    print(f"{'op':<22}{'mode':<10}{'n':>10} {'provider':<10}{'ms':>10}{'GB/s':>9}{'%copy':>8}{'x ref':>8}  note")
    for n in sizes:
        copy, clone = copy_gbps(n, dtype, device, min_reps, min_time)
        copy_ms = 2 * n * torch.empty((), dtype=dtype).element_size() / copy / 1e6
        rows.append(_row("copy", "torch", "copy_", n, dtype, copy_ms, copy, copy, None,
                         f"clone (allocating) {clone:.2f} GB/s"))  # fmt: skip
        _print_row(rows[-1])
        for case in cases:
            case_rows, ok = bench_case(case, providers, n, dtype, device, min_reps, min_time, args.quick)
            failed |= not ok
            for row in case_rows:
                rows.append(row)
                _print_row(row)
    _write(rows, head, device, args.json)
    if failed:
        raise SystemExit("correctness gate failed (see rows marked FAILED)")
    return rows


def bench_case(
    case: Case,
    providers: list[str],
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    min_reps: int,
    min_time: float,
    quick: bool,
) -> tuple[list[dict], bool]:
    """Gate every provider, then time them round-robin together with the copy ceiling.

    Interleaving keeps each ratio (%copy, x ref) within one time window, so load from other processes on the
    machine shifts numerator and denominator alike instead of whichever provider ran during a busy spell.
    """
    torch.manual_seed(0)
    inputs = case.setup(n, dtype, device)
    expected = provider_fn(case, "reference", inputs)()
    skipped: dict[str, str] = {}
    fns: dict[str, Callable[[], object]] = {}
    notes: dict[str, str] = {}
    ok = True
    for provider in providers:
        reason = _unavailable(provider, device, quick)
        if reason:
            skipped[provider] = reason
            continue
        try:
            fn = provider_fn(case, provider, inputs)
            got = expected if provider == "reference" else fn()  # also the warm-up (and the compile)
        except Exception as err:  # noqa: BLE001 - an unavailable provider is reported in its row, not fatal
            if provider != "compile":
                raise
            skipped[provider] = f"compile unavailable: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            continue
        err = max(rel_err(g.double(), e.double()) for g, e in zip(got, expected))
        if err > GATE[dtype]:
            skipped[provider] = f"FAILED correctness gate: rel err {err:.3g} > {GATE[dtype]:.0e}"
            ok = False
            continue
        fns[provider] = fn
        notes[provider] = f"max rel err {err:.1e}"
        if "out" in inputs and provider in ("native", "triton"):
            notes[provider] += "; outputs preallocated (out=)"
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    ceilings = {"copy": lambda: dst.copy_(src), "clone": lambda: src.clone()}
    ms = time_interleaved({**ceilings, **fns}, device, min_reps, min_time)
    copy = 2 * src.numel() * src.element_size() / ms.pop("copy") / 1e6
    clone = 2 * src.numel() * src.element_size() / ms.pop("clone") / 1e6
    nbytes = case.bytes_moved(n, src.element_size())
    ref_ms = ms.get("reference")
    rows = []
    for provider in providers:
        if provider in skipped:
            rows.append(_row(case.op, provider, case.mode, n, dtype, None, None, copy, None, skipped[provider]))
            continue
        t = ms[provider]
        speedup = ref_ms / t if ref_ms else None
        gbps = nbytes / t / 1e6
        note = (f"{notes[provider]}; same window: copy_ {copy:.2f} GB/s, clone {clone:.2f} GB/s "
                f"({100 * gbps / clone:.0f}% of clone)")  # fmt: skip
        rows.append(_row(case.op, provider, case.mode, n, dtype, t, gbps, copy, speedup, note))
    return rows, ok


def _unavailable(provider: str, device: torch.device, quick: bool) -> str:
    if provider == "compile" and quick:
        return "compile skipped under --quick (compile time)"
    if provider == "native" and (device.type != "cpu" or not load_native()):
        return "native library not built (make native)" if device.type == "cpu" else "native runs on CPU only"
    if provider == "triton" and (device.type != "cuda" or not HAS_TRITON):
        return "triton needs CUDA"
    return ""


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, min_reps: int, min_time: float
) -> dict[str, float]:
    """Median ms of each callable, timed round-robin: at least min_reps rounds and min_time seconds (max 100)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (time.perf_counter() - start < min_time and rounds < 100):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _row(op, provider, mode, n, dtype, ms, gbps, copy, speedup, note) -> dict:
    return {
        "op": op,
        "provider": provider,
        "mode": mode,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": None if ms is None else round(ms, 4),
        "gbps": None if gbps is None else round(gbps, 3),
        "pct_of_copy": None if gbps is None else round(100.0 * gbps / copy, 1),
        "speedup_vs_reference": None if speedup is None else round(speedup, 2),
        "note": note,
    }


def _print_row(r: dict) -> None:
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"
    print(
        f"{r['op']:<22}{r['mode']:<9}{r['n']:>10} {r['provider']:<10}{f(r['ms'], '>10.3f'):>10}"
        f"{f(r['gbps'], '>9.2f'):>9}{f(r['pct_of_copy'], '>8.1f'):>8}{f(r['speedup_vs_reference'], '>8.2f'):>8}"
        f"  {r['note']}"
    )


def _write(rows: list[dict], head: dict, device: torch.device, json_path: str | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_kernels_{device.type}.csv"
    with out.open("w", newline="") as f:
        for k, v in head.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"# wrote {out}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=1))
        print(f"# wrote {json_path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="sizes 1M and 16M, 3 timed rounds, no torch.compile (< 1 minute on an idle 2-core CPU)",
    )
    p.add_argument("--json", help="also write the rows as a JSON list to this file")
    p.add_argument("--sizes", help="comma-separated element counts (default 64K,1M,4M,16M; --quick 1M,16M)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--ops", help="comma-separated op names (default: all)")
    p.add_argument("--threads", type=int, help="torch/native intra-op threads (default: torch's default)")
    p.add_argument("--providers", help="comma-separated providers (default: reference,compile,native|triton)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
