"""Helpers shared by the op files: optional Triton import, output allocation, row views, block sizes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs without the `triton` extra: kernels stay plain, never-called functions
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f), cdiv=None)
    tl = SimpleNamespace(constexpr=object)

__all__ = [
    "HAS_TRITON",
    "alloc",
    "as_rows",
    "block_for",
    "check_like",
    "compute_dtype",
    "interpreting",
    "launch_opts",
    "poison_outputs",
    "rows",
    "tl",
    "triton",
]

_POISON = False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every tensor the launchers allocate with NaN (floats) or True (bools) so an unwritten element shows."""
    global _POISON
    prev, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = prev


def alloc(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised output buffer (NaN/True-filled under `poison_outputs`)."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = True if dtype == torch.bool else float("nan")
    return torch.full(shape, fill, dtype=dtype, device=device)


def as_rows(t: Tensor) -> Tensor:
    """Contiguous [B, D] view (a copy only when `t` is not contiguous)."""
    return t.reshape(t.shape[0], -1).contiguous()


def check_like(name: str, t: Tensor | None, ref: Tensor) -> None:
    """Raise a clear error unless `t` matches `ref`'s shape and device (dtype may differ)."""
    if t is None:
        return
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref.device}")


# Triton block sizes. GPU: 4096 elements per program, 8 warps (16 B per thread per load for fp32), the usual
# choice for memory-bound elementwise/row-reduction kernels; not yet tuned on a GPU (no card was available).
# Interpreter: programs run one after another in numpy, so one large block per row keeps tests fast.
BLOCK_GPU = 4096
NUM_WARPS_GPU = 8
BLOCK_INTERPRET_MAX = 1 << 16


def block_for(n: int) -> int:
    """BLOCK for a row of n elements (power of two)."""
    p = 1 << max(4, (max(n, 1) - 1).bit_length())
    return min(p, BLOCK_INTERPRET_MAX) if interpreting() else min(max(p, 128), BLOCK_GPU)


def launch_opts() -> dict[str, int]:
    """Extra launch options (num_warps) for the current mode."""
    return {} if interpreting() else {"num_warps": NUM_WARPS_GPU}


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """Promoted dtype of the given tensors: the native kernels need one element type per call."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def rows(t: Tensor | None, backend: str, dtype: torch.dtype) -> Tensor | None:
    """[B, D] contiguous view for a launcher; native calls also get a single element type (Triton loads any)."""
    if t is None:
        return None
    return as_rows(t) if backend == "triton" else as_rows(t.to(dtype))
