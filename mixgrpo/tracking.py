"""Experiment trackers beside metrics.jsonl: TensorBoard when installed, Weights & Biases when asked for.

metrics.jsonl stays the record of a run (resume truncates it to the checkpoint); trackers get a copy of
every numeric metric of every iteration (step = iteration) and of each evaluation, the sample grids of the
evaluations as images, and the resolved config (TensorBoard: a text entry; W&B: the run's config). Only
rank 0 tracks.

- TensorBoard (`run.tensorboard: true`, the default): event files in RUN/tensorboard. The `tensorboard` package is
  in the `tiny` and `models` extras; without it the pre-flight stops the run, naming the pip command (or set
  run.tensorboard=false).
- Weights & Biases (`run.wandb_project: NAME`): needs the `wandb` package and a login (or WANDB_MODE=offline).
  The W&B run id is kept in RUN/wandb_id, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import resource
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from mixgrpo import dist
from mixgrpo.errors import UserError
from mixgrpo.fileio import writing


class TrackingError(UserError, RuntimeError):
    """A tracker that was asked for cannot start."""


class Trackers:
    """The run's trackers; every rank holds one, and off rank 0 it tracks nothing (each method returns at once)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], tensorboard: bool, wandb_project: str):
        self._tb = None
        self._wandb = None
        if not dist.is_main():
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            self._tb_dir = run_dir / "tensorboard"
            with writing(self._tb_dir):
                self._tb = SummaryWriter(str(self._tb_dir))
                import yaml

                text = yaml.safe_dump(config, sort_keys=False)
                self._tb.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # a code block
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise TrackingError(f"run.wandb_project = {wandb_project!r} but the wandb package is not installed: "
                                    f"pip install wandb, or leave run.wandb_project empty") from None
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(project=wandb_project, name=run_dir.name, id=run_id, resume="allow",
                                     dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iteration", "time/unix")}
        if self._tb is not None:
            with writing(self._tb_dir):  # the writer thread's error (a full disk) comes back here
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
                self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_image(self, tag: str, path: str | Path, step: int) -> None:
        """A PNG file (a sample grid) as an image at `step`; an animated grid (GIF) as its first frame in TensorBoard
        (whose videos need moviepy) and as a video in W&B."""
        if self._tb is None and self._wandb is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:  # an animation opens at its first frame
            array = np.asarray(img.convert("RGB"))
        if self._tb is not None:
            with writing(self._tb_dir):
                self._tb.add_image(tag, array, step, dataformats="HWC")
                self._tb.flush()
        if self._wandb is not None:
            import wandb

            media = wandb.Video(str(path)) if Path(path).suffix in (".gif", ".mp4") else wandb.Image(array)
            self._wandb.log({tag: media}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            with writing(self._tb_dir):
                self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _quiet_tensorboard_thread() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails (a full disk): the
    exception also reaches the main thread at the next flush, where `Trackers.log` reports it with its path.
    Other threads' exceptions go to the previous hook."""
    previous = threading.excepthook
    if getattr(previous, "mixgrpo", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (type(args.thread).__module__.startswith("tensorboard.") and issubclass(args.exc_type, OSError)):
            previous(args)

    hook.mixgrpo = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def resource_metrics(device: torch.device) -> dict[str, float]:
    """What each metrics record carries besides the training numbers: "time/unix" (a timestamp, Unix seconds)
    and the peak memory of this process: on CUDA "memory/peak_allocated_gib", the most tensor memory allocated
    on its GPU since the previous call (which resets the peak); on the CPU "memory/peak_rss_gib", the process's
    resident high-water mark since it started (the OS keeps no resettable peak)."""
    out = {"time/unix": round(time.time(), 3)}
    if device.type == "cuda":
        out["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    else:
        out["memory/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return out
