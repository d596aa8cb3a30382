"""Distributed training on CPU with gloo: world-size invariance, data and reward placement, checkpoints that
resume on another world size, and a two-"node" launch.

A 2-process run with P = 2 prompts per rank and a 1-process run with P = 4 see the same global batch (the
same prompts, noise, trained steps and optimizer-step shares), so they must end with the same weights and log
the same losses, for MixGRPO and DanceGRPO, with parallel.strategy "ddp" and "fsdp" (FSDP2 shards the
Gaussian model's 3 x 4 x 4 mean unevenly over the 2 ranks). The 2-process runs share one torchrun launch:
this file is also the launched script (`__main__` at the end trains each configuration of a JSON list).
Every process uses one thread (the machine has 2 cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gaussian_run import gaussian_run, merged

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CALLS: list[tuple[int, list[str]]] = []  # (rank, prompts) of every call of `recorded_brightness` in this process


def recorded_brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The brightness reward of tests/toy_rewards.py, remembering which rank scored which prompts."""
    from mixgrpo import dist

    CALLS.append((dist.rank(), list(prompts)))
    return -(images.mean(dim=(1, 2, 3)) - 1.0).abs()


def crashing_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward with a bug: what `mixgrpo launch` must report as one, with its traceback."""
    return [][len(prompts)]


def _config(out_dir: Path, **over) -> dict:
    data = gaussian_run(rewards=[{"name": "test_distributed:recorded_brightness"}], run={"iterations": 2, "out_dir": str(out_dir), "checkpoint_every": 1, "keep_checkpoints": 3}, loss={"clip_range": 0.2}, eval={"num_prompts": 2})
    for key, value in over.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    _check(subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout))


def _train_here(data: dict, resume: bool = False) -> Path:
    from mixgrpo.config import build_config
    from mixgrpo.train import train

    torch.set_num_threads(1)
    return train(build_config(data), resume=resume, progress=False)


def _weights(run: Path) -> torch.Tensor:
    return load_file(str(run / "final" / "model.safetensors"))["mu"]


def _metric(run: Path, key: str) -> torch.Tensor:
    from mixgrpo.rundir import read_metrics

    return torch.tensor([m[key] for m in read_metrics(run)], dtype=torch.float64)


def _assert_same_metrics(a: Path, b: Path) -> None:
    """Same logged loss and gradient norm at every iteration (AdamW hides a wrong gradient scale, the norm does
    not). The loss is a mean of O(1) terms +-A * ratio that nearly cancel (advantages have mean 0): float32
    summation order leaves ~1e-7 absolute differences on a value of ~1e-4."""
    la, lb = _metric(a, "loss"), _metric(b, "loss")
    assert len(la) == len(lb) > 0
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(_metric(a, "grad_norm"), _metric(b, "grad_norm"), rtol=1e-4, atol=1e-8)


def _assert_same_run(a: Path, b: Path) -> None:
    torch.testing.assert_close(_weights(a), _weights(b), rtol=1e-5, atol=1e-6)
    _assert_same_metrics(a, b)


# --------------------------------------------------------------------------------------------------
# one torchrun launch: every 2-process configuration


TWO_RANKS = {  # name -> overrides of _config, run with 2 processes x P = 2
    "mixgrpo_ddp": {},
    "mixgrpo_fsdp": {"parallel": {"strategy": "fsdp", "checkpoint_format": "sharded"}},
    "dance_ddp": {"algorithm": "dance_grpo"},
    "dance_fsdp": {"algorithm": "dance_grpo", "parallel": {"strategy": "fsdp"}},
    "mixgrpo_rank0_rewards": {"parallel": {"rewards_on": "rank0"}},
    # rank 1 keeps its own gradients (DanceGRPO#110's failure: a model no rank averages): the replicas drift apart
    "selfish_rank1_ddp": {"algorithm": "ode", "objective": "diffusion_nft", "rollout": {"shared_noise": False}, "optim": {"ema_decay": 0.9}, "matching": {"sampler_decay": 0.5}, "test_selfish_rank": 1},
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run every TWO_RANKS configuration in one 2-process torchrun; returns the directory of the runs."""
    root = tmp_path_factory.mktemp("two_ranks")
    configs = [_config(root / name, **over) for name, over in TWO_RANKS.items()]  # test_* keys: for _main only
    (root / "configs.json").write_text(json.dumps(configs))
    _torchrun([str(Path(__file__)), str(root / "configs.json")])
    return root


@pytest.mark.parametrize("name", ["mixgrpo_ddp", "mixgrpo_fsdp", "dance_ddp", "dance_fsdp"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(two_ranks, tmp_path, name):
    over = TWO_RANKS[name]
    one = _train_here(_config(tmp_path / "one", rollout={"prompts_per_iteration": 4},
                              **{k: v for k, v in over.items() if k != "parallel"}))
    _assert_same_run(two_ranks / name, one)
    assert not torch.equal(_weights(one), torch.zeros_like(_weights(one)))  # it trained


def test_rewards_on_rank0_give_the_same_run(two_ranks):
    _assert_same_run(two_ranks / "mixgrpo_rank0_rewards", two_ranks / "mixgrpo_ddp")
    calls = json.loads((two_ranks / "mixgrpo_rank0_rewards" / "calls.json").read_text())
    ranks = {rank for rank, _ in calls}
    assert ranks == {0}  # only rank 0 scored anything ...
    train_calls = [prompts for _, prompts in calls if len(prompts) == 2 * 2 * 4]
    assert len(train_calls) == 2  # ... and it scored both ranks' images (2 ranks x P x G) in each iteration


def test_replicas_agree_and_their_checksum_is_logged(two_ranks):
    """Every iteration of a DDP and an FSDP run logs a replica spread of exactly 0 and the full weights' checksum;
    FSDP's is summed over the ranks' shards, so it is DDP's (the same run up to float summation order)."""
    for name in ("mixgrpo_ddp", "mixgrpo_fsdp"):
        assert _metric(two_ranks / name, "replicas/spread").tolist() == [0.0, 0.0]
    torch.testing.assert_close(_metric(two_ranks / "mixgrpo_fsdp", "replicas/checksum_weights"),
                               _metric(two_ranks / "mixgrpo_ddp", "replicas/checksum_weights"), rtol=1e-6, atol=1e-6)


def test_replicas_that_drift_apart_stop_the_run_before_anything_is_saved(two_ranks):
    """Rank 1 skips the gradient average: after the first update the ranks hold different weights (and EMA and
    sampling copies); the run stops on every rank with one line naming both ranks' checksums, and nothing of the
    iteration is logged or checkpointed."""
    run = two_ranks / "selfish_rank1_ddp"
    message = (run / "error.txt").read_text()
    assert "\n" not in message.strip()
    assert message.startswith("the replicas disagree after the update of iteration 1 ")
    for group in ("trainable weights: ", "EMA weights: ", "sampling copy: "):
        assert group in message
    assert "rank 0 (" in message and "rank 1 (" in message
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text() == ""


def test_each_rank_draws_distinct_prompts_and_keeps_whole_groups(two_ranks):
    from mixgrpo.prompts import read_prompts
    from mixgrpo.seeding import prompt_indices

    calls = json.loads((two_ranks / "mixgrpo_ddp" / "calls.json").read_text())
    train_prompts = read_prompts("world:train")
    train_calls = {r: [prompts for rank, prompts in calls if rank == r and len(prompts) == 2 * 4] for r in (0, 1)}
    assert [len(train_calls[r]) for r in (0, 1)] == [2, 2]  # one scoring call per rank and iteration
    for it in range(2):
        per_rank = {r: train_calls[r][it] for r in (0, 1)}
        for prompts in per_rank.values():  # group layout: G consecutive images of one prompt, on one rank
            groups = [prompts[i:i + 4] for i in range(0, 8, 4)]
            assert all(len(set(g)) == 1 for g in groups)
        drawn = [g for rank in (0, 1) for g in per_rank[rank][::4]]
        assert len(set(drawn)) == 4  # distinct prompts across ranks
        assert drawn == [train_prompts[i] for i in prompt_indices(it, len(train_prompts), 4, seed=0)]


def test_resume_on_another_world_size(two_ranks, tmp_path):
    """A sharded (DCP) checkpoint of the 2-process FSDP run and a full checkpoint gathered from FSDP, resumed
    by one process with twice the prompts per rank, continue exactly as an uninterrupted 1-process run."""
    import shutil

    for name, over in (("mixgrpo_fsdp", {}), ("dance_fsdp", {"algorithm": "dance_grpo"})):
        run = tmp_path / name
        shutil.copytree(two_ranks / name, run, ignore=shutil.ignore_patterns("final"))
        cfg = _config(run, **merged({"rollout": {"prompts_per_iteration": 4}, "run": {"iterations": 3}}, over))
        written = "dcp" if name == "mixgrpo_fsdp" else "model.safetensors"
        assert (run / "checkpoints" / "iter_000002" / written).exists()
        resumed = _train_here(cfg, resume=True)
        uninterrupted = _train_here(_config(tmp_path / f"{name}_one", **merged(
            {"rollout": {"prompts_per_iteration": 4}, "run": {"iterations": 3}}, over)))
        _assert_same_run(resumed, uninterrupted)


# --------------------------------------------------------------------------------------------------
# two "nodes" on localhost through the CLI


@pytest.mark.slow
def test_two_nodes_train_checkpoint_and_resume(tmp_path):
    """Two torchrun invocations (--nnodes 2, one process each) run `-m mixgrpo train`, stop after 2 of 3
    iterations, and resume; the result equals one uninterrupted process with the same global batch."""
    from mixgrpo.config import build_config, save_config

    config = tmp_path / "config.yaml"
    save_config(build_config(_config(tmp_path / "nodes", run={"iterations": 3}, parallel={"strategy": "fsdp"})), config)

    def launch(*extra: str) -> None:
        port = _free_port()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "mixgrpo", "train", "--config", str(config), "--quiet", *extra],
            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
        for p in procs:
            out, err = p.communicate(timeout=240)
            _check(subprocess.CompletedProcess(p.args, p.returncode, out, err))

    launch("run.iterations=2")
    from mixgrpo.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "nodes").name == "iter_000002"
    launch("--resume")
    assert latest_checkpoint(tmp_path / "nodes").name == "iter_000003"
    one = _train_here(_config(tmp_path / "one", run={"iterations": 3}, rollout={"prompts_per_iteration": 4}))
    _assert_same_run(tmp_path / "nodes", one)


@pytest.mark.slow
def test_fsdp_lora_on_the_tiny_flux_transformer_equals_one_rank(tmp_path):
    """FSDP2 per FLUX block (double and single stream) with LoRA adapters: the trained adapter weights of a
    2-process run equal those of 1 process with the same global batch."""
    from mixgrpo.checkpoint import latest_checkpoint, load_checkpoint
    from mixgrpo.models.tiny import TinyConfig, build_tiny, save_tiny

    torch.manual_seed(0)
    save_tiny(build_tiny(TinyConfig(image_size=16)), tmp_path / "tiny")
    over = {"model": {"name": "tiny", "args": {"path": str(tmp_path / "tiny")}}, "lora": {"rank": 4}, "sampler": {"num_steps": 4, "window": {"size": 1}}, "rollout": {"group_size": 2}, "update": {"steps_per_epoch": 1}, "optim": {"lr": 1e-2}, "eval": {"num_prompts": 0}}
    two = _config(tmp_path / "two", **merged({"rollout": {"prompts_per_iteration": 1}, "parallel": {"strategy": "fsdp"}}, over))
    (tmp_path / "configs.json").write_text(json.dumps([two]))
    _torchrun([str(Path(__file__)), str(tmp_path / "configs.json")])
    one = _train_here(_config(tmp_path / "one", **over))
    a = load_checkpoint(latest_checkpoint(tmp_path / "two"))["model"]
    b = load_checkpoint(latest_checkpoint(one))["model"]
    assert set(a) == set(b) and all("lora" in k for k in a)
    moved = [k for k in b if "lora_B" in k and b[k].abs().max() > 0]
    assert moved  # B starts at zero: the adapters trained
    for k in a:  # 2e-5 = 0.2 % of one AdamW step at lr 1e-2 (AdamW amplifies float noise of near-zero gradients)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)
    _assert_same_metrics(tmp_path / "two", one)


@pytest.mark.slow
def test_every_rank_stops_when_the_run_directory_is_in_use(tmp_path):
    """Rank 0 takes the run directory's lock for the whole job; when another process holds it, rank 0 names the
    holder, the other ranks say so too, and no rank waits for the others in a collective."""
    from mixgrpo.config import build_config, save_config
    from mixgrpo.rundir import RunLock

    config, busy = tmp_path / "config.yaml", tmp_path / "busy"
    save_config(build_config(_config(busy)), config)
    busy.mkdir()
    lock = RunLock(busy)
    lock.acquire()
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "mixgrpo", "train", "--config", str(config), "--quiet"]
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    finally:
        lock.release()
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: run directory {busy} is in use by pid {os.getpid()}") == 1, proc.stderr
    assert proc.stderr.count(f"error: rank 0 may not train into {busy}") == 1, proc.stderr
    assert [p.name for p in busy.iterdir()] == [".lock"]  # nothing was written


# --------------------------------------------------------------------------------------------------
# the launched script


def _selfish(average, selfish_rank: int):
    """`dist.average_gradients` that, on `selfish_rank`, all-reduces copies of the gradients (so that the other
    ranks' collective completes) and keeps its own."""
    from mixgrpo import dist

    return lambda grads: average([g.clone() for g in grads] if dist.rank() == selfish_rank else grads)


def _main(configs_file: str) -> None:
    from mixgrpo import dist

    torch.set_num_threads(1)
    sys.modules.setdefault("test_distributed", sys.modules["__main__"])  # the reward resolves to this module
    from mixgrpo.train import TrainingError

    for data in json.loads(Path(configs_file).read_text()):
        CALLS.clear()
        selfish = data.pop("test_selfish_rank", None)
        if selfish is not None:
            average = dist.average_gradients
            dist.average_gradients = _selfish(average, selfish)
            try:
                _train_here(data)
            except TrainingError as e:
                if dist.is_main():
                    (Path(data["run"]["out_dir"]) / "error.txt").write_text(str(e))
            finally:
                dist.average_gradients = average
            continue
        run = _train_here(data)
        calls = [None] * dist.world_size()
        torch.distributed.all_gather_object(calls, CALLS)
        if dist.is_main():
            (run / "calls.json").write_text(json.dumps([c for part in calls for c in part]))
    dist.shutdown()


if __name__ == "__main__":
    _main(sys.argv[1])


# mixgrpo launch: torchrun with mixgrpo's exit statuses


def _launch(tmp_path: Path, *extra: str, iterations: int = 2) -> subprocess.Popen:
    """`python -m mixgrpo launch --nproc_per_node 2 ... train` of the Gaussian run, in its own session (a terminal's
    Ctrl-C is a SIGINT to the whole process group)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path / "run", run={"iterations": iterations, "checkpoint_every": 10_000}, eval={"num_prompts": 0})))
    cmd = [sys.executable, "-m", "mixgrpo", "launch", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "train", "--config", str(config), *extra]
    return subprocess.Popen(cmd, env={**_env(), "TQDM_DISABLE": "1"}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_launch_prints_a_pre_flight_error_once_and_exits_2(tmp_path):
    """Plain torchrun prints the error on both ranks, then its ~35-line ChildFailedError block, and exits 1."""
    proc = _launch(tmp_path, "rewards=[{name: jpeg}]")
    out, err = proc.communicate(timeout=240)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: rewards[0]: unknown reward 'jpeg'"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two 2-process launches that train until signalled: ~40 s on 2 busy cores
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_launch_stops_cleanly_on_a_signal_with_the_documented_status(tmp_path, how):
    """Ctrl-C (SIGINT to the process group: every worker gets it twice, from the terminal and from the launcher) and
    a scheduler's SIGTERM to the launcher alone: the iteration ends, the checkpoint is written, rank 0 says so once,
    and the launcher exits 130 / 143 with no traceback."""
    import signal
    import threading

    from mixgrpo.checkpoint import latest_checkpoint

    proc = _launch(tmp_path, iterations=100_000)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while not any(line.startswith("it ") and "/100000" in line for line in lines[2:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == (130 if how == "ctrl-c" else 143), err
    reader.join(timeout=10)
    name = "SIGINT" if how == "ctrl-c" else "SIGTERM"
    assert err.count(f"stopped by {name}: checkpoint saved") == 1 and "Traceback" not in err, err
    assert "interrupted" not in err  # the echoed signal did not abandon the checkpoint
    assert latest_checkpoint(tmp_path / "run") is not None


@pytest.mark.slow  # one 2-process launch: ~15 s on 2 busy cores
def test_launch_reports_a_bug_with_its_traceback_and_the_rank(tmp_path):
    """A worker's bug (an IndexError in a reward) keeps its traceback, then one launcher line names the rank; the
    status is the worker's (1), not a signal's or a user error's."""
    proc = _launch(tmp_path, "rewards=[{name: 'test_distributed:crashing_reward'}]")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    assert "Traceback" in err and "IndexError" in err
    assert err.strip().splitlines()[-1].startswith("mixgrpo launch: rank ")
    assert "ChildFailedError" not in err  # torchrun's own block is not printed


def test_launch_without_a_command_is_a_usage_error_and_help_shows_torchruns_options(capsys):
    from mixgrpo import cli

    assert cli.main(["launch", "--nproc_per_node", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mixgrpo launch: no mixgrpo command") and "train" in err
    assert cli.main(["launch", "--help"]) == 0
    out = capsys.readouterr().out
    assert "mixgrpo launch --nproc_per_node 8 train" in out and "--nproc-per-node" in out
