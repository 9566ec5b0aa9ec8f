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
    "check_out",
    "compute_dtype",
    "interpreting",
    "launch_opts",
    "out_rows",
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


def check_out(name: str, t: Tensor, ref: Tensor) -> None:
    """Raise unless the caller's output buffer `t` is contiguous with `ref`'s shape, dtype and device."""
    check_like(name, t, ref)
    if t.dtype != ref.dtype or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {ref.dtype} tensor, got {t.dtype} (contiguous={t.is_contiguous()})"
        )


def out_rows(
    out: tuple[Tensor, ...] | None, count: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """`count` [B, D] output buffers: row views of the caller's `out` when it holds `dtype`, else fresh ones."""
    if out is not None and out[0].dtype == dtype:
        return [o.view(shape) for o in out[:count]]
    return [alloc(shape, dtype, device) for _ in range(count)]


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
