"""Base-model adapters (see `mixgrpo.models.base.FlowModel`)."""

from mixgrpo.models.base import (MODELS, Cond, FlowModel, ModelSpec, cond_cat, cond_expand, cond_index,
                                 cond_repeat_interleave, cond_to)

__all__ = ["MODELS", "Cond", "FlowModel", "ModelSpec", "cond_cat", "cond_expand", "cond_index", "cond_repeat_interleave",
           "cond_to"]

# Each base model is one file that registers its description (`ModelSpec`: factory, text encoder, pre-flight
# checks, LoRA format) at its foot; importing it registers it. diffusers and transformers load only when one is
# built. A new model: its file, and its name on this line.
from mixgrpo.models import (analytic, flux2, flux_kontext, flux_pipeline, qwen_image, qwen_image_edit,  # noqa: E402,F401
                            sd3, tiny, wan, wan_i2v)
