"""Base-model adapters (see `mixgrpo.models.base.FlowModel`)."""

from mixgrpo.models.base import MODELS, Cond, FlowModel, cond_cat, cond_index, cond_repeat_interleave, cond_to

__all__ = ["MODELS", "Cond", "FlowModel", "cond_cat", "cond_index", "cond_repeat_interleave", "cond_to"]

# The adapters register themselves on import; diffusers and transformers load only when one is built.
from mixgrpo.models import analytic, flux2, flux_pipeline, qwen_image, sd3, tiny, wan  # noqa: E402,F401
