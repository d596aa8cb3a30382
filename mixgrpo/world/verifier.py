"""The programmatic verifier of the shapes world (GenEval-style): does an image show what its prompt says?

Pipeline, batched over images (numpy + scipy.ndimage, no weights):
1. Colour segmentation (`_segment`): a pixel belongs to the object colour c whose background-to-c segment
   bg + a (c - bg), a in [0, 1], passes nearest to it, when that distance is below COLOR_RADIUS and a >= 1/2.
   Blurry or anti-aliased edges are blends with the background, so a shape keeps its 50% outline; pixels far
   from every segment (e.g. noise, a blend of two object colours) belong to nobody.
2. Objects: 8-connected components of each colour, at least MIN_AREA of the image (specks are ignored).
3. Shape: from the component's bounding box. An apex-up triangle puts 3/4 of its area in the lower half of
   its box (circles and squares 1/2). A square fills the corners of its box, a circle leaves them empty
   (corners: |u| + |v| > 1.5 in box coordinates u, v in [-1, 1]); a square fills its box (fill 1), a circle
   pi/4 = 0.785. Elongated, sparse or contradictory components are "unknown" shapes.
4. Requirements of a scene (see docs/world.md): per object, present (>= 1 detection of its colour and shape)
   and count (exactly `count`); the relation between the two objects' box centres (`relation_holds`);
   no extra objects (every detection is of a colour-shape the prompt names).
   strict = all requirements met, dense = fraction met.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from mixgrpo.world.scene import BACKGROUND, COLORS, SHAPES, Scene, relation_holds

COLOR_RADIUS = 0.3
"""Largest RGB distance ([0, 1] units) from a pixel to the background-to-colour segment of its colour; half
the smallest distance between two object colours (red-yellow, 0.67) is 0.33."""
MIN_AREA = 20 / 1024
"""Smallest component counted as an object, as a fraction of the image (20 px at 32 x 32; the smallest
rendered object, a triangle of half-size 5 px, covers about 50)."""
TRIANGLE_LOWER_HALF = 0.62
"""A component with at least this fraction of its area in the lower half of its box is a triangle."""
SQUARE_CORNERS = 0.5
"""A non-triangle covering at least this fraction of its box's corners (|u| + |v| > 1.5) is a square, else a
circle: the fill ratio alone confuses a rasterised 11 px circle (fill up to 0.9) with a square."""
SQUARE_FILL = 0.8
"""Squares fill at least this fraction of their box (exactly 1 when rendered)."""
CIRCLE_FILL = 0.6
"""Circles fill at least this fraction of their box (0.69 to 0.90 when rendered at 32 x 32)."""
MIN_FILL = 0.35
"""Triangles fill at least this fraction of their box (0.50 to 0.60 when rendered)."""
MAX_ASPECT = 1.5
"""Components whose box is more elongated than this (width / height or height / width) are "unknown":
all shapes of the world fit a square box, two merged objects do not."""


@dataclass(frozen=True)
class Detection:
    """One object found in an image: its colour, shape (one of SHAPES or "unknown"), box centre (x, y) in
    pixels (y grows downward) and area in pixels."""

    color: str
    shape: str
    x: float
    y: float
    area: int


@dataclass(frozen=True)
class VerifierResult:
    """strict [B]: 1.0 when every requirement of the prompt is met, else 0.0; dense [B]: fraction met."""

    strict: torch.Tensor
    dense: torch.Tensor


_LEVELS = 64
"""Pixels are classified through a lookup table over RGB quantised to 64 levels per channel (bins of 1/64,
small against COLOR_RADIUS): one gather per pixel instead of K distance computations."""


def _segment(rgb: np.ndarray) -> np.ndarray:
    """Colour owner of RGB values [..., 3] in [0, 1]: index into COLORS, or -1 for background / nobody.

    With p = rgb - bg and d_k = c_k - bg, a_k = clamp(p.d_k / |d_k|^2, 0, 1) locates p along the segment
    bg + a d_k and |p - a_k d_k| is its distance to it; the owner is the nearest segment when that distance
    is below COLOR_RADIUS and a_k >= 1/2.
    """
    background = np.array(BACKGROUND, dtype=np.float64) / 255.0
    direction = np.array(list(COLORS.values()), dtype=np.float64) / 255.0 - background  # [K, 3]
    p = rgb[..., None, :] - background  # [..., 1, 3]
    a = np.clip((p * direction).sum(-1) / (direction * direction).sum(-1), 0.0, 1.0)  # [..., K]
    dist = np.linalg.norm(p - a[..., None] * direction, axis=-1)  # [..., K]
    k = dist.argmin(-1)
    ok = (np.take_along_axis(dist, k[..., None], -1)[..., 0] < COLOR_RADIUS) & (
        np.take_along_axis(a, k[..., None], -1)[..., 0] >= 0.5)
    return np.where(ok, k, -1)


@functools.lru_cache(maxsize=1)
def _owner_table() -> np.ndarray:
    """_segment at the centres of the quantisation bins: [_LEVELS ** 3] int8, indexed by (r * L + g) * L + b."""
    centres = (np.arange(_LEVELS) + 0.5) / _LEVELS
    rgb = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1).reshape(-1, 3)
    return _segment(rgb).astype(np.int8)


_COLOR_NAMES = list(COLORS)
_PLANE_ONLY = np.zeros((3, 3, 3), dtype=bool)
_PLANE_ONLY[1] = True  # 8-connectivity inside a [H, W] plane, none across the stacked planes


def _classify(fill: np.ndarray, lower_half: np.ndarray, corners: np.ndarray, aspect: np.ndarray) -> np.ndarray:
    """Shape index per component ([n] int: 0 circle, 1 square, 2 triangle, 3 unknown) from its box fill
    ratio, the fraction of its area in the lower half of its box, the fraction of the box corners it covers,
    and its box aspect max(w/h, h/w)."""
    triangle = (lower_half >= TRIANGLE_LOWER_HALF) & (fill >= MIN_FILL)
    square = ~triangle & (lower_half < TRIANGLE_LOWER_HALF) & (corners >= SQUARE_CORNERS) & (fill >= SQUARE_FILL)
    circle = (lower_half < TRIANGLE_LOWER_HALF) & (corners < SQUARE_CORNERS) & (fill >= CIRCLE_FILL)
    shape = np.select([triangle, square, circle], [2, 1, 0], default=3)
    return np.where(aspect > MAX_ASPECT, 3, shape)


@functools.lru_cache(maxsize=None)
def _corner_pixels(w: int, h: int) -> int:
    """Number of pixels of a w x h box whose centres lie in its corners, |u| + |v| > 1.5."""
    u = (np.arange(w) + 0.5) / (w / 2) - 1
    v = (np.arange(h) + 0.5) / (h / 2) - 1
    return max(int((np.abs(u)[None, :] + np.abs(v)[:, None] > 1.5).sum()), 1)


@dataclass(frozen=True)
class Components:
    """The colour components of a batch of images, before the MIN_AREA filter and shape classification.

    labels: [B, K, H, W] int, component id + 1 of each pixel in the plane of its owner colour (0 = none);
    image, color: [n] int, the image and colour index (into COLORS) of each component; area: [n] pixels;
    box: [n, 4] int (y0, y1, x0, x1), half-open.
    """

    labels: np.ndarray
    image: np.ndarray
    color: np.ndarray
    area: np.ndarray
    box: np.ndarray


def components(images: torch.Tensor) -> Components:
    """8-connected components of each object colour (step 1 and 2 of the module docstring, without the
    MIN_AREA filter). images: [B, 3, H, W] float in [0, 1] (any device)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float32).clamp(0, 1).numpy()  # [B, 3, H, W]
    B, _, H, W = x.shape
    K = len(_COLOR_NAMES)
    q = np.minimum((x * _LEVELS).astype(np.int64), _LEVELS - 1)  # [B, 3, H, W] quantised channels
    owner = _owner_table()[(q[:, 0] * _LEVELS + q[:, 1]) * _LEVELS + q[:, 2]]  # [B, H, W]
    planes = owner[:, None] == np.arange(K, dtype=np.int8)[None, :, None, None]  # [B, K, H, W]
    labels, n = ndimage.label(planes.reshape(B * K, H, W), structure=_PLANE_ONLY)
    boxes = np.array([(s[0].start, s[1].start, s[1].stop, s[2].start, s[2].stop)
                      for s in ndimage.find_objects(labels)], dtype=np.int64).reshape(n, 5)  # plane, y0, y1, x0, x1
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    return Components(labels.reshape(B, K, H, W), boxes[:, 0] // K, boxes[:, 0] % K, area, boxes[:, 1:])


def detect(images: torch.Tensor) -> list[list[Detection]]:
    """The objects in each image. images: [B, 3, H, W] float in [0, 1] (any device). Returns B lists."""
    comp = components(images)
    B, K, H, W = comp.labels.shape
    n = len(comp.area)
    if n == 0:
        return [[] for _ in range(B)]
    y0, y1, x0, x1 = comp.box.T
    flat = comp.labels.ravel()
    pix = np.flatnonzero(flat)
    lab = flat[pix] - 1  # [pixels] component of each foreground pixel
    py = (pix // W) % H + 0.5  # [pixels] pixel centres
    px = pix % W + 0.5
    area = comp.area.astype(np.float64)  # [n]
    cy = (y0 + y1) / 2.0
    # Lower-half area: pixels below the box centre line, half of a pixel row lying on it.
    below = (py > cy[lab]) + 0.5 * (py == cy[lab])
    lower_half = np.bincount(lab, weights=below, minlength=n) / area
    w, h = (x1 - x0).astype(np.float64), (y1 - y0).astype(np.float64)
    cx = (x0 + x1) / 2.0
    in_corner = np.abs(px - cx[lab]) / (w[lab] / 2) + np.abs(py - cy[lab]) / (h[lab] / 2) > 1.5
    corner_box = np.array([_corner_pixels(int(a), int(b)) for a, b in zip(x1 - x0, y1 - y0)])
    corners = np.bincount(lab, weights=in_corner, minlength=n) / corner_box
    shape = _classify(area / (w * h), lower_half, corners, np.maximum(w / h, h / w))
    keep = np.flatnonzero(area >= MIN_AREA * H * W)
    out: list[list[Detection]] = [[] for _ in range(B)]
    names = (*SHAPES, "unknown")
    for i in keep:
        out[int(comp.image[i])].append(Detection(_COLOR_NAMES[comp.color[i]], names[shape[i]], float(cx[i]),
                                                 float(cy[i]), int(area[i])))
    return out


def requirements(scene: Scene, detections: Sequence[Detection]) -> dict[str, bool]:
    """Each requirement of `scene` and whether `detections` meet it. Keys: "present: <colour> <shape>" and
    "count: <n> <colour> <shape>" per object, "relation: <relation>" when the scene has one, "no extras"."""
    found: dict[tuple[str, str], list[Detection]] = {}
    for d in detections:
        found.setdefault((d.color, d.shape), []).append(d)
    met: dict[str, bool] = {}
    for o in scene.objects:
        n = len(found.get((o.color, o.shape), []))
        met[f"present: {o.color} {o.shape}"] = n >= 1
        met[f"count: {o.count} {o.color} {o.shape}"] = n == o.count
    if scene.relation is not None:
        a, b = ([(d.x, d.y) for d in found.get((o.color, o.shape), [])] for o in scene.objects)
        met[f"relation: {scene.relation}"] = any(relation_holds(scene.relation, p, q) for p in a for q in b)
    named = {(o.color, o.shape) for o in scene.objects}
    met["no extras"] = all((d.color, d.shape) in named for d in detections)
    return met


def verify(images: torch.Tensor, scenes: Sequence[Scene]) -> VerifierResult:
    """Score images against their scenes. images: [B, 3, H, W] in [0, 1]; scenes: B scenes.

    strict_b = 1[all requirements met], dense_b = (requirements met) / (requirements), both [B] float32 CPU.
    """
    if len(scenes) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(scenes)} scenes; pass one scene per image")
    strict, dense = [], []
    for scene, dets in zip(scenes, detect(images)):
        met = list(requirements(scene, dets).values())
        strict.append(float(all(met)))
        dense.append(sum(met) / len(met))
    return VerifierResult(torch.tensor(strict, dtype=torch.float32), torch.tensor(dense, dtype=torch.float32))
