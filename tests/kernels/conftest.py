"""Kernel-test fixtures: the native library (built with CMake on first use), output poisoning, backends.

tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA before anything imports `tdm_r1_kernels`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/utils.py, whatever pytest's import mode

from tdm_r1_kernels import dispatch  # noqa: E402
from tdm_r1_kernels._common import HAS_TRITON, interpreting, poison_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = ROOT / "build" / "native"


def build_native() -> Path:
    """Configure (once) and build the native library into build/native; return its path."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is needed to build the native kernels (kernels/csrc)")
    if not (BUILD_DIR / "CMakeCache.txt").exists():
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), f"-DTDM_R1_PYTHON={sys.executable}"],
            check=True,
            capture_output=True,
            text=True,
        )
    subprocess.run(["cmake", "--build", str(BUILD_DIR), "-j", "2"], check=True, capture_output=True, text=True)
    return BUILD_DIR / dispatch.LIBRARY_NAME


@pytest.fixture(scope="session")
def native_lib() -> Path:
    """The native library, built if needed and loaded (an up-to-date build is a no-op)."""
    try:
        path = build_native()
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"native build failed:\n{err.stdout}\n{err.stderr}") from err
    dispatch.reset()
    assert dispatch.load_native(), f"could not load {path}"
    return path


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine every 2-thread parallel region waits for a descheduled
    worker, which made this suite 5x slower. test_native_threads.py covers the multi-threaded native path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _poison():
    """Every buffer a launcher allocates starts as NaN (True for masks), so unwritten elements fail."""
    with poison_outputs():
        yield


# (backend, device). Triton on CPU runs in the interpreter, which must be chosen before `tdm_r1_kernels` is imported.
BACKENDS = [
    pytest.param(("native", "cpu"), id="native"),
    pytest.param(("triton", "cpu"), id="triton-interpret"),
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> tuple[str, torch.device]:
    name, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if name == "triton":
        if not HAS_TRITON:
            pytest.fail("triton is not installed")
        if device == "cpu" and not interpreting():
            pytest.skip("this process runs Triton on the GPU (TRITON_INTERPRET unset)")
    if name == "native":
        request.getfixturevalue("native_lib")
    return name, torch.device(device)


DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

# (shape, contiguous): a batch of 1 with a prime row; small 4-D rows; rows longer than one Triton interpreter
# block (65536) and several native chunks (16384), read through strided views.
SHAPES = [
    pytest.param(((1, 37), True), id="1x37"),
    pytest.param(((3, 4, 5, 7), False), id="3x4x5x7-strided"),
    pytest.param(((2, 3, 151, 151), False), id="2x3x151x151-strided"),
    pytest.param(((5, 3, 17, 19), True), id="5x3x17x19"),
]


@pytest.fixture(params=DTYPES)
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=SHAPES)
def shape(request) -> tuple[tuple[int, ...], bool]:
    return request.param
