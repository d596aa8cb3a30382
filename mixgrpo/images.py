"""Image and video files: samples, grids of samples captioned with their prompts (Pillow) and line plots
(matplotlib, headless).

A sample is an image [3, H, W] or a video [F, 3, H, W] (floats in [0, 1]); a batch adds a leading N. Every
function here takes both, so that the rest of the stack needs no video branch: images go to PNG files, videos to
animated files a person can open (GIF through Pillow, always available; MP4 through imageio with its ffmpeg
plugin: mixgrpo's `video` extra), at VIDEO_FPS frames per second. A video grid is an animation whose
frame f is the grid of every video's frame f."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from mixgrpo.errors import ConfigError
from mixgrpo.fileio import atomic_file

VIDEO_FPS = 16  # the frame rate diffusers' Wan examples export at (export_to_video(frames, fps=16))
VIDEO_SUFFIXES = (".gif", ".mp4")


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


class InputImageError(ConfigError):
    """An input image (of an editing or image-to-video example) cannot be used; the message names the fix."""


def load_input(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """An example's input image as [3, H, W] float in [0, 1] at `size` = (H, W), the size the model takes
    (`FlowModel.image_size`). An image of another size with the same aspect ratio (within 1%) is resized (Lanczos);
    another aspect ratio is refused: cropping or padding is the user's choice, not ours."""
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"input image {str(path)!r} does not exist: fix the path (relative paths in a prompt "
                              f"file are relative to its directory)")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise InputImageError(f"input image {str(path)!r} is not an image Pillow can read ({type(e).__name__}): give "
                              f"a PNG, JPEG or WebP file") from None
    h, w = size
    if (img.height, img.width) != (h, w):
        if abs(img.width / img.height - w / h) > 0.01 * (w / h):
            raise InputImageError(f"input image {str(path)!r} is {img.width}x{img.height} but the model takes "
                                  f"{w}x{h} (another aspect ratio): crop or pad it to {w}:{h}, or set the model's "
                                  f"resolution to its aspect ratio")
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    array = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return array.permute(2, 0, 1).float() / 255


def load_inputs(examples: Sequence, size: tuple[int, int]) -> list[tuple[torch.Tensor, ...]] | None:
    """The input images of `examples` (`mixgrpo.prompts.Example`) at `size`, one tuple per example (the `images`
    argument of `FlowModel.encode_prompts`), or None when they have none (text-to-image)."""
    if not any(e.images for e in examples):
        return None
    # read at every use, not kept: a PNG decodes in milliseconds, a cache of 1024^2 inputs would take gigabytes
    return [tuple(load_input(p, tuple(size)) for p in e.images) for e in examples]


def first_inputs(images: Sequence[tuple[torch.Tensor, ...]], size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W]: the first input image of each example, resized (bilinear) to `size` = (H, W) when it differs:
    what a reward that compares a result with its input (`takes_inputs`) gets."""
    first = torch.stack([t[0] for t in images])
    if tuple(first.shape[-2:]) != tuple(size):
        first = torch.nn.functional.interpolate(first, size=tuple(size), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
    return first


def is_video(samples: torch.Tensor, batched: bool = True) -> bool:
    """Whether `samples` are videos: [N, F, 3, H, W] (batched) or [F, 3, H, W], not images [N, 3, H, W] / [3, H, W]."""
    return samples.dim() == (5 if batched else 4)


def media_name(stem: str, samples: torch.Tensor, batched: bool = True, video: str = ".gif") -> str:
    """The file name of a sample (or a grid of `samples`): STEM.png for images, STEM + `video` (.gif or .mp4) for
    videos."""
    if video not in VIDEO_SUFFIXES:
        raise ValueError(f"a video is written as {' or '.join(VIDEO_SUFFIXES)}, not {video!r}")
    return stem + (video if is_video(samples, batched) else ".png")


def mp4_problem() -> str | None:
    """None when MP4 files can be written here; else the line that says what to install (checked before sampling,
    so that no sampled video is lost to a missing writer)."""
    from mixgrpo import packages

    absent = packages.missing(("imageio", "imageio_ffmpeg"))
    if not absent:
        return None
    return (f"MP4 files need imageio and its ffmpeg plugin: {packages.install_command(absent)} (or write .gif, which "
            f"needs nothing more)")


def _save_atomic(img: Image.Image | list[Image.Image], path: str | Path, fps: float = VIDEO_FPS) -> None:
    """An image (PNG) or a list of frames (GIF or MP4, by the suffix of `path`), written through a temporary name."""
    path = Path(path)
    if not isinstance(img, Image.Image) and path.suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: a video is written as {' or '.join(VIDEO_SUFFIXES)}, not {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        if isinstance(img, Image.Image):
            img.save(tmp, format="PNG")
        elif path.suffix == ".gif":  # duration in ms per frame; loop=0: forever
            img[0].save(tmp, format="GIF", save_all=True, append_images=img[1:], duration=round(1000 / fps), loop=0)
        else:
            _write_mp4(img, tmp, fps)


def _write_mp4(frames: list[Image.Image], path: Path, fps: float) -> None:
    problem = mp4_problem()
    if problem:
        raise ImportError(problem)
    import imageio.v3 as iio
    import numpy as np

    # libx264 with yuv420p needs even sides: imageio-ffmpeg would rescale silently, so pad by one pixel instead
    array = np.stack([np.asarray(f) for f in frames])
    h, w = array.shape[1:3]
    array = np.pad(array, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # -f mp4: ffmpeg would guess the container from the temporary file's name (.NAME.tmp)
    iio.imwrite(path, array, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1,
                output_params=["-f", "mp4"])


def save_media(sample: torch.Tensor, path: str | Path, fps: float = VIDEO_FPS) -> None:
    """One sample: an image [3, H, W] as PNG, or a video [F, 3, H, W] as an animation (GIF or MP4 by the suffix)."""
    if is_video(sample, batched=False):
        _save_atomic([to_pil(frame) for frame in sample], path, fps)
    else:
        _save_atomic(to_pil(sample), path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1, pad: int = 1,
              captions: Sequence[str] | None = None, fps: float = VIDEO_FPS) -> None:
    """Save images [N, 3, H, W] in [0, 1] as one PNG grid, `nrow` images per row, upscaled by `scale`; videos
    [N, F, 3, H, W] as an animated grid (GIF or MP4 by the suffix of `path`; `media_name` picks it).

    captions: one text per image (its prompt), written under it, wrapped to the tile's width (at most
    CAPTION_LINES lines, the rest elided); tiles are then upscaled to at least CAPTION_MIN_WIDTH pixels so that
    a caption line holds a few words.
    """
    if is_video(images):
        frames = [_grid(images[:, f], nrow, scale, pad, captions) for f in range(images.shape[1])]
        _save_atomic(frames, path, fps)
    else:
        _save_atomic(_grid(images, nrow, scale, pad, captions), path)


def _grid(images: torch.Tensor, nrow: int, scale: int, pad: int, captions: Sequence[str] | None) -> Image.Image:
    """The grid of images [N, 3, H, W] (see save_grid) as one PIL image."""
    n, _, h, w = images.shape
    if captions is not None:
        if len(captions) != n:
            raise ValueError(f"save_grid: {len(captions)} captions for {n} images")
        scale = max(scale, math.ceil(CAPTION_MIN_WIDTH / w))
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    hs, ws = h * scale, w * scale
    font = ImageFont.load_default(size=CAPTION_FONT_SIZE) if captions is not None else None
    lines = [_wrap(c, font, ws) for c in captions] if captions is not None else [[] for _ in range(n)]
    line_height = CAPTION_FONT_SIZE + 3
    text_h = max((len(t) for t in lines), default=0) * line_height + (2 if captions is not None else 0)
    cell_h = hs + text_h
    grid = Image.new("RGB", (ncol * (ws + pad) + pad, rows * (cell_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        tile = to_pil(images[i])
        if scale != 1:
            tile = tile.resize((ws, hs), Image.NEAREST)
        x, y = pad + (i % ncol) * (ws + pad), pad + (i // ncol) * (cell_h + pad)
        grid.paste(tile, (x, y))
        for k, line in enumerate(lines[i]):
            draw.text((x + 1, y + hs + 1 + k * line_height), line, fill=(0, 0, 0), font=font)
    return grid


CAPTION_LINES = 4
CAPTION_MIN_WIDTH = 128
CAPTION_FONT_SIZE = 11


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` to lines of at most `width` pixels; at most CAPTION_LINES, the last one
    ending in "..." when the text does not fit (a word longer than a line is cut)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width - 2 or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    lines = [_fit(t, font, width) for t in lines]
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = _fit(lines[-1] + " ...", font, width, ellipsis=True)
    return lines


def _fit(line: str, font, width: int, ellipsis: bool = False) -> str:
    """`line` cut to `width` pixels (ending in "..." when it was cut or `ellipsis`)."""
    if font.getlength(line) <= width - 2 and not (ellipsis and not line.endswith("...")):
        return line
    while line and font.getlength(line + "...") > width - 2:
        line = line[:-1]
    return line.rstrip(". ") + "..."


def _figure_saved(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


Series = Sequence[tuple[float, float]]


def plot_panels(panels: dict[str, dict[str, Series]], path: str | Path, xlabels: Sequence[str] = ("",),
                title: str = "", markers: dict[str, dict[str, Series]] | None = None,
                bands: dict[str, dict[str, list[tuple[float, float, float]]]] | None = None) -> None:
    """A grid of line plots in one PNG (matplotlib, no display needed): one row per panel name, one column
    per x axis. panels: row title -> series name -> (x, y) points; with several x labels, the series of a row
    are named "NAME@k" for column k. markers: the same layout, drawn as points (e.g. held-out evaluations
    over a training curve). bands: the same layout with (x, low, high) points, drawn as shaded areas (e.g. a
    reference's spread over seeds)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, cols = max(len(panels), 1), len(xlabels)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.6 * rows), squeeze=False)
    for r, (name, series) in enumerate(panels.items()):
        for c, xlabel in enumerate(xlabels):
            ax = axes[r][c]
            suffix = f"@{c}" if cols > 1 else ""
            for label, points in series.items():
                if cols > 1 and not label.endswith(suffix):
                    continue
                pts = [(x, y) for x, y in points if math.isfinite(y)]
                if pts:
                    ax.plot(*zip(*pts), label=label.removesuffix(suffix), linewidth=1.5)
            for label, points in ((bands or {}).get(name) or {}).items():
                if (cols > 1 and not label.endswith(suffix)) or not points:
                    continue
                xs, lows, highs = zip(*points)
                ax.fill_between(xs, lows, highs, alpha=0.25, color="grey", label=label.removesuffix(suffix))
            for label, points in ((markers or {}).get(name) or {}).items():
                if cols > 1 and not label.endswith(suffix):
                    continue
                pts = [(x, y) for x, y in points if math.isfinite(y)]
                if pts:
                    ax.plot(*zip(*pts), "o", label=label.removesuffix(suffix), markersize=4)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _figure_saved(fig, path)
    plt.close(fig)


def plot_lines(series: dict[str, Series], path: str | Path, title: str = "", xlabel: str = "") -> None:
    """Plot named (x, y) series as lines in one PNG, with a legend."""
    plot_panels({title: series}, path, xlabels=(xlabel,))
