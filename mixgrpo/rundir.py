"""The run directory: who owns it, what it holds, and what a new launch may rewrite.

    RUN/.lock           flock-ed by the one process training into RUN (its pid, host and start time inside)
    RUN/config.yaml     the run's configuration (rewritten by every launch)
    RUN/metrics.jsonl   one record per iteration; eval.jsonl: one per evaluation
    RUN/checkpoints/    iter_NNNNNN/ (mixgrpo.checkpoint); final/, summary.md, reward_curve.png: the results

The records are JSON lines with an "iteration"; a launch rewrites config.yaml and keeps the records its
checkpoint covers, every later record is appended: `RunRecords`, which a training launch holds on every rank
and which writes on rank 0 only.

Every `train` goes through `claim` before it writes anything: it takes the lock (a second process on the same
directory stops at once, naming the holder), refuses to start a new run over the results of an earlier one,
and deletes what killed processes left behind (half-written checkpoints and exports): with the lock held, the
owners of those files are dead. The lock is `fcntl.flock` on RUN/.lock, held for the whole run; the kernel
releases it when the process ends in any way (kill -9 included), so it never goes stale. Under torchrun rank 0
takes it for the job and every rank learns the outcome (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from mixgrpo import dist
from mixgrpo.checkpoint import incomplete_checkpoints, latest_checkpoint
from mixgrpo.config import ConfigError, TrainConfig, save_config
from mixgrpo.fileio import atomic_file, writing

LOCK_FILE = ".lock"
CONFIG, METRICS, EVALS, SUMMARY, FINAL = "config.yaml", "metrics.jsonl", "eval.jsonl", "summary.md", "final"
# what a killed process leaves: checkpoints in the making, atomic_directory's temporaries (final/ and anything
# else written through it), files rewritten through a temporary name (config.yaml, metrics.jsonl, eval.jsonl,
# PNGs). pathlib's glob matches names that start with a dot too.
TEMPORARIES = ("checkpoints/.tmp-*", ".*.tmp-*", ".*.old-*", "*.tmp")


class RunLock:
    """An exclusive, non-blocking flock on RUN/.lock for as long as it is held. Locks belong to an open file
    description, so a second lock on the same directory fails even within one process."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            raise ConfigError(f"run directory {self.path.parent} is in use by {_describe_holder(holder)}: wait for "
                              f"that run to end (or stop it), or choose another out_dir") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: a file system without locks (some network mounts)
            os.close(fd)
            dist.print0(f"warning: cannot lock {self.path} ({e.strerror}): nothing stops a second run from writing "
                        f"into {self.path.parent}; make sure only one uses it")
            return
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with writing(self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # no stale holder for a reader that takes the next holder's place
        os.close(self._fd)  # closing the last descriptor releases the lock
        self._fd = None


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']} (started {h['started']})"
    except (ValueError, KeyError, TypeError):  # the holder has locked but not yet written its name
        return "another process (it is just starting)"


def count_records(path: Path) -> int:
    """Complete JSON lines of a metrics.jsonl / eval.jsonl (0 when the file is missing)."""
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip().endswith("}"))


def results(run_dir: Path) -> list[str]:
    """What a new run in `run_dir` would overwrite or empty, besides checkpoints: its final model, logged
    records and summary ("final/", "metrics.jsonl (6 records)", ...)."""
    found = [name for name in (f"{FINAL}/", SUMMARY) if (run_dir / name.rstrip("/")).exists()]
    for name in (METRICS, EVALS):
        n = count_records(run_dir / name)
        if n:
            found.append(f"{name} ({n} record{'s' * (n > 1)})")
    return found


def keep_records_before(path: Path, iteration: int) -> None:
    """Keep the records of a metrics.jsonl / eval.jsonl with "iteration" < `iteration`, in increasing order
    (a line cut short by a crash, and repeats of an iteration, are dropped), rewritten atomically.

    Truncating by iteration, not by a line count, keeps every iteration the resumed checkpoint covers even
    when the file holds more or fewer lines than that checkpoint saw."""
    if not path.exists():
        return
    keep, last = [], -1
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            it = json.loads(line)["iteration"]
        except (ValueError, KeyError, TypeError):  # blank, or cut short by a crash mid-write
            continue
        if last < it < iteration:
            keep.append(line if line.endswith("\n") else line + "\n")
            last = it
    with atomic_file(path) as tmp:
        tmp.write_text("".join(keep), encoding="utf-8")


class RunRecords:
    """The run directory's records as a training launch writes them: config.yaml, metrics.jsonl, eval.jsonl.
    Every rank holds one; off rank 0 it writes nothing.

    Opening it for a launch that starts at iteration `start` (0, or its checkpoint's) writes the launch's
    config.yaml and keeps the records the checkpoint covers: metrics up to `start` and, since a checkpoint at N is
    written after N's evaluation, the evaluations up to `start` (none on a fresh start)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start: int):
        self.run_dir, self.active = run_dir, dist.is_main()
        if self.active:
            save_config(cfg, run_dir / CONFIG)
            keep_records_before(run_dir / METRICS, start + 1)
            keep_records_before(run_dir / EVALS, start + 1 if start else 0)

    def metrics(self, record: dict[str, Any]) -> None:
        """One iteration's line of metrics.jsonl."""
        if self.active:
            append_record(self.run_dir / METRICS, record)

    def evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        """The evaluation at `iteration` in eval.jsonl (`record_eval`)."""
        if self.active:
            record_eval(self.run_dir, iteration, metrics)


def append_record(path: Path, record: dict[str, Any]) -> None:
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def record_eval(run_dir: Path, iteration: int, metrics: dict[str, float]) -> None:
    """Write the evaluation at `iteration`, replacing any row at or after it (a run killed between its last
    evaluation and the export evaluates again on resume), so eval.jsonl holds one row per iteration."""
    keep_records_before(run_dir / EVALS, iteration)
    append_record(run_dir / EVALS, {"iteration": iteration, **metrics})


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl / eval.jsonl ([] when missing); a line cut short by a crash is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # blank, or cut short by a crash mid-write
            pass
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """One record per iteration of the run in `run_dir` (metrics.jsonl)."""
    return read_records(Path(run_dir) / METRICS)


def sweep_temporaries(run_dir: Path) -> None:
    """Delete the temporary files and directories of processes that died writing into `run_dir` (a caller
    that holds the lock knows their owners are dead): a killed checkpoint save or export can be tens of GB."""
    removed = []
    for pattern in TEMPORARIES:
        for p in run_dir.glob(pattern):
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(str(p.relative_to(run_dir)))
    if removed:
        dist.print0(f"note: removed what an interrupted process left in {run_dir}: {', '.join(sorted(removed))}")


def _check_start(run_dir: Path, resume: bool) -> None:
    """Refuse to start over the results of an earlier run: only --resume continues one, from a checkpoint."""
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        if not resume:
            raise ConfigError(f"{run_dir} already holds checkpoints ({latest.name}): pass --resume to continue "
                              f"that run, or choose another out_dir")
        return
    found = results(run_dir)
    finished = any(f in found for f in (f"{FINAL}/", SUMMARY))
    if found and (finished or not resume):
        incomplete = [p.name for p in incomplete_checkpoints(run_dir)]
        lost = (f"whose checkpoints are all incomplete ({', '.join(incomplete)}: saves that were interrupted)"
                if incomplete else "whose checkpoints were deleted")
        what = f"a finished run {lost}" if finished else "the records of an earlier run"
        never = "it has no complete checkpoint" if incomplete else "it never reached a checkpoint"
        fix = "" if finished else f" (or pass --resume to start that run over: {never})"
        raise ConfigError(f"{run_dir} holds {what} ({', '.join(found)}) and no checkpoint to continue from: "
                          f"choose another out_dir, or move those files away{fix}")
    if resume:  # the first launch of a job that always passes --resume
        dist.print0(f"--resume: no complete checkpoint in {run_dir}; starting a new run")


@contextlib.contextmanager
def claim(run_dir: str | Path, resume: bool) -> Iterator[Path]:
    """Own `run_dir` for the duration of a run: lock it, check that this launch may write there, sweep what dead
    processes left. A collective: every rank enters; rank 0 does the work and every rank raises if it fails."""
    run_dir = Path(run_dir)
    lock, error = None, None
    if dist.is_main():
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise ConfigError(f"out_dir {str(run_dir)!r} is a file, not a directory: choose another out_dir")
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
            lock.acquire()
            _check_start(run_dir, resume)
            sweep_temporaries(run_dir)
        except BaseException as e:
            if lock is not None:
                lock.release()
            error = e
    if dist.world_size() > 1:  # every rank stops when rank 0 may not write here
        failed = dist.all_reduce_mean(torch.tensor([float(error is not None)], device=dist.device())).item() > 0
        if failed and error is None:
            raise ConfigError(f"rank 0 may not train into {run_dir}: its error message says why")
    if error is not None:
        raise error
    try:
        yield run_dir
    finally:
        if lock is not None:
            lock.release()

