"""The reward server's wire format (protocol 1): JSON over HTTP, shared by `mixgrpo serve-rewards`
(`mixgrpo.rewards.server`) and the trainer's client (`mixgrpo.rewards.remote`). docs/rewards.md describes it for
clients and scorers in other languages. Standard library, numpy and Pillow only: the trainer's side needs no web
framework.

POST /score, body:
    {"rewards": [LABEL, ...],                 the hosted rewards to apply (labels of GET /health)
     "prompts": [TEXT, ...],                  one per image (B)
     "images": IMAGES,                        B images (or videos)
     "seeds": [INT, ...],                     optional, one per image: for rewards that draw (a VLM judge's sampling)
     "inputs": IMAGES}                        optional, B images [B, 3, H, W]: each image's input image (an edit's
                                              source, an image-to-video conditioning frame), for rewards that take
                                              inputs (GET /health says which: "takes_inputs")
IMAGES is either raw pixels
    {"format": "raw", "dtype": "uint8" | "float32", "shape": [B, 3, H, W] or [B, F, 3, H, W],
     "data": base64 of the C-order little-endian array}     uint8: 0..255; float32: 0..1
or PNG files (images only, RGB)
    {"format": "png", "data": [base64 PNG, ...]}            B of them, all of the same size
Answer 200:
    {"scores": {LABEL: [number | null, ...]},  B per reward asked for; null where that image got no score
     "errors": {LABEL: [null | TEXT, ...]}}    why an image got null (the reward raised, or gave NaN / inf)
A bad request is answered 4xx with {"error": TEXT, "field": NAME}; a wrong or missing token 401; a body over the
server's limit 413.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

PROTOCOL = 1
IMAGE_DTYPES = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4")}
ENCODINGS = ("float32", "uint8", "png")
"""How a client can send images (and input images): raw float32 (exact: a remote score equals the in-process one bit
for bit), raw uint8 (4x smaller, quantised like a PNG) or PNG files (smallest for smooth images; images only)."""
FIELDS = ("rewards", "prompts", "images", "seeds", "inputs")
"""The fields of a score request."""


class WireError(ValueError):
    """A request (or answer) that does not follow the wire format; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# --------------------------------------------------------------------------------------------------
# images


def encode_images(images: torch.Tensor, encoding: str = "float32") -> dict[str, Any]:
    """images [B, 3, H, W] or videos [B, F, 3, H, W] in [0, 1] -> the IMAGES object of a request."""
    if encoding not in ENCODINGS:
        raise ValueError(f"image encoding {encoding!r} is unknown: use one of {ENCODINGS}")
    x = images.detach().to("cpu", torch.float32)
    if encoding == "png":
        from mixgrpo.images import to_pil

        if x.dim() != 4:
            raise ValueError("PNG carries images [B, 3, H, W], not videos: send videos as raw arrays")
        files = []
        for image in x:
            buffer = io.BytesIO()
            to_pil(image).save(buffer, format="PNG")
            files.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return {"format": "png", "data": files}
    if encoding == "uint8":
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # as `mixgrpo.images.to_pil` quantises
    array = np.ascontiguousarray(x.numpy(), dtype=IMAGE_DTYPES[encoding])
    return {"format": "raw", "dtype": encoding, "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_images(obj: Any, field: str = "images") -> torch.Tensor:
    """The IMAGES object of a request -> float32 [B, 3, H, W] or [B, F, 3, H, W] in [0, 1]. Raises WireError."""
    if not isinstance(obj, dict):
        raise WireError(field, "must be an object {format, ...}")
    kind = obj.get("format")
    if kind == "raw":
        dtype, shape = obj.get("dtype"), obj.get("shape")
        if dtype not in IMAGE_DTYPES:
            raise WireError(f"{field}.dtype", f"{dtype!r} is not one of {sorted(IMAGE_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) not in (4, 5)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
                or shape[-3] != 3):
            raise WireError(f"{field}.shape", f"{shape!r} is not [B, 3, H, W] or [B, F, 3, H, W] of positive integers")
        raw = _b64(obj.get("data"), f"{field}.data")
        want = math.prod(shape) * IMAGE_DTYPES[dtype].itemsize
        if len(raw) != want:
            raise WireError(f"{field}.data", f"holds {len(raw)} bytes; shape {shape} of {dtype} needs {want}")
        x = torch.from_numpy(np.frombuffer(raw, dtype=IMAGE_DTYPES[dtype]).reshape(shape).copy())
        return x.float() / 255.0 if dtype == "uint8" else x
    if kind == "png":
        files = obj.get("data")
        if not isinstance(files, list) or not files:
            raise WireError(f"{field}.data", "must be a non-empty list of base64 PNG files")
        from PIL import Image, UnidentifiedImageError

        arrays = []
        for i, text in enumerate(files):
            try:
                with Image.open(io.BytesIO(_b64(text, f"{field}.data[{i}]"))) as img:
                    arrays.append(np.asarray(img.convert("RGB")))
            except (UnidentifiedImageError, OSError):
                raise WireError(f"{field}.data[{i}]", "is not a PNG file") from None
            if arrays[-1].shape != arrays[0].shape:
                raise WireError(f"{field}.data[{i}]", f"is {arrays[-1].shape[1]}x{arrays[-1].shape[0]}, the first "
                                                      f"image {arrays[0].shape[1]}x{arrays[0].shape[0]}: one size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    raise WireError(f"{field}.format", f"{kind!r} is not 'raw' or 'png'")


def _b64(text: Any, field: str) -> bytes:
    if not isinstance(text, str):
        raise WireError(field, "must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(field, "is not valid base64") from None


# --------------------------------------------------------------------------------------------------
# requests and answers


class ScoreRequest(NamedTuple):
    """A checked POST /score body."""

    labels: list[str]
    images: torch.Tensor  # [B, 3, H, W] or [B, F, 3, H, W], float32 in [0, 1]
    prompts: list[str]
    seeds: list[int] | None
    inputs: torch.Tensor | None  # [B, 3, H', W'], float32 in [0, 1]


def score_request(labels: list[str], images: torch.Tensor, prompts: list[str], seeds: list[int] | None,
                  encoding: str, inputs: torch.Tensor | None = None) -> dict[str, Any]:
    """The body of POST /score; `inputs` [B, 3, H, W] travel in the images' encoding."""
    body = {"rewards": list(labels), "prompts": list(prompts), "images": encode_images(images, encoding)}
    if seeds is not None:
        body["seeds"] = [int(s) for s in seeds]
    if inputs is not None:
        body["inputs"] = encode_images(inputs, encoding)
    return body


def read_request(body: Any, hosted: list[str], takes_inputs: Sequence[str] = ()) -> ScoreRequest:
    """A POST /score body -> ScoreRequest, every field checked against the labels the server hosts (`takes_inputs`:
    those that need the inputs). Raises WireError naming the field."""
    if not isinstance(body, dict):
        raise WireError("body", "must be a JSON object {rewards, prompts, images[, seeds][, inputs]}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise WireError(unknown[0], f"is not a field of a score request ({', '.join(FIELDS)})")
    labels = body.get("rewards")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise WireError("rewards", f"must be a non-empty list of reward labels; this server hosts {hosted}")
    for label in labels:
        if label not in hosted:
            raise WireError("rewards", f"{label!r} is not hosted here; this server hosts {hosted}")
    if len(set(labels)) != len(labels):
        raise WireError("rewards", "names a reward twice")
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireError("prompts", "must be a list of strings, one per image")
    images = decode_images(body.get("images"))
    if images.shape[0] != len(prompts):
        raise WireError("prompts", f"has {len(prompts)} entries for {images.shape[0]} images")
    seeds = body.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or len(seeds) != len(prompts) or
                              not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise WireError("seeds", f"must be a list of {len(prompts)} integers, one per image")
    inputs = None
    if body.get("inputs") is not None:
        inputs = decode_images(body["inputs"], "inputs")
        if inputs.dim() != 4 or inputs.shape[0] != len(prompts):
            raise WireError("inputs", f"must be {len(prompts)} input images [B, 3, H, W], one per image; got shape "
                                      f"{list(inputs.shape)}")
    else:
        needing = [label for label in labels if label in takes_inputs]
        if needing:
            raise WireError("inputs", f"is missing: {needing[0]!r} compares each image with its input image (an edit's "
                                      f"source, a video's first frame); send the input images, or ask for other "
                                      f"rewards")
    return ScoreRequest(labels, images, prompts, seeds, inputs)


def score_answer(scores: dict[str, list[float]], errors: dict[str, list[str | None]]) -> dict[str, Any]:
    """The body of a 200 answer: a non-finite score becomes null with its error."""
    out_scores, out_errors = {}, {}
    for label, values in scores.items():
        out_scores[label], out_errors[label] = [], []
        for value, error in zip(values, errors[label]):
            finite = error is None and math.isfinite(value)
            out_scores[label].append(float(value) if finite else None)
            out_errors[label].append(None if finite else error or f"the reward scored it {value}")
    return {"scores": out_scores, "errors": out_errors}


def read_answer(body: Any, labels: list[str], count: int) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """A 200 answer -> ({label: [count] float32, NaN where null}, {label: first per-image error or None}).
    Raises WireError when it lacks a reward asked for or has another number of scores."""
    if not isinstance(body, dict) or not isinstance(body.get("scores"), dict):
        raise WireError("scores", "the answer has no scores object")
    errors = body.get("errors") if isinstance(body.get("errors"), dict) else {}
    scores, first_errors = {}, {}
    for label in labels:
        values = body["scores"].get(label)
        if not isinstance(values, list):
            raise WireError(f"scores.{label}", "is missing from the answer")
        if len(values) != count:
            raise WireError(f"scores.{label}", f"has {len(values)} scores for {count} images")
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            raise WireError(f"scores.{label}", "holds something other than numbers and nulls")
        scores[label] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
        reasons = [e for e in (errors.get(label) or []) if isinstance(e, str)]
        nulls = sum(v is None for v in values)
        first_errors[label] = (f"{nulls} of {count} images unscored; first: {reasons[0] if reasons else 'no reason'}"
                               if nulls else None)
    return scores, first_errors
