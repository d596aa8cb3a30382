"""Qwen-Image-Edit-2509 / 2511 (any `QwenImageEditPlusPipeline` checkpoint): instruction-based editing of one to three
input images, loaded from a local diffusers directory.

The directory is what the hub's Qwen/Qwen-Image-Edit-2511 holds: model_index.json, transformer/ (a
QwenImageTransformer2DModel; 2511's has zero_cond_t, which the transformer applies itself), vae/, text_encoder/
(Qwen2.5-VL-7B-Instruct), processor/ (its tokenizer and image processor), tokenizer/. Nothing is downloaded.

What the adapter does, as `QwenImageEditPlusPipeline.__call__` does it (everything else is `QwenImageAdapter`'s:
packing, timestep = sigma, true CFG rescaled to the conditional norm, decoding):
- text (`QwenImageEditTextEncoder`): Qwen2.5-VL sees the instruction and the input images: each image, resized to
  the area CONDITION_IMAGE_SIZE (384^2) at its aspect ratio, becomes "Picture i: <|vision_start|><|image_pad|>
  <|vision_end|>" before the instruction in the pipeline's edit template, its image token expanded to the vision
  tower's merged patches (as `Qwen2VLProcessor` does); the last hidden states past the template's first 64 tokens,
  zero-padded to max_sequence_length with a mask, are the conditioning. The processor's image processor is loaded
  with `AutoImageProcessor`, so it is the class the stock pipeline gets in the same environment (the PIL one
  without torchvision, which is all this adapter needs);
- the input images, resized to the area VAE_IMAGE_SIZE (1024^2) at their aspect ratio, are encoded by the VAE
  (mode, normalised) and packed into tokens placed after the target's, with their own (1, rows, cols) grids in
  img_shapes; only the target's output tokens are the velocity;
- true CFG's unconditional rows encode "" with the same images, as the pipeline encodes its negative prompt (the
  model card's example passes " " with true_cfg_scale 4; the rollout's unconditional prompt is always "").
The images go through PIL (8-bit) for the resizes, as the pipeline takes PIL images: exact for images read from
files. The pipeline encodes one prompt at a time (it refuses batches); so does the text encoder here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.errors import ConfigError
from mixgrpo.models._diffusers import (PIPELINE_MODULES, CausalVaeEncoder, check_pipeline_dir, check_pipeline_run,
                                       check_size, from_pil, input_images, load_components, module_device, to_pil)
from mixgrpo.models.base import MODELS, Cond, Frozen, ModelSpec, PromptSets, TextEncoder
from mixgrpo.models.flux import pack
from mixgrpo.models.qwen_image import QwenImageAdapter, QwenImageDecoder, _qwen_image_lora_format
from mixgrpo.models.text import note_truncations

EXAMPLE = "Qwen/Qwen-Image-Edit-2511"
# QwenImageEditPlusPipeline's edit template, the leading tokens it drops (its prompt_template_encode_start_idx), and
# the template of each input image before the instruction.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                   "objects, background), then explain how the user's text instruction should alter or modify the "
                   "image. Generate a new image that meets the user's requirements while maintaining consistency with "
                   "the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                   "<|im_start|>assistant\n")
PROMPT_TEMPLATE_START = 64
IMAGE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"
MAX_INPUTS = 3  # the input images an example may have (the 2509 / 2511 model cards: one to three)


def edit_dimensions(area: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the pipeline's resize of an input of `height` x `width` to `area` pixels at its aspect ratio,
    multiples of 32 (its `calculate_dimensions`, which returns width first)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    w, h = calculate_dimensions(area, width / height)
    return int(h), int(w)


def resized(image: torch.Tensor, size: tuple[int, int]):
    """[3, H, W] in [0, 1] -> a PIL image of `size` (height, width), resized as the pipeline resizes (its
    VaeImageProcessor: Lanczos; the same size is left as it is)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().resize(to_pil(image), *size)


class QwenImageEditTextEncoder(Frozen):
    """Frozen Qwen2.5-VL of Qwen-Image-Edit-2509 / 2511, encoding (instruction, input images) like
    `QwenImageEditPlusPipeline.encode_prompt`, padded to a fixed length.

    encode(prompts, images) -> {"prompt_embeds": [B, L, D] (L = max_sequence_length, zeros past an example's end),
                                "prompt_mask": [B, L] long, 1 on its tokens};
    images: one tuple per prompt of [3, H, W] tensors in [0, 1]. The images' tokens count (about 190 per image at
    384^2); an example longer than L is truncated (the first with a warning, the others counted).
    """

    def __init__(self, tokenizer, image_processor, text_encoder: nn.Module, max_sequence_length: int = 1024,
                 condition_area: int | None = None):
        super().__init__()
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.qwen = text_encoder.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length
        self.condition_area = condition_area or CONDITION_IMAGE_SIZE

    def _example(self, prompt: str, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The kept hidden states [T, D] of one example (what the pipeline computes for a batch of one)."""
        pictures = [resized(image, edit_dimensions(self.condition_area, *image.shape[1:])) for image in images]
        vision = self.image_processor(images=pictures, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        text = PROMPT_TEMPLATE.format("".join(IMAGE_TEMPLATE.format(i + 1) for i in range(len(images))) + prompt)
        parts = text.split(IMAGE_TOKEN)  # each image token becomes one per merged patch, as Qwen2VLProcessor does
        text = parts[0] + "".join(IMAGE_TOKEN * int(grid.prod() // merge) + part
                                  for grid, part in zip(vision["image_grid_thw"], parts[1:]))
        tokens = self.tokenizer([text], return_tensors="pt")
        device = module_device(self.qwen)
        states = self.qwen(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device),
                           pixel_values=vision["pixel_values"].to(device, self.qwen.dtype),
                           image_grid_thw=vision["image_grid_thw"].to(device), output_hidden_states=True)
        return states.hidden_states[-1][0, PROMPT_TEMPLATE_START:]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: Sequence[Sequence[torch.Tensor]] | None = None) -> Cond:
        if images is None:
            raise ConfigError("qwen_image_edit: its text encoder sees the input images; give them with the prompts")
        states = [self._example(p, tuple(example)) for p, example in zip(prompts, images)]
        length = self.max_sequence_length
        embeds = states[0].new_zeros(len(states), length, states[0].shape[-1])
        mask = torch.zeros(len(states), length, dtype=torch.long, device=embeds.device)
        for b, s in enumerate(states):
            embeds[b, :len(s[:length])] = s[:length]
            mask[b, :len(s[:length])] = 1
        note_truncations(self.tokenizer, length, prompts, [len(s) for s in states])
        return {"prompt_embeds": embeds.to(self.qwen.dtype), "prompt_mask": mask}


def load_qwen_image_edit_text_encoder(path: str | Path, *, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                                      max_sequence_length: int = 1024,
                                      condition_area: int | None = None) -> QwenImageEditTextEncoder:
    """The Qwen2.5-VL text encoder of a local Qwen-Image-Edit pipeline directory, with its processor's tokenizer and
    image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = check_pipeline_dir(path, "qwen_image_edit", components=["text_encoder", "processor"], example=EXAMPLE)
    return QwenImageEditTextEncoder(
        AutoTokenizer.from_pretrained(path, subfolder="processor", local_files_only=True),
        AutoImageProcessor.from_pretrained(path, subfolder="processor", local_files_only=True),
        Qwen2_5_VLForConditionalGeneration.from_pretrained(path, subfolder="text_encoder",
                                                           torch_dtype=parse_dtype(dtype),
                                                           local_files_only=True).to(device),
        max_sequence_length=max_sequence_length, condition_area=condition_area)


class QwenImageEditAdapter(QwenImageAdapter):
    """`QwenImageAdapter` with each example's input images as VAE-latent tokens after the target's (see the module
    docstring). encoder: `CausalVaeEncoder`; pixels: (H, W) of the target and the inputs; reference: (height, width)
    the inputs are resized to before the VAE (the pipeline's VAE_IMAGE_SIZE area)."""

    image_inputs = MAX_INPUTS

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, latent_shape: tuple[int, int, int],
                 decoder: nn.Module, encoder: nn.Module, pixels: tuple[int, int], reference: tuple[int, int],
                 factor: int):
        super().__init__(transformer, text_encoder, latent_shape, decoder)
        self.encoder = encoder
        self.pixels, self.reference = tuple(pixels), tuple(reference)
        self.reference_grid = (1, reference[0] // factor // 2, reference[1] // factor // 2)  # (1, rows, cols) tokens

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the inputs and outputs: the model's resolution."""
        return self.pixels

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], images: Sequence[Sequence[torch.Tensor]] | None = None) -> Cond:
        """Conditioning of (instruction, 1 to 3 input images [3, H, W] in [0, 1] at the model's height and width):
        the VL encoder's states and mask, and "image_latents" [B, k M, 4 C], the inputs' packed VAE latents."""
        stacked = input_images(self, prompts, images, self.pixels)
        cond = dict(self.text_encoder.encode(list(prompts), [tuple(example) for example in stacked]))
        device = next(self.encoder.parameters()).device
        latents = []
        for i in range(stacked.shape[1]):  # Picture i of every example
            pictures = torch.stack([from_pil(resized(image, self.reference)) for image in stacked[:, i]])
            z = self.encoder(pictures.to(device)[:, :, None])                                # [B, C, 1, h', w']
            latents.append(pack(z[:, :, 0], 2))
        cond["image_latents"] = torch.cat(latents, dim=1)
        return cond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity. x: [B, C, h, w]; sigma: [B] (or a scalar) in [0, 1]; returns [B, C, h, w] in x's dtype."""
        extra = cond["image_latents"]
        count = extra.shape[1] // (self.reference_grid[1] * self.reference_grid[2])
        return self.velocity(x, sigma, cond, extra=extra, extra_shapes=[self.reference_grid] * count)


def load_qwen_image_edit(path: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", height: int = 1024,
                         width: int = 1024, max_sequence_length: int = 1024, condition_area: int | None = None,
                         reference_area: int | None = None,
                         text_encoder: TextEncoder | None = None) -> QwenImageEditAdapter:
    """A Qwen-Image-Edit-2509 / 2511 `QwenImageEditAdapter` from a local diffusers pipeline directory, in eval mode.

    path: the pipeline directory. dtype: weights dtype of every component ("bfloat16" on GPUs).
    height, width: the output's and the inputs' size in pixels (multiples of 16); the pipeline's default output is
        the 1024^2-area size at the (last) input's aspect ratio, e.g. 1024 x 1024.
    max_sequence_length: the VL encoder's tokens kept per example (the template's end, the images' and the
        instruction's; at most 1024 is plenty for three 384^2 images and a long instruction).
    condition_area, reference_area: the pixel areas the inputs are resized to for the VL encoder and for the VAE
        (default: the pipeline's CONDITION_IMAGE_SIZE 384^2 and VAE_IMAGE_SIZE 1024^2).
    text_encoder: an already loaded one to share (e.g. with a frozen reference copy). No embedding cache: the
        encoder sees the images.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE

    def factor(c: dict[str, nn.Module]) -> int:
        return 2 ** len(c["vae"].config.temperal_downsample)

    components, text_encoder = load_components(
        "qwen_image_edit", path, example=EXAMPLE,
        classes={"transformer": QwenImageTransformer2DModel, "vae": AutoencoderKLQwenImage}, dtype=dtype,
        device=device, text_encoder=text_encoder, embedding_cache=None,
        load_text_encoder=lambda root, torch_dtype: load_qwen_image_edit_text_encoder(
            root, dtype=torch_dtype, device=device, max_sequence_length=max_sequence_length,
            condition_area=condition_area),
        cache_widths=lambda c: {},
        check=lambda c: check_size("qwen_image_edit", (height, width), 2 * factor(c),
                                   f"VAE factor {factor(c)} x patch 2"))
    transformer, vae = components["transformer"], components["vae"]
    f = factor(components)
    latent_shape = (vae.config.z_dim, height // f, width // f)
    reference = edit_dimensions(reference_area or VAE_IMAGE_SIZE, height, width)
    return QwenImageEditAdapter(transformer, text_encoder, latent_shape, QwenImageDecoder(vae), CausalVaeEncoder(vae),
                                (height, width), reference, f).eval()


def _check_qwen_image_edit_run(args: dict, prompts: PromptSets) -> list[str]:
    if args.get("embedding_cache"):
        return ["model.args.embedding_cache: qwen_image_edit's text encoder sees the input images, so a cache of "
                "prompts cannot stand in for it; drop embedding_cache"]
    return check_pipeline_run("qwen_image_edit", args, prompts, text_folders=["text_encoder", "processor"],
                              t5_tokenizer=None, max_sequence_length=1024, text_length=lambda n: n, example=EXAMPLE)


def _reference_tokens(args: dict, tokens: int) -> int:
    """The tokens of one input image at the reference area, from the target's `tokens` (`ModelSpec.input_tokens`)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE

    height, width = args["height"], args["width"]
    rows, cols = edit_dimensions(args.get("reference_area") or VAE_IMAGE_SIZE, height, width)
    return tokens * rows * cols // (height * width)


MODELS.add(ModelSpec("qwen_image_edit", load_qwen_image_edit, check=_check_qwen_image_edit_run,
                     lora_format=_qwen_image_lora_format, modules=PIPELINE_MODULES, pipeline_sigmas=True,
                     image_inputs=MAX_INPUTS, input_tokens=_reference_tokens))
