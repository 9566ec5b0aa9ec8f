"""Fused kernels for the few-step sampler update and the per-step training losses.

Every op has an fp32 reference in `tdm_r1_kernels.reference`, Triton kernels (CUDA, or the CPU interpreter with
TRITON_INTERPRET=1 set before this package is imported) and an optional native CPU library built by CMake.
`tdm_r1_kernels.dispatch` picks the backend once per device type; see kernels/README.md.
"""

from .dispatch import native_available, resolve_backend
from .group_preference import (
    fused_group_preference,
    fused_group_preference_scores,
    fused_group_preference_weights,
)
from .reference import GroupPreference
from .renoise import fused_renoise
from .revised_x0_loss import fused_revised_x0_loss
from .sampler_step import SamplerStep, fused_sampler_step
from .velocity_target_mse import fused_velocity_target_mse

__all__ = [
    "GroupPreference",
    "SamplerStep",
    "fused_group_preference",
    "fused_group_preference_scores",
    "fused_group_preference_weights",
    "fused_renoise",
    "fused_revised_x0_loss",
    "fused_sampler_step",
    "fused_velocity_target_mse",
    "native_available",
    "resolve_backend",
]
