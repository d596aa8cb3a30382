"""Base-model adapters (see `mixgrpo.models.base.FlowModel`)."""

from mixgrpo.models.base import MODELS, Cond, FlowModel, cond_cat, cond_index, cond_repeat_interleave, cond_to

__all__ = ["MODELS", "Cond", "FlowModel", "cond_cat", "cond_index", "cond_repeat_interleave", "cond_to"]
