"""Faults during training: kill -9 (also inside a checkpoint save), SIGTERM/SIGINT, a full or unwritable disk,
failing rewards and non-finite losses. The process tests run the real `mixgrpo train` CLI in child processes
(the analytic Gaussian model on the CPU); the end state of a run that was killed and resumed must equal that of
an uninterrupted run: weights, metrics.jsonl (without timings) and eval.jsonl. docs/reliability.md has the table.
"""

import errno
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import mixgrpo.checkpoint as checkpoint
import mixgrpo.objectives as objectives
import mixgrpo.train.trainer as trainer
from mixgrpo.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from mixgrpo.cli import main
from mixgrpo.config import load_config
from mixgrpo.rundir import read_metrics
from mixgrpo.train import TrainingError, train

from gaussian_run import gaussian_run_yaml

ROOT = Path(__file__).resolve().parent.parent

# The child's entry point: the real CLI, plus a reward that can be slowed down or hung and a hook that stalls
# inside save_checkpoint (after the weights file of the temporary directory is written), so that kill -9 is
# sure to land in the middle of a save.
FAULTS_PY = '''\
import os
import sys
import time


def brightness(images, prompts):
    """tests/toy_rewards.brightness, after sleeping FAULT_REWARD_SLEEP seconds (a slow or hung reward)."""
    seconds = float(os.environ.get("FAULT_REWARD_SLEEP", "0"))
    if seconds > 5:
        print("FAULT: reward hangs", flush=True)
    time.sleep(seconds)
    return -(images.mean(dim=(1, 2, 3)) - 1.0).abs()


def flaky(images, prompts, error="RewardError", every=2):
    """brightness, but every `every`-th call raises `error` first (transient: the retry succeeds)."""
    from mixgrpo.rewards import RewardError

    CALLS.append(len(prompts))
    if len(CALLS) % every == 1:
        raise {"RewardError": RewardError, "TimeoutError": TimeoutError, "ConnectionError": ConnectionError}[error](
            "transient failure")
    return brightness(images, prompts)


def non_finite(images, prompts, nan_at=(0,), inf_at=()):
    """brightness with NaN at the indices `nan_at` and -inf at `inf_at` (the reward cannot score those images)."""
    scores = brightness(images, prompts).clone()
    scores[[i for i in nan_at if i < len(prompts)]] = float("nan")
    scores[[i for i in inf_at if i < len(prompts)]] = -float("inf")
    return scores


def late(images, prompts):
    """A constant score on the first call, brightness after: the first iteration has no learning signal."""
    CALLS.append(len(prompts))
    return brightness(images, prompts) * (len(CALLS) > 1)


def buggy(images, prompts):
    CALLS.append(len(prompts))
    raise TypeError("a bug in the reward")


CALLS = []

if __name__ == "__main__":
    stall = os.environ.get("FAULT_STALL_SAVE_AT")
    if stall:
        import mixgrpo.checkpoint as checkpoint

        real_save_file = checkpoint.save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save_file(tensors, filename, *args, **kwargs)
            if f".tmp-iter_{int(stall):06d}" in str(filename):
                print("FAULT: inside save_checkpoint", flush=True)
                time.sleep(3600)

        checkpoint.save_file = save_file
    stall_eval = os.environ.get("FAULT_STALL_EVAL")  # the N-th evaluation batch takes 3 s more
    if stall_eval:
        import mixgrpo.evaluate as evaluate

        real_sample, calls = evaluate.sample, []

        def sample(*args, **kwargs):
            calls.append(1)
            if len(calls) == int(stall_eval):
                print("FAULT: inside the evaluation", flush=True)
                time.sleep(3)
            return real_sample(*args, **kwargs)

        evaluate.sample = sample
    if os.environ.get("FAULT_STALL_EXPORT"):  # inside the export of final/, after its weights are written
        from mixgrpo.models.analytic import GaussianFlow

        real_save_pretrained = GaussianFlow.save_pretrained

        def save_pretrained(self, path, state_dict=None):
            real_save_pretrained(self, path, state_dict)
            print("FAULT: inside the export", flush=True)
            time.sleep(3600)

        GaussianFlow.save_pretrained = save_pretrained
    from mixgrpo.cli import main

    sys.exit(main(sys.argv[1:]))
'''

CONFIG_YAML = gaussian_run_yaml(rewards=[{"name": "faults:brightness"}], run={"iterations": 8, "checkpoint_every": 1}, loss={"clip_range": 0.2}, eval={"num_prompts": 4})


@pytest.fixture(scope="module")
def faults_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    (d / "faults.py").write_text(FAULTS_PY)
    (d / "config.yaml").write_text(CONFIG_YAML)
    sys.path.insert(0, str(d))  # the in-process runs name the same rewards
    yield d
    sys.path.remove(str(d))
    sys.modules.pop("faults", None)


@pytest.fixture(scope="module")
def reference(faults_dir):
    """The uninterrupted run, in-process (the same computation as the CLI in a child process)."""
    return train(load_config(faults_dir / "config.yaml", [f"run.out_dir={faults_dir / 'reference'}"]), progress=False)


def _end_state(run: Path) -> dict:
    """What must not depend on interruptions: final weights, metrics without timings, evaluations."""
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    return {"weights": load_file(run / "final" / "model.safetensors")["mu"],
            "checkpoint": load_checkpoint(latest_checkpoint(run))["model"]["mu"],
            "metrics": [drop(m) for m in read_metrics(run)],
            "evals": [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]}


def _assert_same_run(run: Path, reference: Path) -> None:
    got, want = _end_state(run), _end_state(reference)
    assert torch.equal(got["weights"], want["weights"])
    assert torch.equal(got["checkpoint"], want["checkpoint"])
    assert got["metrics"] == want["metrics"]
    assert got["evals"] == want["evals"]
    assert not list((run / "checkpoints").glob(".tmp-*")), "a stale temporary checkpoint was left behind"


class Child:
    """`python -m faults train ...` (the real CLI) with its output read line by line in a thread."""

    def __init__(self, faults_dir: Path, args: list[str], **env: str):
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(faults_dir)]),
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "faults", "train", *args], cwd=faults_dir, env=environ,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, *texts: str, timeout: float = 120) -> bool:
        """Block until a line containing one of `texts` (True) or the end of the output (False)."""
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                return False
            if any(text in line for text in texts):
                return True

    def finish(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL: no handler, no cleanup
        self.proc.wait(timeout=30)


def _run_args(run: Path, resume: bool) -> list[str]:
    return ["--config", "config.yaml", "--out", str(run)] + (["--resume"] if resume else [])


# --------------------------------------------------------------------------------------------------
# 1-2. kill -9, SIGINT, SIGTERM, then resume


def _stop_with(sig: signal.Signals, child: Child, after: int, run: Path) -> int:
    """Send `sig` once iteration `after` is logged; check the exit status, the message and the checkpoint."""
    assert child.wait_for(f"it {after:4d}/"), "".join(child.output)
    child.proc.send_signal(sig)
    assert child.finish(timeout=60) == 128 + sig  # bounded: the rest of one iteration and a save
    output = "".join(child.output)
    assert f"received {sig.name}: stopping at the next safe point" in output
    assert f"stopped by {sig.name}: checkpoint saved" in output
    stopped = int(re.search(r"stopped after iteration (\d+)", output).group(1))
    assert stopped in (after, after + 1)
    assert latest_checkpoint(run).name == f"iter_{stopped:06d}"
    assert len(read_metrics(run)) == stopped
    return stopped


def test_kill9_inside_a_save_then_sigint_then_sigterm_and_the_resumed_run_equals_the_uninterrupted_one(
        faults_dir, reference):
    """One run, interrupted three times (four real processes, to keep the suite short): kill -9 inside the save of
    checkpoint 3, SIGINT, SIGTERM; each resume continues from the last complete checkpoint."""
    run = faults_dir / "interrupted"
    child = Child(faults_dir, _run_args(run, resume=False), FAULT_STALL_SAVE_AT="3")
    assert child.wait_for("FAULT: inside save_checkpoint"), "".join(child.output)
    child.kill9()
    # the half-written checkpoint is on disk, but never picked up
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-iter_000003")]
    assert latest_checkpoint(run).name == "iter_000002"
    assert len(read_metrics(run)) == 3  # iteration 3 was logged before its save: the resume drops the line

    slow = {"FAULT_REWARD_SLEEP": "0.2"}  # the signals land inside an iteration
    stopped = _stop_with(signal.SIGINT, Child(faults_dir, _run_args(run, resume=True), **slow), 3, run)
    _stop_with(signal.SIGTERM, Child(faults_dir, _run_args(run, resume=True), **slow), stopped + 1, run)
    child = Child(faults_dir, _run_args(run, resume=True))
    assert child.finish() == 0, "".join(child.output)
    _assert_same_run(run, reference)


def test_a_signal_inside_the_periodic_evaluation_stops_before_another_iteration(faults_dir, tmp_path):
    """SIGTERM while the evaluation of iteration 2 runs (eval_every=2, no checkpoint due): exit 143 before
    iteration 3 starts, a checkpoint at 2 that says its evaluation is pending; the resume evaluates first and
    ends equal to the uninterrupted run (once, the stop waited for one more whole iteration)."""
    over = ["run.iterations=4", "run.checkpoint_every=10", "eval.every=2"]
    want = train(load_config(faults_dir / "config.yaml", [f"run.out_dir={tmp_path / 'ref'}", *over]), progress=False)
    run = tmp_path / "run"
    child = Child(faults_dir, _run_args(run, resume=False) + over, FAULT_STALL_EVAL="2")
    assert child.wait_for("FAULT: inside the evaluation"), "".join(child.output)
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish(timeout=60) == 143, "".join(child.output)
    assert "stopped by SIGTERM: checkpoint saved, stopped after iteration 2" in "".join(child.output)
    assert len(read_metrics(run)) == 2
    assert latest_checkpoint(run).name == "iter_000002"
    assert json.loads((latest_checkpoint(run) / "state.json").read_text())["eval_pending"] is True
    assert [r["iteration"] for r in map(json.loads, (run / "eval.jsonl").read_text().splitlines())] == [0]
    child = Child(faults_dir, _run_args(run, resume=True) + over)
    assert child.finish() == 0, "".join(child.output)
    _assert_same_run(run, want)


def test_a_signal_after_the_rollout_drops_the_iteration_and_checkpoints_the_last_one(faults_dir, tmp_path):
    """SIGTERM during the rollout of iteration 3 (checkpoint_every=10: none is due): the iteration is dropped
    before its update, the weights after iteration 2 are checkpointed, exit 143; the resume equals the
    uninterrupted run."""
    over = ["run.iterations=4", "run.checkpoint_every=10"]
    want = train(load_config(faults_dir / "config.yaml", [f"run.out_dir={tmp_path / 'ref'}", *over]), progress=False)
    run = tmp_path / "run"
    child = Child(faults_dir, _run_args(run, resume=False) + over, FAULT_REWARD_SLEEP="1")
    assert child.wait_for("it    2/"), "".join(child.output)
    child.proc.send_signal(signal.SIGTERM)  # lands in iteration 3's rollout or rewards (the reward takes 1 s)
    assert child.finish(timeout=60) == 143, "".join(child.output)
    assert "stopped after iteration 2 (iteration 3 was dropped before its update)" in "".join(child.output)
    assert len(read_metrics(run)) == 2 and latest_checkpoint(run).name == "iter_000002"
    child = Child(faults_dir, _run_args(run, resume=True) + over)
    assert child.finish() == 0, "".join(child.output)
    got, ref = _end_state(run), _end_state(want)
    assert torch.equal(got["weights"], ref["weights"]) and got["metrics"] == ref["metrics"]


@pytest.mark.slow  # 35-50 s: 9 child processes on 2 busy cores
def test_kill9_at_random_moments_then_resume_equals_uninterrupted(faults_dir, reference):
    rng = random.Random(1234)
    run = faults_dir / "killed_at_random"
    progress = []  # (complete checkpoint, metric lines) at each kill: where the kills landed
    for attempt in range(8):
        child = Child(faults_dir, _run_args(run, resume=attempt > 0), FAULT_REWARD_SLEEP="0.1")
        # the clock starts with training (the imports take seconds): kill within the next few iterations
        child.wait_for("before training", "resumed from")
        threading.Event().wait(rng.uniform(0.0, 0.4))
        if child.proc.poll() is not None:  # finished before the kill
            break
        child.kill9()
        latest = latest_checkpoint(run)
        progress.append((latest.name if latest else None, len(read_metrics(run))))
    assert len(progress) >= 4, progress
    child = Child(faults_dir, _run_args(run, resume=True))
    assert child.finish() == 0, "".join(child.output)
    _assert_same_run(run, reference)


@pytest.mark.slow  # 6-9 s (one child process): slow only to keep the default suite short
def test_second_signal_stops_a_hung_reward(faults_dir, tmp_path):
    child = Child(faults_dir, _run_args(tmp_path / "run", resume=False) + ["eval.num_prompts=0"],
                  FAULT_REWARD_SLEEP="3600")
    assert child.wait_for("FAULT: reward hangs"), "".join(child.output)
    child.proc.send_signal(signal.SIGTERM)  # would wait for the iteration to end: never
    assert child.wait_for("received SIGTERM")
    time.sleep(2.5)  # a signal within 2 s of the first is the same stop, echoed by a launcher (StopRequest)
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish(timeout=60) == 130
    assert "interrupted" in "".join(child.output)
    assert latest_checkpoint(tmp_path / "run") is None


def test_a_signal_echoed_within_the_window_is_the_same_stop_and_a_later_one_stops_at_once():
    """Ctrl-C under torchrun reaches a worker twice (the terminal, then the launcher's forward): that must not be
    taken for the impatient second signal that abandons the checkpoint."""
    from mixgrpo.train.control import StopRequest

    with StopRequest(echo_s=0.5) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the echo: ignored
        assert stop.signal == signal.SIGINT
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode


def test_incomplete_and_temporary_checkpoints_are_never_picked_up(faults_dir, reference, tmp_path):
    cfg = load_config(faults_dir / "config.yaml", [f"run.out_dir={tmp_path / 'run'}"])
    train(cfg, progress=False, stop_after=2)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "iter_000005").mkdir()  # a newer directory without the COMPLETE marker (cut-short delete or copy)
    (ckpts / "iter_000005" / "model.safetensors").write_bytes(b"garbage")
    (ckpts / ".tmp-iter_000003-999999").mkdir()  # what kill -9 inside a save leaves
    (ckpts / ".tmp-iter_000003-999999" / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path / "run").name == "iter_000002"
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_checkpoint(ckpts / "iter_000005")
    train(cfg, resume=True, progress=False)
    assert torch.equal(_end_state(tmp_path / "run")["weights"], _end_state(reference)["weights"])
    assert not (ckpts / ".tmp-iter_000003-999999").exists()


def _first_to_exit(*children: Child, timeout: float = 180) -> Child:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.proc.poll() is not None:
                return child
        time.sleep(0.05)
    raise TimeoutError("no child exited")


def _refused_for(child: Child, holder: Child) -> None:
    """The child stopped at once with one error line naming the live holder (pid, host) and the fix."""
    assert child.finish() == 2, "".join(child.output)
    errors = [line for line in child.output if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "".join(child.output), "".join(child.output)
    assert f"is in use by pid {holder.proc.pid} on host {socket.gethostname()}" in errors[0]
    assert "wait for that run to end (or stop it), or choose another out_dir" in errors[0]


def test_two_processes_on_one_run_directory_then_kill9_and_resume(faults_dir, reference):
    """The race of `for i in 1 2; do mixgrpo train --out D ... & done`: one process gets the run directory, the
    other stops at once naming it; so does a --resume beside the live run (it was once told that a good
    checkpoint was corrupted). Then the holder is killed (kill -9) inside the export of final/: its lock goes
    with it, the resume sweeps the half-written export, and the run ends equal to the uninterrupted one."""
    run = faults_dir / "contended"
    slow = {"FAULT_REWARD_SLEEP": "0.3", "FAULT_STALL_EXPORT": "1"}
    a, b = (Child(faults_dir, _run_args(run, resume=False), **slow) for _ in range(2))
    loser = _first_to_exit(a, b)
    holder = b if loser is a else a
    _refused_for(loser, holder)
    beside = Child(faults_dir, _run_args(run, resume=True))
    assert holder.wait_for("FAULT: inside the export"), "".join(holder.output)
    _refused_for(beside, holder)
    holder.kill9()
    assert list(run.glob(".final.tmp-*"))  # the half-written export
    metrics = [m["iteration"] for m in read_metrics(run)]
    assert metrics == list(range(1, 9))  # one writer: no iteration logged twice
    child = Child(faults_dir, _run_args(run, resume=True))
    assert child.finish() == 0, "".join(child.output)
    assert "removed what an interrupted process left" in "".join(child.output)
    _assert_same_run(run, reference)
    assert not list(run.glob(".final.*"))


# --------------------------------------------------------------------------------------------------
# 3. full disk, unwritable run directory


def _fail_third_save(monkeypatch, where: str) -> None:
    """Make the save of checkpoint 3 fail the way a full disk or a read-only directory does."""
    def on_third(real, error):
        def wrapped(*args, **kwargs):
            target = str(args[1] if len(args) > 1 else args[0])
            if "iter_000003" in target:
                raise error
            return real(*args, **kwargs)
        return wrapped

    if where == "weights (safetensors, disk full)":  # safetensors reports I/O errors as SafetensorError
        monkeypatch.setattr(checkpoint, "save_file", on_third(checkpoint.save_file, SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")))
    elif where == "optimizer (torch.save, disk full)":
        monkeypatch.setattr(torch, "save", on_third(torch.save, OSError(errno.ENOSPC, "No space left on device")))
    elif where == "rename (read-only directory)":
        fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        fake_os.rename = on_third(os.rename, PermissionError(errno.EACCES, "Permission denied"))
        monkeypatch.setattr(checkpoint, "os", fake_os)


@pytest.mark.parametrize("where, reason", [
    ("weights (safetensors, disk full)", "No space left on device"),
    ("optimizer (torch.save, disk full)", "No space left on device"),
    ("rename (read-only directory)", "Permission denied"),
])
def test_failed_save_keeps_the_previous_checkpoint_and_stops_clearly(where, reason, faults_dir, reference, tmp_path,
                                                                      monkeypatch, capsys):
    run = tmp_path / "run"
    _fail_third_save(monkeypatch, where)
    assert main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: could not write checkpoint")
    assert "iter_000003" in err and reason in err and "previous checkpoint is intact" in err
    assert latest_checkpoint(run).name == "iter_000002"
    assert load_checkpoint(run / "checkpoints" / "iter_000002")["state"]["iteration"] == 2
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()  # the disk has space again: nothing was lost
    assert main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--resume", "--quiet"]) == 0
    _assert_same_run(run, reference)


def test_unwritable_checkpoint_directory_on_the_real_filesystem(faults_dir, tmp_path, capsys):
    """As root, chmod cannot make a directory unwritable: a file where the checkpoints directory goes can."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("in the way")
    assert main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "File exists" in err and "fix the permissions" in err


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB file system (tmpfs): writes fail the way they do on a full disk, not through a fake."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                              text=True, timeout=30)
        reason = proc.stderr.strip() if proc.returncode else None
    except OSError as e:  # no mount program
        reason = str(e)
    if reason is not None:
        pytest.skip(f"cannot mount a 4 MiB tmpfs here ({reason}): the real full-disk test needs root on a machine "
                    f"that allows mounts; the faked ENOSPC tests above still run")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def _fill(disk: Path, leave_kib: int | None = None) -> Path:
    """Fill `disk` up to `leave_kib` KiB of free space (None: completely, until ENOSPC)."""
    filler = disk / f"filler{len(list(disk.glob('filler*')))}"
    st = os.statvfs(disk)
    size = None if leave_kib is None else st.f_bavail * st.f_frsize - leave_kib * 1024
    with open(filler, "wb") as f:
        try:
            while size is None or f.tell() < size:
                f.write(b"\0" * (65536 if size is None else min(65536, size - f.tell())))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


BIG = ["model.args.size=128", "run.iterations=3", "eval.num_prompts=0"]  # 197 KB of weights, 393 KB of optimizer state


@pytest.mark.parametrize("where, leave_kib", [
    ("config.yaml", 4),  # the lock file takes the last page
    ("tensorboard", 8),  # in TensorBoard's writer thread: no traceback from there either
    ("metrics.jsonl", 12),
    ("checkpoint weights (safetensors)", 100),
    ("checkpoint optimizer state (torch.save: 'unexpected pos')", 300),
    ("final model (export)", None),
])
def test_a_really_full_disk_stops_clearly_and_loses_nothing(where, leave_kib, faults_dir, small_disk, tmp_path,
                                                            monkeypatch, capsys):
    """On a 4 MiB tmpfs filled to `leave_kib` KiB free before the run (or, for the export, filled completely
    just before it): exit 2 and one line `No space left on device` naming a path on that disk; after the space
    is freed, --resume ends equal to an uninterrupted run elsewhere."""
    want = train(load_config(faults_dir / "config.yaml", [f"run.out_dir={tmp_path / 'ref'}", *BIG]), progress=False)
    run = small_disk / "run"
    args = ["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--quiet", *BIG]
    seen = []  # what the libraries raised, before mixgrpo named it
    real_as_os_error = checkpoint.as_os_error
    monkeypatch.setattr(checkpoint, "as_os_error", lambda e, p: seen.append(repr(e)) or real_as_os_error(e, p))
    fillers = []
    if leave_kib is None:
        real_export = trainer.export_model
        monkeypatch.setattr(trainer, "export_model", lambda *a, **k: (fillers.append(_fill(small_disk)),
                                                                      real_export(*a, **k)))
    else:
        fillers.append(_fill(small_disk, leave_kib))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "No space left on device" in err, err
    assert str(small_disk) in err and ("free disk space" in err), err
    if leave_kib is not None and leave_kib < 100:  # before the first checkpoint: none is said to be intact
        assert f"{run / where}): free disk space, then run it again with --resume (it had written no checkpoint " \
               f"yet: the run starts over)" in err, err
    if "checkpoint" in where:
        assert err.startswith("error: could not write checkpoint") and "previous checkpoint is intact" in err
        assert "SafetensorError" in seen[0] if "safetensors" in where else "unexpected pos" in seen[0], seen
    if "export" in where:
        assert str(run / "final") in err and "continue the run with --resume (its last checkpoint, iter_000003, " \
                                             "is intact)" in err, err
        assert latest_checkpoint(run).name == "iter_000003"
    for filler in fillers:
        filler.unlink()
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert torch.equal(load_file(run / "final" / "model.safetensors")["mu"],
                       load_file(want / "final" / "model.safetensors")["mu"])
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert [drop(m) for m in read_metrics(run)] == [drop(m) for m in read_metrics(want)]
    assert not [p for p in run.rglob(".*") if p.name != ".lock"]  # no temporary file left


# --------------------------------------------------------------------------------------------------
# 4. rewards that fail, and non-finite losses


def _cfg(faults_dir, tmp_path, *overrides):
    return load_config(faults_dir / "config.yaml", [f"run.out_dir={tmp_path / 'run'}", "run.iterations=3", *overrides])


@pytest.mark.parametrize("error", ["RewardError", "TimeoutError", "ConnectionError"])
def test_transient_reward_failures_are_retried_transparently(error, faults_dir, reference, tmp_path):
    import faults

    faults.CALLS.clear()
    run = train(_cfg(faults_dir, tmp_path, f"rewards=[{{name: 'faults:flaky', args: {{error: {error}}}}}]"),
                progress=False)
    assert len(faults.CALLS) > 3  # every other call failed once and was retried
    assert all(m["failed_groups"] == 0 for m in read_metrics(run))
    want = train(_cfg(faults_dir, tmp_path / "ref"), progress=False)
    assert torch.equal(load_file(run / "final" / "model.safetensors")["mu"],
                       load_file(want / "final" / "model.safetensors")["mu"])


def test_a_reward_bug_is_not_retried(faults_dir, tmp_path):
    import faults

    faults.CALLS.clear()
    cfg = _cfg(faults_dir, tmp_path, "rewards=[{name: 'faults:buggy'}]", "eval.num_prompts=0")
    with pytest.raises(TypeError, match="a bug in the reward"):
        train(cfg, progress=False)
    assert len(faults.CALLS) == 1


def test_nan_and_inf_scores_skip_their_groups_and_are_counted(faults_dir, tmp_path):
    # 4 prompts x 4 images: NaN on image 0 (group 0) and -inf on image 5 (group 1): 2 of 4 groups fail
    run = train(_cfg(faults_dir, tmp_path, "rollout.prompts_per_iteration=4", "scoring.max_failed_groups=0.5",
                     "rewards=[{name: 'faults:non_finite', args: {nan_at: [0], inf_at: [5]}}]"), progress=False)
    metrics = read_metrics(run)
    assert [m["failed_groups"] for m in metrics] == [2, 2, 2]
    assert all(m["zero_advantage_groups"] >= 0.5 for m in metrics)  # skipped groups train nothing
    assert torch.isfinite(load_file(run / "final" / "model.safetensors")["mu"]).all()


def test_too_many_failed_groups_abort_with_the_reason(faults_dir, tmp_path, capsys):
    rc = main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(tmp_path / "run"), "--quiet",
               "rollout.prompts_per_iteration=4", "rewards=[{name: 'faults:non_finite', args: {nan_at: [0], inf_at: [5]}}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "2 of 4 groups failed to get rewards" in err
    assert "scoring.max_failed_groups = 0.25" in err and "non_finite: 2 of 16 scores were NaN or inf" in err


class _SlowJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers after 2 s: every call of a judge with timeout 0.2 s times out."""

    def do_POST(self):  # noqa: N802
        threading.Event().wait(2.0)
        try:
            body = json.dumps({"choices": [{"message": {"content": "Final Score: 5"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


class _JudgeServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 16  # the 8 concurrent calls of an attempt all connect


def test_reward_timeout_is_retried_then_aborts_with_the_reason(faults_dir, tmp_path, monkeypatch):
    from mixgrpo.rewards.vlm import VlmJudge

    batches = []  # reward calls, counted on the client side (server-side counts depend on scheduling)
    real_call = VlmJudge.__call__

    def counted(self, images, prompts, seeds=None):
        batches.append(len(prompts))
        return real_call(self, images, prompts, seeds)

    monkeypatch.setattr(VlmJudge, "__call__", counted)
    server = _JudgeServer(("127.0.0.1", 0), _SlowJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cfg = _cfg(faults_dir, tmp_path, "eval.num_prompts=0", "scoring.retries=1",
                   f"rewards=[{{name: vlm, args: {{base_url: '{url}', model: judge, timeout: 0.2, retries: 0}}}}]")
        with pytest.raises(TrainingError, match=r"vlm: RewardError: .*within 0.2 s \(timeout\)"):
            train(cfg, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert batches == [8, 8]  # 8 images, 2 attempts (the policy's retry)


def _break_the_loss(monkeypatch, kind: str) -> None:
    """From iteration 3 on, the loss is NaN or inf, or finite with a NaN gradient."""
    real = objectives.policy_loss
    calls = {"n": 0}

    def policy_loss(logp, old_logp, adv, clip):
        loss, stats = real(logp, old_logp, adv, clip)
        calls["n"] += 1
        if calls["n"] > 2 * 2 * 2:  # 2 iterations x 2 optimizer steps x 2 trained steps
            if kind == "nan loss":
                loss = loss * float("nan")
            elif kind == "inf loss":
                loss = loss + float("inf")
            else:  # d/dx sqrt(|x|) at x = 0 is 0 * inf = NaN, while the value stays 0
                loss = loss + (logp - logp.detach()).abs().sqrt().sum()
        return loss, stats

    monkeypatch.setattr(objectives, "policy_loss", policy_loss)


@pytest.mark.parametrize("kind, message", [("nan loss", "the loss became nan"), ("inf loss", "the loss became inf"),
                                           ("nan gradient", "the gradient norm became nan")])
def test_non_finite_loss_stops_before_touching_the_weights(kind, message, faults_dir, tmp_path, monkeypatch, capsys):
    _break_the_loss(monkeypatch, kind)
    run = tmp_path / "run"
    assert main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "lower optim.lr" in err
    latest = load_checkpoint(latest_checkpoint(run))
    assert latest["state"]["iteration"] == 2 and torch.isfinite(latest["model"]["mu"]).all()
    assert len(read_metrics(run)) == 2


def test_a_diverged_update_is_never_logged_or_checkpointed(faults_dir, tmp_path, capsys):
    """An update that makes weights NaN although its loss and gradient norm were finite (lr = 1e10 and the like;
    lr = inf is refused with the config): the run stops before that iteration is logged or saved, and the good
    checkpoints stay (keep_checkpoints = 2 would have rotated them out for NaN ones)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []

    def poison(optimizer, args, kwargs):  # after the last optimizer step of iteration 3 (2 steps per iteration)
        steps.append(1)
        if len(steps) == 6:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.view(-1)[::2] = float("nan")

    handle = register_optimizer_step_post_hook(poison)
    try:
        run = tmp_path / "run"
        rc = main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--quiet",
                   "eval.num_prompts=0", "run.keep_checkpoints=2"])
    finally:
        handle.remove()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert err.startswith("error: the update of iteration 3 made 24 of 48 trainable weights NaN or inf") and \
        "not logged or saved" in err and "lower optim.lr" in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
    assert all(torch.isfinite(load_checkpoint(p)["model"]["mu"]).all() for p in (run / "checkpoints").iterdir())
    assert [m["iteration"] for m in read_metrics(run)] == [1, 2]


def test_non_finite_images_stop_the_run_before_they_are_scored(faults_dir, tmp_path, monkeypatch, capsys):
    """NaN pixels once crashed the verifier (astype(np.int64) of NaN: a traceback); now the rollout is checked."""
    from mixgrpo.models.analytic import GaussianFlow

    real_decode, calls = GaussianFlow.decode, []

    def decode(self, x):
        calls.append(1)
        return real_decode(self, x) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(GaussianFlow, "decode", decode)
    run = tmp_path / "run"
    assert main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--quiet",
                 "eval.num_prompts=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: the rollout of iteration 3 gave 8 of 8 images with NaN")
    assert "lower optim.lr" in err
    assert latest_checkpoint(run).name == "iter_000002" and len(read_metrics(run)) == 2


def test_a_run_without_learning_signal_warns_every_iteration_and_fails_at_the_end(faults_dir, tmp_path, capsys):
    """The policy (docs/reliability.md): each iteration without learning signal prints a warning; a run in which
    no iteration had any exits 2 with the reason, after writing everything (final/, summary.md)."""
    run = tmp_path / "run"
    rc = main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--quiet", "run.iterations=3",
               "eval.num_prompts=0", "rewards=[{name: 'toy_rewards:constant'}]"])
    out, err = capsys.readouterr()
    err = err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert err.startswith("error: no learning signal in any of the 3 iterations") and "check the reward" in err
    warnings = [line for line in out.splitlines() if "no learning signal" in line]
    assert warnings == [f"warning: iteration {i}: no learning signal: within every group the images got equal "
                        f"rewards (or failed), so every advantage is 0 and the update changes nothing"
                        for i in (1, 2, 3)]
    assert (run / "final" / "model.safetensors").is_file() and latest_checkpoint(run).name == "iter_000003"
    assert "**Warning: no learning signal in any of the 3 iterations" in (run / "summary.md").read_text()


def test_a_run_with_some_learning_signal_warns_only_where_it_had_none(faults_dir, tmp_path, capsys):
    import faults

    faults.CALLS.clear()
    run = tmp_path / "run"
    assert main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(run), "--quiet",
                 "run.iterations=3", "eval.num_prompts=0", "rewards=[{name: 'faults:late'}]"]) == 0
    out = capsys.readouterr().out
    assert [line[:33] for line in out.splitlines() if "no learning signal" in line] == [
        "warning: iteration 1: no learning"]
    assert "Warning" not in (run / "summary.md").read_text()


def test_a_run_whose_every_group_failed_says_so_not_a_constant_reward(faults_dir, tmp_path, capsys):
    """Every group failed to get rewards (max_failed_groups = 1 let the run go on): the end-of-run message says
    that, not "a constant or saturated reward"."""
    rc = main(["train", "--config", str(faults_dir / "config.yaml"), "--out", str(tmp_path / "run"), "--quiet",
               "run.iterations=2", "eval.num_prompts=0", "scoring.max_failed_groups=1",
               "rewards=[{name: 'toy_rewards:flaky', args: {fail_every: 1}}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert "every group of every iteration failed to get rewards" in err and "constant" not in err, err


# --------------------------------------------------------------------------------------------------
# readers of a run: export and sample of a run that is still training; a killed export; eval on a full disk


@pytest.fixture
def live_run(faults_dir, tmp_path) -> Path:
    """A run with checkpoints 1 to 3 and no final/ (it is still training, as far as a reader can tell)."""
    run = train(load_config(faults_dir / "config.yaml", [f"run.out_dir={tmp_path / 'live'}", "run.iterations=3",
                                                         "run.keep_checkpoints=3", "eval.num_prompts=0"]), progress=False)
    import shutil

    shutil.rmtree(run / "final")
    return run


def test_export_of_a_checkpoint_rotated_away_while_the_base_loads_succeeds(live_run, tmp_path, monkeypatch, capsys):
    """The trainer deletes the chosen checkpoint (run.keep_checkpoints) while the base model loads, minutes for
    FLUX: its weights were read before, so the export succeeds (it failed 4 of 4 times)."""
    import mixgrpo.export as export

    chosen = live_run / "checkpoints" / "iter_000002"
    want = load_file(chosen / "model.safetensors")["mu"]
    real_build = export.build_model
    monkeypatch.setattr(export, "build_model", lambda *a, **k: (checkpoint._remove(chosen), real_build(*a, **k))[1])
    assert main(["export", "--run", str(live_run), "--checkpoint", "iter_000002", "--out", str(tmp_path / "e")]) == 0
    assert torch.equal(load_file(tmp_path / "e" / "model.safetensors")["mu"], want)


def test_a_checkpoint_rotated_away_during_its_read_is_named_as_such(live_run, tmp_path, monkeypatch, capsys):
    """Deleted during the read itself: an explicit --checkpoint says that the run rotated it away (exit 2, not
    "run the command again"); the default (newest) takes the next newest and succeeds."""
    real_load_file = checkpoint.load_file
    rotated = []

    def load_file_while_rotating(path, *args, **kwargs):
        if not rotated:  # the trainer's rotation lands in the first read
            rotated.append(Path(path).parent)
            checkpoint._remove(Path(path).parent)
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_load_file(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_file", load_file_while_rotating)
    out = tmp_path / "explicit"
    assert main(["export", "--run", str(live_run), "--checkpoint", "iter_000002", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was deleted while it was read" in err and "rotated this one away" in err, err
    assert not out.exists()
    rotated.clear()
    want = load_file(live_run / "checkpoints" / "iter_000001" / "model.safetensors")["mu"]
    assert main(["export", "--run", str(live_run), "--out", str(tmp_path / "newest")]) == 0
    assert "iter_000003 was rotated away by the run" in capsys.readouterr().out
    assert torch.equal(load_file(tmp_path / "newest" / "model.safetensors")["mu"], want)


def test_sample_of_a_run_whose_newest_checkpoint_is_rotated_away_takes_the_next(live_run, tmp_path, monkeypatch,
                                                                               capsys):
    real_load_file = checkpoint.load_file
    rotated = []

    def load_file_while_rotating(path, *args, **kwargs):
        if not rotated:
            rotated.append(Path(path).parent)
            checkpoint._remove(Path(path).parent)
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_load_file(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_file", load_file_while_rotating)
    assert main(["sample", "--path", str(live_run), "--prompt", "a red circle", "--out", str(tmp_path / "s")]) == 0
    assert "iter_000003 was rotated away by the run" in capsys.readouterr().out
    assert (tmp_path / "s" / "0000_00.png").is_file()


def test_a_killed_export_leaves_nothing_once_export_runs_again(faults_dir, live_run, tmp_path):
    """kill -9 inside `mixgrpo export --out DIR` (after its weights are written) leaves .DIR.tmp-HOST-PID-*
    beside DIR (tens of GB for a full FLUX); the next export of DIR removes it, as a run sweeps its own."""
    out = tmp_path / "exported"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(faults_dir)]), "OMP_NUM_THREADS": "1",
           "FAULT_STALL_EXPORT": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "faults", "export", "--run", str(live_run), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "FAULT: inside the export" in line:
            break
    proc.kill()
    proc.wait(timeout=30)
    left = list(tmp_path.glob(".exported.tmp-*"))
    assert left and not out.exists()
    assert main(["export", "--run", str(live_run), "--out", str(out)]) == 0
    assert not list(tmp_path.glob(".exported.*")) and (out / "model.safetensors").is_file()


def test_eval_on_a_full_disk_names_the_file(live_run, tmp_path, monkeypatch, capsys):
    """A write() that fails with ENOSPC and no file name (what a full disk gives): the line names the file."""
    import builtins

    import mixgrpo.evaluate as evaluate

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate, "open", lambda path, *a, **k: Full() if str(path).endswith(".jsonl")
                        else builtins.open(path, *a, **k), raising=False)
    out = tmp_path / "eval"
    assert main(["eval", "--prompt", "a red circle", f"tuned={live_run}", "--reward", "faults:brightness",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: No space left on device ({out / 'scores.jsonl'}): free disk space", err
