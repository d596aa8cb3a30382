"""Image files: grids of samples and simple line plots, with Pillow only (no matplotlib needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def _save_atomic(img: Image.Image, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1, pad: int = 1) -> None:
    """Save [N, 3, H, W] images in [0, 1] as one PNG grid, `nrow` images per row, upscaled by `scale`."""
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    hs, ws = h * scale, w * scale
    grid = Image.new("RGB", (ncol * (ws + pad) + pad, rows * (hs + pad) + pad), (255, 255, 255))
    for i in range(n):
        tile = to_pil(images[i])
        if scale != 1:
            tile = tile.resize((ws, hs), Image.NEAREST)
        grid.paste(tile, (pad + (i % ncol) * (ws + pad), pad + (i // ncol) * (hs + pad)))
    _save_atomic(grid, path)


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_lines(series: dict[str, Sequence[tuple[float, float]]], path: str | Path, title: str = "",
               xlabel: str = "", size: tuple[int, int] = (640, 400)) -> None:
    """Plot named (x, y) series as lines in one PNG, with axes ranges and a legend."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not points:
        draw.text((left, top), "no data", fill=(0, 0, 0))
        _save_atomic(img, path)
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1 = x1 if x1 > x0 else x0 + 1
    margin = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - margin, y1 + margin

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        _, py = to_px(x0, y)
        draw.text((4, py - 6), f"{y:.3g}", fill=(0, 0, 0))
        x = x0 + frac * (x1 - x0)
        px, _ = to_px(x, y0)
        draw.text((px - 10, height - bottom + 6), f"{x:.4g}", fill=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    draw.text((width // 2 - 20, height - 16), xlabel, fill=(0, 0, 0))
    for i, (name, s) in enumerate(series.items()):
        color = _PALETTE[i % len(_PALETTE)]
        pts = [to_px(x, y) for x, y in s if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        draw.text((left + 8, top + 6 + 14 * i), name, fill=color)
    _save_atomic(img, path)
