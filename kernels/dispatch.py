"""Choose the backend of every fused op once per device type, and load the optional native CPU library.

CUDA -> triton; CPU -> native when the CMake-built library is present, else reference.
`TDM_R1_KERNELS=reference|native|triton` overrides the choice (an unusable override is an error, never a
silent fallback). The choice is logged once per device type through the `tdm_r1_kernels` logger.
float64 tensors always take the reference (the fused kernels compute in fp32), also logged once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from ._common import HAS_TRITON, interpreting

__all__ = ["BACKENDS", "load_native", "native_available", "native_library_path", "resolve_backend", "reset", "using"]

BACKENDS = ("reference", "native", "triton")
ENV_BACKEND = "TDM_R1_KERNELS"
ENV_LIBRARY = "TDM_R1_NATIVE_LIB"
LIBRARY_NAME = "libtdm_r1_native.so"

logger = logging.getLogger("tdm_r1_kernels")

_native_state: dict[str, object] = {}
_chosen: dict[str, str] = {}
_forced: list[str] = []  # the innermost `using` block's backend


def native_library_path() -> Path | None:
    """First existing native library: $TDM_R1_NATIVE_LIB, then build/native/ at the repository root."""
    candidates = []
    if os.environ.get(ENV_LIBRARY):
        candidates.append(Path(os.environ[ENV_LIBRARY]))
    candidates.append(Path(__file__).resolve().parent.parent / "build" / "native" / LIBRARY_NAME)
    return next((p for p in candidates if p.is_file()), None)


def load_native() -> bool:
    """Load the native op library into torch.ops.tdm_r1 if it exists; True when its ops are available."""
    if "loaded" in _native_state:
        return bool(_native_state["loaded"])
    path = native_library_path()
    loaded = False
    if path is not None:
        try:
            torch.ops.load_library(str(path))
            loaded = hasattr(torch.ops.tdm_r1, "sampler_step")
        except (OSError, RuntimeError) as err:  # built against another torch, or a broken build
            logger.warning("kernels: could not load native library %s: %s", path, err)
    _native_state["loaded"], _native_state["path"] = loaded, path
    return loaded


def native_available() -> bool:
    """Whether the native CPU ops can be used in this process."""
    return load_native()


def _check_usable(backend: str, device: torch.device) -> None:
    if backend == "native":
        if device.type != "cpu":
            raise RuntimeError(f"{ENV_BACKEND}=native runs on CPU tensors only, got {device}")
        if not load_native():
            raise RuntimeError(f"native kernels requested but {LIBRARY_NAME} is not built (run `make native`)")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("triton kernels requested but triton is not installed (pip install 'tdm-r1[triton]')")
        if device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "triton kernels on CPU tensors need TRITON_INTERPRET=1 set before importing tdm_r1_kernels"
            )


def _default(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        if HAS_TRITON:
            return "triton", "CUDA device"
        return "reference", "CUDA device but triton is not installed"
    if device.type == "cpu":
        if load_native():
            return "native", f"library {_native_state['path']}"
        return "reference", f"{LIBRARY_NAME} not built (`make native` builds it)"
    return "reference", f"no fused kernels for {device.type}"


def resolve_backend(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Backend for tensors on `device`: the explicit `backend` if given, else the cached per-device choice
    (`reference` for float64 `dtype`, which no fused kernel computes in)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
        _check_usable(backend, device)
        return backend
    if _forced:
        _check_usable(_forced[-1], device)
        return _forced[-1]
    if dtype == torch.float64:
        if "float64" not in _chosen:
            _chosen["float64"] = "reference"
            logger.info("kernels: float64 tensors use the reference backend (sampler_step, renoise in float64)")
        return "reference"
    if device.type in _chosen:
        return _chosen[device.type]
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={env!r}; expected one of {BACKENDS}")
        _check_usable(env, device)
        choice, reason = env, f"{ENV_BACKEND}={env}"
    else:
        choice, reason = _default(device)
    _chosen[device.type] = choice
    logger.info("kernels: %s tensors use the %s backend (%s)", device.type, choice, reason)
    return choice


@contextlib.contextmanager
def using(backend: str | None):
    """Within the block every op without an explicit backend runs on `backend` (None: the usual per-device choice);
    e.g. a benchmark alternating the reference and the fused ops in one process."""
    if backend is None:
        yield
        return
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def reset() -> None:
    """Forget cached choices and the native-library probe (tests change the environment)."""
    _chosen.clear()
    _native_state.clear()
