"""Rewards: a registry of named reward factories (see `mixgrpo.rewards.base`)."""

from mixgrpo.rewards.base import REWARDS, RewardError, RewardFn, build_reward

__all__ = ["REWARDS", "RewardError", "RewardFn", "build_reward"]
