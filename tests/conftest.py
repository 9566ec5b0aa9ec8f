"""Test-wide environment: must run before any kernel module is imported."""

import os
import sys
from pathlib import Path

import torch

# tests/kernels/ has the name of the `kernels` package: with the repository root first on sys.path, `import
# kernels` finds the package rather than that test directory, also under a plain `pytest` (no cwd on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; DeepSpeed uses its CPU accelerator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions")
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
