"""Shared test helpers: THE tolerance table for kernel-vs-reference checks and the error metric.

Every kernel check compares against the fp32 reference evaluated on the same (already rounded) inputs, with
the max-norm relative error  max|actual - expected| / max|expected|. Tightening an entry is free; loosening
one needs a comment with the measured error.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

# (kind, dtype) -> tolerance; the largest error measured over the kernel suite on CPU is noted per entry.
#   "store":  per-element tensors written in the input dtype (x_next, x0_hat, x_tau, every gradient); the
#             floor is half an ulp of that dtype (fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3) plus fp32 noise.
#   "reduce": per-sample fp32 values (losses, normalised terms, group scores, weights) from inputs of that
#             dtype; fp32 accumulation-order noise only, so the same bound for every input dtype.
#   "store-interpret": the Triton CPU interpreter truncates fp32 -> bf16 on store instead of rounding to
#             nearest, so its bf16 stores are off by up to one ulp (2^-7 = 7.8e-3 relative).
TOLERANCES: dict[tuple[str, torch.dtype], float] = {
    ("store", torch.float32): 1e-6,  # measured 2.4e-7
    ("store", torch.float16): 6e-4,  # measured 4.6e-4
    ("store", torch.bfloat16): 4.5e-3,  # measured 3.7e-3
    ("store-interpret", torch.bfloat16): 8e-3,  # measured 7.6e-3
    ("reduce", torch.float32): 5e-6,  # measured 8.6e-7
    ("reduce", torch.float16): 5e-6,  # measured 2.1e-6 (terms: a ratio of two sums)
    ("reduce", torch.bfloat16): 5e-6,  # measured 1.6e-6
}


def tolerance(kind: str, dtype: torch.dtype, interpreted: bool = False) -> float:
    """Tolerance for a check of `kind` on tensors of `dtype` (interpreted: Triton CPU interpreter)."""
    if interpreted and (f"{kind}-interpret", dtype) in TOLERANCES:
        return TOLERANCES[(f"{kind}-interpret", dtype)]
    return TOLERANCES[(kind, dtype)]


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max|actual - expected| / max|expected| in fp64; NaN anywhere in `actual` gives NaN (and fails checks)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any():
        return float("nan")
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(
    name: str, actual: Tensor, expected: Tensor, kind: str, dtype: torch.dtype, interpreted: bool = False
) -> None:
    """Fail with the measured error unless rel_err(actual, expected) <= tolerance(kind, dtype)."""
    tol = tolerance(kind, dtype, interpreted)
    err = rel_err(actual, expected)
    if os.environ.get("TDM_R1_ERROR_LOG"):  # measured errors, for keeping the table tight
        with open(os.environ["TDM_R1_ERROR_LOG"], "a") as f:
            f.write(f"{kind}\t{dtype}\t{interpreted}\t{name}\t{err:.6g}\n")
    assert err <= tol, f"{name}: relative error {err:.3g} exceeds {tol:.3g} ({kind}, {dtype})"


def make(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    contiguous: bool = True,
    scale: float = 1.0,
) -> Tensor:
    """Fresh N(0, scale^2) draws in `dtype`; a strided view (every other column of a wider tensor) if not contiguous."""
    if contiguous:
        return (torch.randn(shape) * scale).to(dtype=dtype, device=device)
    wide = (*shape[:-1], 2 * shape[-1])
    return (torch.randn(wide) * scale).to(dtype=dtype, device=device)[..., ::2]


def leaf(t: Tensor | None, grad: bool = True) -> Tensor | None:
    """Same values and strides as a fresh autograd leaf."""
    return None if t is None else t.detach().requires_grad_(grad)


def fp32_leaf(t: Tensor | None, grad: bool = True) -> Tensor | None:
    """fp32 copy of `t` as an autograd leaf, for the reference side of a comparison."""
    return None if t is None else t.detach().float().requires_grad_(grad)


def dims_numel(dims: tuple[int, ...]) -> int:
    """Elements per sample of a [B, ...] shape."""
    n = 1
    for d in dims[1:]:
        n *= d
    return n


def role_named_parameters(role, host):
    """(name, parameter) pairs a role owns: its module's parameters (full mode), its adapter tensors (lora), or
    for the lora reference every frozen base tensor of the shared host."""
    if role.module is not None:
        return list(role.module.named_parameters())
    if role.adapter is None:
        return [(n, p) for n, p in host.named_parameters() if "lora_" not in n]
    own = {id(p) for p in role.parameters()}
    return [(n, p) for n, p in host.named_parameters() if id(p) in own]


# The tiny model of the integration tests (a few seconds per run on 2 cores).
TINY = ["model.dim=32", "model.depth=1", "model.heads=2", "model.text_layers=1", "threads=1"]


def save_tiny_teacher(path) -> None:
    """A random "trained" teacher of the TINY config at `path` (the zero-initialised output layer perturbed too, so
    every weight matters)."""
    from tdm_r1 import checkpoint as ckpt
    from tdm_r1.config import load_config
    from tdm_r1.models.tiny_dit import build_tiny_dit

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    m = build_tiny_dit(cfg.model, cfg.world)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt.save_model(path, m.state_dict(), cfg.model, cfg.world)


# Tiny one-process runs of the robustness tests (run directory, resume, crashes): a few seconds each.
TINY_DISTILL = [
    "distill.batch_size=2",
    "distill.eval_every=0",
    "distill.eval_at_end=false",
    "distill.checkpoint_every=1",
]
TINY_TRAIN = [
    "train.prompts_per_epoch=2",
    "train.group_size=2",
    "train.micro_batch_groups=1",
    "train.eval_every=0",
    "train.eval_baselines=false",
    "train.tensorboard=false",
    "train.rewards=[{name: dark_fraction, weight: 1.0}]",
    "eval.train_subset=2",
]


def tiny_run_files(d):
    """A folder with a tiny teacher, a two-word held-out list and a YAML of defaults (everything else by --set)."""
    save_tiny_teacher(d / "teacher.safetensors")
    (d / "heldout.txt").write_text("CAT\nDOG\n")
    (d / "run.yaml").write_text("seed: 0\n")
    return d


def write_yaml(tmp_path, text: str):
    """`text` as the config file tmp_path/c.yaml; its path."""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def train_epochs(sets: list[str], epochs: int = 2) -> list[dict]:
    """`tdm-r1 train`'s epochs 1..epochs of the config `sets` describes, in this process (no evaluation); their
    metric rows."""
    from tdm_r1.config import load_config
    from tdm_r1.phases import train_epoch
    from tdm_r1.rewards.scorer import build_scorer
    from tdm_r1.run import build_run

    run = build_run(load_config(None, sets), "train")
    scorer = build_scorer(run.cfg)
    try:
        return [train_epoch(run, scorer, epoch) for epoch in range(1, epochs + 1)]
    finally:
        scorer.close()
