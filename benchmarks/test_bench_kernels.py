"""pytest-benchmark entry points for the kernel cases of bench_kernels.py (same inputs, gate and providers).

Not part of the default test run (testpaths = tests); run them with
    python -m pytest benchmarks/test_bench_kernels.py --benchmark-columns=median,ops
"""

import pytest
import torch

from benchmarks.bench_kernels import CASES, GATE, provider_fn, rel_err
from tdm_r1_kernels._common import HAS_TRITON
from tdm_r1_kernels.dispatch import load_native

SIZE = 1 << 22  # 4M elements: past the caches of a laptop/server CPU, quick enough for pytest-benchmark's rounds
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("provider", ["reference", "native", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.mode}" for c in CASES])
def test_kernel(benchmark, case, provider):
    if provider == "native" and (DEVICE.type != "cpu" or not load_native()):
        pytest.skip("native kernels run on CPU and need `make native`")
    if provider == "triton" and (DEVICE.type != "cuda" or not HAS_TRITON):
        pytest.skip("triton benchmarks need CUDA")
    torch.manual_seed(0)
    inputs = case.setup(SIZE, torch.float32, DEVICE)
    expected = provider_fn(case, "reference", inputs)()
    fn = provider_fn(case, provider, inputs)
    got = fn()
    err = max(rel_err(g.double(), e.double()) for g, e in zip(got, expected))
    assert err <= GATE[torch.float32], f"correctness gate: rel err {err:.3g}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved(SIZE, 4)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    benchmark(lambda: (fn(), sync()))
