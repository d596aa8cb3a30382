"""Files: atomic writes of whole directories and single files (a crash or kill -9 never leaves a half-written
model, cache or record), and write failures reported as what they are (a full disk as ENOSPC, naming the path)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` (removed on error, `path` untouched).

    The directory is made world-readable (mkdtemp creates owner-only directories; models are meant to be shared).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_OWNER}-", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{_OWNER}-", dir=path.parent))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_OWNER = f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"
"""HOST-PID in the names of atomic_directory's temporaries, so that a later process knows whether their writer
is dead (`remove_dead_temporaries`)."""


def dead_temporaries(path: str | Path) -> list[Path]:
    """The temporaries that `atomic_directory(path)` left when its process was killed (kill -9, OOM, a node
    lost, a `timeout`): only those of a process on this host that no longer runs. A live writer, or one on
    another host of a shared file system, keeps its own."""
    path = Path(path)
    dead = []
    for kind in ("tmp", "old"):
        prefix = f".{path.name}.{kind}-"
        for p in sorted(path.parent.glob(f"{prefix}*")):
            host, _, pid = p.name[len(prefix):].rsplit("-", 1)[0].rpartition("-")
            if host == _OWNER.rpartition("-")[0] and pid.isdigit() and not _alive(int(pid)):
                dead.append(p)
    return dead


def remove_dead_temporaries(path: str | Path) -> list[Path]:
    """Delete `dead_temporaries(path)`: tens of GB for a full FLUX export or a large embedding cache. Returns
    what was deleted."""
    removed = dead_temporaries(path)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


FULL_BELOW = 1 << 20
"""A file system with less free space than this (bytes) counts as full when a write fails for a reason the
library does not name: torch.save's "[enforce fail at inline_container.cc] ... unexpected pos" is a short write."""

_ERRNO_IN_TEXT = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) quote an errno


def disk_full(path: str | Path) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has under FULL_BELOW bytes free."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW


def as_os_error(e: BaseException, path: str | Path) -> OSError | None:
    """The OSError behind a failed write of `path`, naming a path; None when `e` is not an I/O failure.

    OSError without a file name (a failed write() or flush()) gets `path`. safetensors' SafetensorError quotes
    the errno in its text ("... (os error 28)"); torch.save's short-write RuntimeError names none: it is ENOSPC
    when the disk is full, EIO otherwise. Call it before deleting a partly written file (that frees the space)."""
    from safetensors import SafetensorError

    if isinstance(e, OSError):
        return e if e.filename else OSError(e.errno, e.strerror or str(e), str(path))
    text = str(e)
    torch_write = isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)
    if not (isinstance(e, SafetensorError) or torch_write):
        return None
    found = _ERRNO_IN_TEXT.search(text)
    code = int(found.group(1)) if found else errno.ENOSPC if disk_full(path) else errno.EIO
    return OSError(code, os.strerror(code), str(path))


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Report any failure to write `path` inside the block as an OSError naming a path (see `as_os_error`), so
    that the command line says e.g. `No space left on device (RUN/metrics.jsonl): free disk space`."""
    try:
        yield
    except Exception as e:
        err = as_os_error(e, path)
        if err is None or err is e:
            raise
        raise err from e


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield the temporary sibling name .NAME.tmp to write; on success it replaces `path`, so a kill mid-write
    leaves the previous file. A failure to write is named by `path` (`writing`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        yield tmp
        os.replace(tmp, path)


OS_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk space (quota exceeded)",
    errno.EACCES: "fix its permissions or choose another path",
    errno.EPERM: "fix its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOTDIR: "a part of the path is a file: choose another path",
    errno.EEXIST: "a file is in the way: choose another path",
    errno.EISDIR: "it is a directory: give a file",
    errno.ENOENT: "check the path",
}


def os_error_message(e: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and the usual fix."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}: {OS_FIXES.get(e.errno, 'check the path, its permissions and free space')}"
