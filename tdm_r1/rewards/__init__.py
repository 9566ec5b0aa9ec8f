"""Rewards: non-differentiable scorers of generated images. See `tdm_r1.rewards.base`."""

from tdm_r1.rewards.base import Reward, build_reward, register_reward

__all__ = ["Reward", "build_reward", "register_reward"]
