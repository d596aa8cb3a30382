"""The run directory (mixgrpo/rundir.py): one process at a time (a lock that names its holder and never goes
stale), no new run over an earlier run's results, metrics truncated by iteration on resume, and what killed
processes leave behind swept by the next owner. The process-level tests (two `mixgrpo train` on one directory,
kill -9, resume) are in tests/test_reliability.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mixgrpo.config import ConfigError
from mixgrpo.rundir import RunLock, claim, keep_records_before

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_lock_fails_and_names_the_holder(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    try:
        # flock belongs to an open file description: a second one conflicts even within this process
        with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()} "
                                              rf"\(started .*\): wait for that run to end .* choose another out_dir"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    again = RunLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


def test_the_lock_of_a_killed_process_is_free(tmp_path):
    """kill -9 runs no cleanup; the kernel drops the flock with the process, so the lock never goes stale."""
    code = ("import sys, time; from pathlib import Path; from mixgrpo.rundir import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # its name is still in the file
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def _records(path: Path, iterations: list[int], cut_last: bool = False) -> None:
    lines = [json.dumps({"iteration": i, "loss": 0.1 * i}) + "\n" for i in iterations]
    if cut_last:
        lines[-1] = lines[-1][:10]  # a line cut short by a crash mid-write
    path.write_text("".join(lines))


@pytest.mark.parametrize("before, want", [(7, [1, 2, 3, 4, 5, 6]), (5, [1, 2, 3, 4]), (1, [])])
def test_records_are_truncated_by_iteration_not_by_line_count(tmp_path, before, want):
    """What two unlocked processes once left: iterations [1, 1, 2, 2, 3, 4, 5, 6]. Truncating to the 6 lines a
    checkpoint of iteration 6 had counted lost iterations 5 and 6; by iteration, nothing is lost."""
    path = tmp_path / "metrics.jsonl"
    _records(path, [1, 1, 2, 2, 3, 4, 5, 6, 7], cut_last=True)
    keep_records_before(path, before)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == want
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_next_owner_sweeps_what_killed_processes_left(tmp_path, capsys):
    run = tmp_path / "run"
    leftovers = [run / "checkpoints" / ".tmp-iter_000003-4242", run / ".final.tmp-abc123",
                 run / ".final.old-def456", run / "..final.tmp-abc123.tmp-ghi789"]
    for d in leftovers:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    for f in (".config.yaml.tmp", ".metrics.jsonl.tmp"):
        (run / f).write_text("half")
    (run / "checkpoints" / "iter_000002").mkdir()  # complete checkpoint: kept
    (run / "checkpoints" / "iter_000002" / "COMPLETE").write_text("ok\n")
    with claim(run, resume=True):
        pass
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["iter_000002"]
    assert "removed what an interrupted process left" in capsys.readouterr().out


def test_a_failed_claim_releases_the_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").mkdir()  # a finished run's results: a new run is refused ...
    with pytest.raises(ConfigError, match="holds a finished run"):
        with claim(run, resume=False):
            pass
    lock = RunLock(run)  # ... and the refusal did not keep the directory locked
    lock.acquire()
    lock.release()


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    """Some network mounts refuse flock (ENOLCK, EOPNOTSUPP): refusing to train there would leave no way out,
    so the run goes on unlocked and says so."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with claim(tmp_path / "run", resume=False):
        pass
    out = capsys.readouterr().out
    assert f"warning: cannot lock {tmp_path / 'run' / '.lock'} (No locks available)" in out
    assert "make sure only one uses it" in out
