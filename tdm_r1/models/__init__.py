"""Models implementing the FlowModel protocol (`tdm_r1.models.base`)."""

from tdm_r1.models.base import Cond, FlowModel

__all__ = ["Cond", "FlowModel"]
