"""Shape quality and colour purity: how well an image draws the objects its prompt asks for (weight-free).

The verifier (`mixgrpo.world.verifier`) answers yes or no per requirement; these scores are continuous, so a
model gets credit for every step towards a clean render.

`shape_quality(images, scenes)`, the geometry of what the prompt asks for, per image:
1. Objects are the verifier's colour components (`verifier.components`) of at least MIN_AREA pixels.
2. Each requested instance (colour c, shape s; an object of count n gives n instances) may be matched with
   one object of colour c. The match scores
       quality = IoU(object mask, ideal s)^2
   where the ideal s is drawn with the renderer's own geometry (circle of radius h, square of half-side h,
   apex-up triangle of base 2h and height 2h) centred on the object's centroid, h = half the longer box
   side within half a pixel (the best fit). The ideal is always the shape the prompt asks for at that
   colour: drawing an easier shape costs IoU (a square where a circle is asked 0.79, a square or circle
   where a triangle is asked 0.5 to 0.6; squared, 0.65 and 0.25 to 0.35), and so does an elongated blob (two
   merged objects) or a ragged outline. The square makes a wrong shape cost more than the model's lumpy
   attempts at the right one (IoU about 0.85).
3. Instances and objects of one colour are matched greedily by quality. The image scores
       sum of matched qualities / (requested instances + unmatched objects)
   so a missing instance and an extra object each count as a zero. A clean render of the prompt scores 1.

`color_purity(images)`, the texture: the mean over every object pixel of max(0, 1 - |rgb - c| / COLOR_RADIUS),
c the object's colour (0 for an image without objects). The renderer draws exact colours (purity 1); blur,
noise and speckle lower it. It does not look at the prompt: it is a guard against a model that learns its
shapes at the cost of their texture, not a reward to train on alone (an image of one clean blob scores 1).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mixgrpo.world.scene import COLORS, SHAPES, Scene
from mixgrpo.world.verifier import COLOR_RADIUS, MIN_AREA, components

_RGB = np.array(list(COLORS.values()), dtype=np.float64) / 255.0  # [K, 3]


HALF_SIZE_OFFSETS = (-0.5, -0.25, 0.0)
"""Pixels added to half the longer box side when fitting an ideal shape: a rasterised circle's box is up to
half a pixel wider than its diameter, and the best of these fits recovers it (clean circles score 0.98 on
average instead of 0.95). Never larger than the box, so a circle cannot fit a square better by growing."""


def _ideal_masks(box: np.ndarray, centroid: np.ndarray, H: int, W: int) -> np.ndarray:
    """[n, len(HALF_SIZE_OFFSETS), len(SHAPES), H, W] bool: each ideal shape fitted to each object, in the
    renderer's geometry (`mixgrpo.world.scene._rasterise`; a square has half-side h here).

    The half-size h is half the longer side of the box (y0, y1, x0, x1) plus each offset; the centre comes
    from the object's centroid [n, 2] (y, x), which rasterisation moves far less than the box: a circle's and
    a square's centroid is their centre, an apex-up triangle's lies h / 3 below it.
    """
    h = np.maximum(box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]).astype(np.float64)[:, None, None, None] / 2
    h = h + np.array(HALF_SIZE_OFFSETS)[:, None, None]  # [n, offsets, 1, 1]
    cy, cx = centroid[:, 0, None, None, None], centroid[:, 1, None, None, None]
    dy = (np.arange(H) + 0.5)[None, None, :, None] - cy  # [n, 1, H, 1]
    dx = (np.arange(W) + 0.5)[None, None, None, :] - cx  # [n, 1, 1, W]
    circle = dx * dx + dy * dy <= h * h
    square = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    dy_triangle = dy + h / 3  # relative to the centre of the triangle's box
    triangle = (dy_triangle <= h) & (np.abs(dx) <= (dy_triangle + h) / 2)
    return np.stack([circle, square, triangle], axis=2)


def _objects(images: torch.Tensor) -> tuple[list[list[tuple[str, np.ndarray]]], np.ndarray, np.ndarray]:
    """The objects of each image (components of at least MIN_AREA pixels, in component order) as (colour,
    IoU with the best-fitting ideal of each of SHAPES [len(SHAPES)]) per image, and per object its image
    index [n] and summed purity over its pixels and pixel count [n, 2]. images: [B, 3, H, W] in [0, 1]."""
    comp = components(images)
    B, K, H, W = comp.labels.shape
    keep = np.flatnonzero(comp.area >= MIN_AREA * H * W)
    out: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(B)]
    if keep.size == 0:
        return out, np.zeros(0, dtype=np.int64), np.zeros((0, 2))
    masks = comp.labels[comp.image[keep], comp.color[keep]] == (keep + 1)[:, None, None]  # [n, H, W]
    ys, xs = np.arange(H) + 0.5, np.arange(W) + 0.5
    area = masks.sum((1, 2))  # [n]
    centroid = np.stack([(masks * ys[None, :, None]).sum((1, 2)), (masks * xs[None, None, :]).sum((1, 2))], 1)
    ideal = _ideal_masks(comp.box[keep], centroid / area[:, None], H, W)  # [n, offsets, S, H, W]
    inter = (ideal & masks[:, None, None]).sum((3, 4))
    union = (ideal | masks[:, None, None]).sum((3, 4))
    iou = (inter / np.maximum(union, 1)).max(1)  # [n, S]: the best-fitting half-size per shape
    rgb = images.detach().to("cpu", torch.float64).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    dist = np.linalg.norm(rgb[comp.image[keep]] - _RGB[comp.color[keep]][:, None, None, :], axis=-1)  # [n, H, W]
    purity = (np.clip(1 - dist / COLOR_RADIUS, 0, 1) * masks).sum((1, 2))  # [n] summed over the object
    names = list(COLORS)
    for j, i in enumerate(keep):
        out[int(comp.image[i])].append((names[comp.color[i]], iou[j]))
    return out, comp.image[keep], np.stack([purity, area], 1)


def shape_quality(images: torch.Tensor, scenes: Sequence[Scene]) -> torch.Tensor:
    """Shape-quality score per image (module docstring), [B] float32 in [0, 1]. images: [B, 3, H, W]."""
    if len(scenes) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(scenes)} scenes; pass one scene per image")
    objects, _, _ = _objects(images)
    scores = []
    for scene, found in zip(scenes, objects):
        requested = [(o.color, SHAPES.index(o.shape)) for o in scene.objects for _ in range(o.count)]
        pairs = sorted(((iou[s] ** 2, i, j) for i, (c, s) in enumerate(requested)
                        for j, (color, iou) in enumerate(found) if color == c), reverse=True)
        used_instances, used_objects, total = set(), set(), 0.0
        for q, i, j in pairs:  # greedy: the best remaining pair of one colour first
            if i not in used_instances and j not in used_objects:
                used_instances.add(i)
                used_objects.add(j)
                total += float(q)
        scores.append(total / (len(requested) + len(found) - len(used_objects)))
    return torch.tensor(scores, dtype=torch.float32)


def color_purity(images: torch.Tensor) -> torch.Tensor:
    """Colour purity per image (module docstring), [B] float32 in [0, 1]. images: [B, 3, H, W]."""
    _, image, sums = _objects(images)
    totals = np.zeros((images.shape[0], 2))
    np.add.at(totals, image, sums)
    return torch.tensor(np.where(totals[:, 1] > 0, totals[:, 0] / np.maximum(totals[:, 1], 1), 0.0),
                        dtype=torch.float32)
