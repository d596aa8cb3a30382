"""ImageReward (Xu et al. 2023): BLIP (ViT-L/16 image encoder + BERT text encoder with cross-attention to the
image) and an MLP head, trained on human rankings of text-to-image outputs.

Checkpoint: `ImageReward.pt`, the state dict of the official model (keys blip.visual_encoder.* in timm's ViT
naming, blip.text_encoder.* in BLIP's "med" BERT naming, mlp.layers.*). We map it onto transformers'
`BlipVisionModel` and `BlipTextModel`, whose layers are the same computation (`imagereward_to_transformers`);
BLIP's contrastive projections (blip.vision_proj, blip.text_proj) are not used by the score and are skipped.
Tokenizer: a bert-base-uncased directory. BLIP adds [DEC] and [ENC] to it; ordinary prompts never produce
them, so the plain BERT tokenizer gives the same ids.

score = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072, h_CLS = the text encoder's output at [CLS]
for the prompt (padded to 35 tokens) attending to all image tokens; the constants are the official
normalisation (the mean and std of the raw score on the authors' data).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from mixgrpo.rewards.aesthetic import RatingMLP, load_score_mlp
from mixgrpo.rewards.base import REWARDS, RewardError
from mixgrpo.rewards.clip import LazyModelReward, check_weights_fit, clip_preprocess, existing_path, read_state_dict

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
"""The official prompt length (tokens, with [CLS] and [SEP])."""

BLIP_LARGE: dict[str, Any] = {
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 16,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-6},
    "text_config": {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072,
                    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512,
                    "encoder_hidden_size": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                    "pad_token_id": 0, "is_decoder": True},
}
"""ImageReward's BLIP as BlipVisionConfig / BlipTextConfig kwargs: timm ViT-L/16 (LayerNorm eps 1e-6) and
BLIP's med BERT-base with cross-attention to 1024-wide image tokens. `is_decoder` only makes transformers
build the cross-attention layers; the encoder is run bidirectionally, as in ImageReward."""

# timm ViT names (under blip.visual_encoder.) -> transformers BlipVisionModel names
_VIT_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VIT_BLOCK_KEYS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                   "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_UNUSED_KEYS = {"blip.text_encoder.embeddings.position_ids"}  # a buffer, recomputed by transformers


def imagereward_to_transformers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
    """Split an ImageReward state dict into (vision, text, mlp) state dicts for BlipVisionModel,
    BlipTextModel and `RatingMLP`. Vision keys are renamed (timm -> transformers; same tensors, the fused qkv
    has the same [q; k; v] row layout); text keys already use BLIP's BERT names. Unknown keys raise."""
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key in _UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name in _VIT_TOP:
                vision[_VIT_TOP[name]] = value
            elif (m := _VIT_BLOCK.match(name)) and m.group(2) in _VIT_BLOCK_KEYS:
                vision[f"encoder.layers.{m.group(1)}.{_VIT_BLOCK_KEYS[m.group(2)]}.{m.group(3)}"] = value
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise RewardError(f"imagereward: {len(unknown)} checkpoint keys are not ImageReward keys "
                          f"(e.g. {unknown[:3]}); expected the state dict of ImageReward.pt")
    return vision, text, mlp


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], part: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RewardError(f"imagereward: the {part} weights do not match the config: missing "
                          f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}; for ImageReward.pt "
                          f"leave `config` unset (BLIP ViT-L)")


class ImageRewardReward(LazyModelReward):
    name = "imagereward"

    def __init__(self, path: str, tokenizer: str, config: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._path, self._tokenizer_path = path, tokenizer
        self._config = config if config is not None else BLIP_LARGE
        self.vision: Any = None
        self.text: Any = None
        self.mlp: torch.nn.Module | None = None
        self.tokenizer: Any = None

    def _check_parts(self, vision_state, text_state, mlp_state) -> None:
        """One line naming the first mismatch of each part, checked on the meta device."""
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        fix = "for ImageReward.pt leave `config` unset (BLIP ViT-L)"
        check_weights_fit(lambda: BlipVisionModel(BlipVisionConfig(**self._config["vision_config"])), vision_state,
                          f"{self.name} (vision)", fix)
        check_weights_fit(lambda: BlipTextModel(BlipTextConfig(**self._config["text_config"]), add_pooling_layer=False),
                          text_state, f"{self.name} (text)", fix)
        if "layers.0.weight" in mlp_state:
            check_weights_fit(lambda: RatingMLP(mlp_state["layers.0.weight"].shape[1]), mlp_state,
                              f"{self.name} (MLP)", "expected the 5-layer rating MLP of ImageReward.pt")

    def check(self) -> None:
        existing_path(self._tokenizer_path, self.name, "tokenizer directory")
        state = read_state_dict(existing_path(self._path, self.name, "checkpoint"), self.name, shapes_only=True)
        self._check_parts(*imagereward_to_transformers(state))

    def load(self) -> None:
        from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.tokenizer = BertTokenizer.from_pretrained(
            str(existing_path(self._tokenizer_path, self.name, "tokenizer directory")), local_files_only=True)
        state = read_state_dict(existing_path(self._path, self.name, "checkpoint"), self.name)
        vision_state, text_state, mlp_state = imagereward_to_transformers(state)
        self._check_parts(vision_state, text_state, mlp_state)
        with self.device:  # built where it runs
            self.vision = BlipVisionModel(BlipVisionConfig(**self._config["vision_config"]))
            self.text = BlipTextModel(BlipTextConfig(**self._config["text_config"]), add_pooling_layer=False)
        _load_strict(self.vision, vision_state, "vision")
        _load_strict(self.text, text_state, "text")
        self.vision.to(dtype=self.dtype).eval()
        self.text.to(dtype=self.dtype).eval()
        self.mlp = load_score_mlp(mlp_state, self.name).to(self.device)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        assert self.mlp is not None
        pixels = clip_preprocess(images, self.vision.config.image_size).to(self.dtype)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # [B, N, Dv]
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt").to(self.device)
        hidden = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           encoder_hidden_states=image_tokens).last_hidden_state  # [B, L, Dt]
        raw = self.mlp(hidden[:, 0].float())  # [B]
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


@REWARDS.register("imagereward", modules=("transformers",))
def imagereward(path: str, tokenizer: str, config: dict[str, Any] | None = None, device: str = "cpu",
                dtype: str = "float32", batch_size: int = 16) -> ImageRewardReward:
    """ImageReward: `path` = ImageReward.pt, `tokenizer` = a bert-base-uncased tokenizer directory.

    score = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072. `config` defaults to `BLIP_LARGE`.
    """
    return ImageRewardReward(path, tokenizer, config, device=device, dtype=dtype, batch_size=batch_size)
