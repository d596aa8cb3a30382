"""Rewards: a registry of named reward factories (see `mixgrpo.rewards.base`)."""

from mixgrpo.rewards.base import FRAME_AGGREGATIONS, REWARDS, RewardError, RewardFn, build_reward

__all__ = ["FRAME_AGGREGATIONS", "REWARDS", "RewardError", "RewardFn", "build_reward"]

# The model rewards register themselves on import; transformers loads only when one is built and called.
from mixgrpo.rewards import aesthetic, clip, hps, imagereward, ocr, pickscore, vlm  # noqa: E402,F401
from mixgrpo.rewards import consistency, jpeg, temporal, verifier  # noqa: E402,F401  (weight-free rewards)
