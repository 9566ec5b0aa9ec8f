"""Test-wide environment: must run before any kernel module is imported."""

import os
import sys
from pathlib import Path

import torch

# The repository root first on sys.path: `tdm_r1` imports from this checkout even where another copy is installed,
# also under a plain `pytest` (no cwd on sys.path). The fused ops import as `tdm_r1_kernels`, the installed name of
# kernels/ (an editable install maps it to this checkout's folder).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; DeepSpeed uses its CPU accelerator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions")
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
