"""Loading a diffusers FlowModel by `model.kind`: the one place that knows every adapter."""

from __future__ import annotations

from tdm_r1.config import DiffusersConfig, ModelConfig
from tdm_r1.models.diffusers_common import DiffusersFlowModel


def load_diffusers_model(model_cfg: ModelConfig, cfg: DiffusersConfig) -> DiffusersFlowModel:
    """The FlowModel for model.kind sd3 / zimage, from cfg.path (or with random weights, cfg.random_init)."""
    if cfg.random_init and model_cfg.kind in ("sd3", "zimage"):
        from tdm_r1.models.random_init import build_random_model

        return build_random_model(model_cfg, cfg)
    if model_cfg.kind == "sd3":
        from tdm_r1.models.sd3 import load_sd3

        return load_sd3(cfg)
    if model_cfg.kind == "zimage":
        from tdm_r1.models.zimage import load_zimage

        return load_zimage(cfg)
    raise ValueError(f"model.kind={model_cfg.kind!r} is not a diffusers model (expected sd3 or zimage)")
