"""Atomic training checkpoints.

A checkpoint is a directory `<run>/checkpoints/iter_NNNNNN/` holding
    model.safetensors   trainable weights (the full denoiser, or only the LoRA weights)
    ema.safetensors     EMA of the trainable weights (when EMA is on)
    sampler.safetensors the soft copy that rolls out (forward-process objectives with matching.sampler_decay > 0)
    optimizer.pt        optimizer and LR-scheduler state
    state.json          iteration, config fingerprint
    COMPLETE            written last
It is written under a temporary name and renamed into place, so a crash (even kill -9) in the middle of a
save never leaves a directory that `latest_checkpoint` would pick up; the next process to take the run
directory deletes such leftovers (`mixgrpo.rundir.sweep_temporaries`).

The sharded format (`save_sharded_checkpoint`, for models too large to gather on one rank) replaces
model / ema / optimizer files by `dcp/`, a torch.distributed.checkpoint directory in which every rank
writes its own shards; DCP reshards on load, so a run may resume with another world size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mixgrpo.errors import UserError
from mixgrpo.fileio import as_os_error

MARKER = "COMPLETE"
WEIGHT_COPIES = ("ema", "sampler")
"""Named copies of the trainable weights a checkpoint may hold beside the weights themselves."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or from another configuration."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(run_dir: str | Path, iteration: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], state: dict[str, Any],
                    copies: dict[str, dict[str, torch.Tensor]] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `iteration` atomically; keep the newest `keep` complete checkpoints. copies: named
    copies of the trainable weights ("ema", "sampler"), each written to NAME.safetensors."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-iter_{iteration:06d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_contiguous(model_state), tmp / "model.safetensors")
        for name, weights in (copies or {}).items():
            save_file(_contiguous(weights), tmp / f"{name}.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "iteration": iteration}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        (tmp / MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same iteration after a resume: replace it
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except Exception as e:  # OSError, and what libraries raise for I/O errors (SafetensorError, torch's RuntimeError)
        raise _save_failed(e, final, tmp) from e
    for old in complete_checkpoints(run_dir)[:-keep]:
        _remove(old)
    return final


def _save_failed(e: Exception, final: Path, tmp: Path) -> CheckpointError:
    """The error for a failed save, after deleting its temporary directory. The reason is read first: deleting
    the partly written files frees the space that tells a full disk from another short write."""
    err = as_os_error(e, tmp)
    reason = (err.strerror or str(err)) if err is not None else f"{type(e).__name__}: {e}"
    shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointError(f"could not write checkpoint {final}: {reason}. The previous checkpoint is intact; "
                           f"free disk space or fix the permissions of {final.parent}, then resume")


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint, marker first: a deletion cut short leaves a directory that is never picked up."""
    (checkpoint / MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and unmarked directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("iter_*") if p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run that are not complete, oldest first: iter_N without COMPLETE (a deletion or
    copy cut short) and .tmp-iter_* (a save under way, or killed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in (*root.glob("iter_*"), *root.glob(".tmp-iter_*")) if p.is_dir() and not (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name.removeprefix(".tmp-"))


def describe_checkpoints(run_dir: str | Path) -> str:
    """What a run directory holds in checkpoints/, for a message: "checkpoints iter_000002, iter_000004",
    "no complete checkpoint (only incomplete ones: iter_000003 without COMPLETE)", or "no checkpoint"."""
    complete = complete_checkpoints(run_dir)
    if complete:
        return f"checkpoint{'s' * (len(complete) > 1)} {', '.join(p.name for p in complete)}"
    incomplete = incomplete_checkpoints(run_dir)
    if incomplete:
        return (f"no complete checkpoint (only incomplete ones, from saves that were interrupted or are under way: "
                f"{', '.join(p.name for p in incomplete)})")
    return "no checkpoint"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(path: str | Path) -> dict[str, Any]:
    """state.json of a checkpoint (iteration, config fingerprint), without loading any weights."""
    path = Path(path)
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted (state.json: {e}); delete it to resume from the "
                              f"previous one") from None


def _require_complete(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointRotated(f"checkpoint {path} no longer exists: the run training into {path.parent.parent} "
                                f"keeps only its newest checkpoints (run.keep_checkpoints) and rotated this one away; "
                                f"name a newer one, or leave out the checkpoint to take the newest")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker): its save was interrupted, "
                              f"or its deletion is under way; use a complete one (the newest: {_newest_name(path)})")


def _newest_name(path: Path) -> str:
    latest = latest_checkpoint(path.parent.parent)
    return latest.name if latest is not None else "none yet"


class CheckpointRotated(CheckpointError):
    """A checkpoint was deleted while it was read: the run still training into its directory rotated it away
    (run.keep_checkpoints)."""


def read_weights(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The trainable weights of a full checkpoint (its EMA weights when it has them and `ema`), read into memory
    at once, without the optimizer state. A reader (export, sample) reads them before it builds the base model, so
    that a run still training into the directory, which deletes all but its newest `run.keep_checkpoints`, can only
    take the checkpoint away during this read, and that is then said (CheckpointRotated)."""
    path = Path(path)
    _require_complete(path)
    try:
        name = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
        return load_file(path / name)
    except Exception as e:  # noqa: BLE001  (any read failure: a deletion under way, or corruption)
        if not (path / MARKER).is_file():  # deleted marker first (`_remove`): rotated away while read
            raise CheckpointRotated(f"checkpoint {path} was deleted while it was read: the run training into "
                                    f"{path.parent.parent} keeps only its newest checkpoints (run.keep_checkpoints) and "
                                    f"rotated this one away; name a newer one, or leave out the checkpoint to take "
                                    f"the newest") from None
        raise CheckpointError(f"checkpoint {path} is corrupted ({type(e).__name__}: {e}); delete it and use the "
                              f"previous one") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint directory: {"model", "ema" (or None), "sampler" (or None), "optimizer", "state"}."""
    path = Path(path)
    _require_complete(path)
    try:
        model = load_file(path / "model.safetensors")
        copies = {name: load_file(path / f"{name}.safetensors") if (path / f"{name}.safetensors").exists() else None
                  for name in WEIGHT_COPIES}
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        state = json.loads((path / "state.json").read_text())
    except Exception as e:  # any decoding failure means corruption
        raise CheckpointError(f"checkpoint {path} is corrupted ({type(e).__name__}: {e}); delete it to "
                              f"resume from the previous one") from None
    return {"model": model, **copies, "optimizer": optimizer, "state": state}


def save_sharded_checkpoint(run_dir: str | Path, iteration: int, app_state: dict[str, Any], state: dict[str, Any],
                            keep: int = 2) -> Path:
    """Write checkpoint `iteration` in the sharded format; a collective: every rank calls it.

    app_state: what `torch.distributed.checkpoint.save` takes (tensors, DTensors, nested dicts, picklable
    values). Every rank writes its shards to `dcp/` in a temporary directory (the same path on every rank: the
    run directory must be on a filesystem all nodes share); then rank 0 writes state.json and COMPLETE and
    renames the directory into place.
    """
    import torch.distributed.checkpoint as dcp

    from mixgrpo import dist

    root = Path(run_dir) / "checkpoints"
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-iter_{iteration:06d}-sharded"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(app_state, checkpoint_id=tmp / "dcp")
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        try:
            (tmp / "state.json").write_text(json.dumps({**state, "iteration": iteration}, indent=1))
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
            (tmp / MARKER).write_text("ok\n")
            _fsync_dir(tmp)
            if final.exists():
                _remove(final)
            os.rename(tmp, final)
            _fsync_dir(root)
        except OSError as e:
            raise _save_failed(e, final, tmp) from e
        for old in complete_checkpoints(run_dir)[:-keep]:
            _remove(old)
    dist.barrier()
    return final


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def load_sharded_checkpoint(path: str | Path, app_state: dict[str, Any]) -> dict[str, Any]:
    """Load a sharded checkpoint in place into `app_state` (the structure it was saved from, built for the
    current world size and strategy: DCP reshards); returns state.json. Every rank calls it."""
    path = Path(path)
    _require_complete(path)
    try:
        dcp_load(app_state, path)
        return json.loads((path / "state.json").read_text())
    except Exception as e:  # any read failure means corruption or another model
        raise CheckpointError(f"sharded checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); it is "
                              f"corrupted or from another model configuration") from None


def dcp_load(state: dict[str, Any], path: str | Path) -> None:
    """torch.distributed.checkpoint.load of checkpoint `path`'s dcp/ into `state`, in place. In one process DCP
    warns that it is "assuming the intent is to load in a single process": it is (a resume or an export on
    fewer ranks), so the warning is silenced."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=Path(path) / "dcp")
