"""Shared plumbing of the model rewards, and the CLIP score.

- `clip_preprocess`: CLIP-style image preprocessing in plain torch (no torchvision): resize the shorter side
  (bicubic, antialiased: the same filter as PIL's), center crop, CLIP mean/std normalisation.
- `LazyModelReward`: loads its model on the first call, scores in batches on a configurable device, and
  returns float32 CPU scores; any failure is a `RewardError`.
- `clip_cosine`: cosine of normalised image and text features of a transformers `CLIPModel` (HPS, PickScore
  and the CLIP score are all this number, scaled differently).

transformers is imported inside the loaders, so that `import mixgrpo.rewards` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from mixgrpo.dtypes import parse_dtype  # noqa: F401  (re-exported to the reward modules)
from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import REWARDS, RewardError, check_batch

if TYPE_CHECKING:
    from transformers import CLIPModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of OpenAI CLIP's normalisation, shared by open_clip ViT-H-14 (HPS), PickScore, BLIP."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)



def clip_preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP eval transform: [B, 3, H, W] in [0, 1] -> [B, 3, size, size], normalised.

    x = crop_center(resize_shorter_side(images, size)); out = (clamp(x, 0, 1) - mean) / std.
    The resize is bicubic with antialiasing, which is PIL's bicubic filter (what torchvision's `Resize` applies
    to PIL images in the official code); the clamp mirrors PIL's rounding to uint8 of the overshoot.
    """
    check_batch("", images)
    h, w = images.shape[-2:]
    x = images.float()
    if min(h, w) != size:
        # torchvision's Resize(int): the shorter side becomes `size`, the longer is scaled and truncated
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        h, w = new_h, new_w
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size].clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t




def existing_path(path: str | Path | None, reward: str, what: str) -> Path:
    """The path, checked to exist; a RewardError naming the argument to fix otherwise."""
    if path is None or str(path) == "":
        raise RewardError(f"{reward}: no {what} given; set it in the reward's args")
    p = Path(path).expanduser()
    if not p.exists():
        raise RewardError(f"{reward}: {what} {str(p)!r} does not exist; check the path in the reward's args")
    return p


def read_state_dict(path: Path, reward: str, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.pt / .pth / .bin via torch.load, or .safetensors), on the CPU.

    Unwraps {"state_dict": ...} and strips a DistributedDataParallel "module." prefix, the two wrappers that
    the official checkpoints of the field use. shapes_only: meta tensors (shapes and dtypes; the file is
    memory-mapped where its format allows, so a 2 GB checkpoint is checked without being read).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="meta" if shapes_only else "cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
            except RuntimeError:  # a legacy (non-zip) torch.save file cannot be memory-mapped
                if not shapes_only:
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardError(f"{reward}: cannot read checkpoint {str(path)!r}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardError(f"{reward}: {str(path)!r} is not a state dict (a dict of tensors, or "
                          f"{{'state_dict': ...}}); is it the right file?")
    return {k.removeprefix("module."): v.to("meta") if shapes_only else v for k, v in state.items()}


def check_weights_fit(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], reward: str,
                      fix: str) -> None:
    """Raise a one-line RewardError when `state` does not fit the module `build()` makes: missing or
    unexpected keys, or other shapes. The module is built on the meta device (no memory, no time), so a
    checkpoint of another architecture is refused before any large model is built or any image generated."""
    with torch.device("meta"):
        own = build().state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
             f"{len(shapes)} of another shape (e.g. {shapes[0]}: checkpoint {list(state[shapes[0]].shape)}, model "
             f"{list(own[shapes[0]].shape)})" if shapes else ""]
    raise RewardError(f"{reward}: the checkpoint does not fit the model: {', '.join(p for p in parts if p)}; {fix}")


class LazyModelReward:
    """Base of the model rewards: `reward(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32 CPU`.

    Subclasses implement `load()` (build the model on `self.device`; called once, on the first call) and
    `score(images, prompts)` (one batch of at most `batch_size`, images already on `self.device`).
    """

    name = "reward"

    def __init__(self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 batch_size: int = 16):
        if batch_size < 1:
            raise ConfigError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = batch_size
        self._loaded = False

    def load(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Check the files the model needs (paths, checkpoint keys and shapes) without loading it; raises a
        one-line RewardError. Called before training starts, so that a wrong file stops a run at once."""

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch(self.name, images, prompts)
        if not self._loaded:
            from mixgrpo.progress import bar

            try:
                with bar(total=1, desc=f"loading reward {self.name} on {self.device}", unit="model") as progress:
                    self.load()
                    progress.update()
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"{self.name}: cannot load the model: {type(e).__name__}: {e}") from e
            self._loaded = True
        scores = []
        try:
            with torch.inference_mode():
                for i in range(0, images.shape[0], self.batch_size):
                    batch = images[i:i + self.batch_size].to(self.device)
                    scores.append(self.score(batch, prompts[i:i + self.batch_size]).float().cpu())
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{self.name}: scoring failed on {self.device}: {type(e).__name__}: {e}") from e
        return torch.cat(scores)


def load_clip_tokenizer(path: str | Path, reward: str) -> Any:
    """A transformers `CLIPTokenizer` from a local directory (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import CLIPTokenizer

    p = existing_path(path, reward, "tokenizer directory")
    return CLIPTokenizer.from_pretrained(str(p), local_files_only=True)


def check_model_dir(path: str | Path, reward: str) -> None:
    """A transformers model directory: it exists and holds a config.json."""
    p = existing_path(path, reward, "model directory")
    if not (p / "config.json").is_file():
        raise RewardError(f"{reward}: {str(p)!r} has no config.json: give the transformers model directory "
                          f"(what huggingface-cli download REPO --local-dir DIR writes)")


def load_clip_model(path: str | Path, reward: str, device: torch.device, dtype: torch.dtype) -> CLIPModel:
    """A transformers `CLIPModel` from a local directory, in eval mode on `device`."""
    from transformers import CLIPModel

    p = existing_path(path, reward, "CLIP model directory")
    model = CLIPModel.from_pretrained(str(p), local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def clip_cosine(model: CLIPModel, tokenizer: Any, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """cos(image_i, text_i) = <f_img / |f_img|, f_txt / |f_txt|> for each pair: pixels [B, 3, S, S] -> [B].

    f_img = visual_projection(pooled vision output), f_txt = text_projection(pooled text output, at the first
    end-of-text token). Each distinct prompt is encoded once (a GRPO group shares one prompt).
    """
    unique = list(dict.fromkeys(prompts))
    tokens = tokenizer(unique, padding=True, truncation=True,
                       max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    tokens = {k: v.to(pixels.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    text = model.text_projection(model.text_model(**tokens).pooler_output).float()  # [U, D]
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).float()  # [B, D]
    index = torch.tensor([unique.index(p) for p in prompts], device=pixels.device)
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)[index]).sum(-1)


class ClipSimilarityReward(LazyModelReward):
    """A reward that is a function of the CLIP cosine: score = transform(cos, model). Shared by HPS,
    PickScore and the CLIP score, which differ in how the model is loaded and in `transform`."""

    def __init__(self, name: str, load_model: Callable[[], CLIPModel], tokenizer: str | Path,
                 transform: Callable[[torch.Tensor, CLIPModel], torch.Tensor],
                 check_model: Callable[[], None] | None = None, **kwargs: Any):
        self.name = name
        super().__init__(**kwargs)
        self._load_model = load_model
        self._check_model = check_model
        self._tokenizer_path = tokenizer
        self._transform = transform
        self.model: CLIPModel | None = None
        self.tokenizer: Any = None

    def load(self) -> None:
        self.tokenizer = load_clip_tokenizer(self._tokenizer_path, self.name)
        self.model = self._load_model()
        eos = self.model.config.text_config.eos_token_id
        if eos != 2 and self.tokenizer.eos_token_id != eos:
            # transformers pools the text at the first eos_token_id of the config: a tokenizer with another
            # end-of-text id would silently pool the wrong token
            raise RewardError(f"{self.name}: tokenizer end-of-text id {self.tokenizer.eos_token_id} differs from "
                              f"the model's text_config.eos_token_id {eos}; use the tokenizer of this CLIP model")

    def check(self) -> None:
        existing_path(self._tokenizer_path, self.name, "tokenizer directory")
        if self._check_model is not None:
            self._check_model()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        assert self.model is not None
        pixels = clip_preprocess(images, self.model.config.vision_config.image_size).to(self.dtype)
        return self._transform(clip_cosine(self.model, self.tokenizer, pixels, prompts), self.model)


@REWARDS.register("clipscore", modules=("transformers",))
def clipscore(path: str, tokenizer: str | None = None, mode: str = "cosine", device: str = "cpu",
              dtype: str = "float32", batch_size: int = 16) -> ClipSimilarityReward:
    """CLIP score of any transformers CLIP directory (e.g. openai/clip-vit-large-patch14).

    mode "cosine": score = cos(image, text) in [-1, 1].
    mode "torchmetrics": score = max(100 cos, 0), torchmetrics' CLIPScore convention.
    `tokenizer` defaults to `path` (a CLIP directory usually holds its tokenizer).
    """
    transforms = {"cosine": lambda cos, model: cos,
                  "torchmetrics": lambda cos, model: (100.0 * cos).clamp(min=0.0)}
    if mode not in transforms:
        raise ConfigError(f"clipscore: unknown mode {mode!r}; use 'cosine' or 'torchmetrics'")
    torch_dtype, torch_device = parse_dtype(dtype), torch.device(device)
    return ClipSimilarityReward(
        "clipscore", lambda: load_clip_model(path, "clipscore", torch_device, torch_dtype),
        tokenizer if tokenizer is not None else path, transforms[mode],
        check_model=lambda: check_model_dir(path, "clipscore"), device=device, dtype=dtype, batch_size=batch_size)
