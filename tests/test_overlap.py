"""Scoring that overlaps the rollout (`rollout_chunks`, `reward_overlap`; mixgrpo/train/overlap.py): the chunks are
scored in a background thread while the next one rolls out, and the run is bit for bit the one scored after the
rollout, whatever the timing of the answers; a resumed overlapped run ends as the uninterrupted one."""

import random
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from gaussian_run import gaussian_run, merged
from mixgrpo.config import ConfigError, build_config
from mixgrpo.rundir import read_metrics
from mixgrpo.train import train
from mixgrpo.train.overlap import chunk_bounds

CALLS = []


def jittery(images, prompts):
    """tests/toy_rewards.brightness after a random delay of 0-50 ms (answers arrive in no fixed rhythm); records the
    thread that called it."""
    CALLS.append((threading.current_thread().name, len(prompts)))
    time.sleep(random.random() * 0.05)  # noqa: S311  (the timing is what varies, on purpose)
    return -(images.mean(dim=(1, 2, 3)) - 1.0).abs()


def _end_state(run):
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    return load_file(run / "final" / "model.safetensors")["mu"], [drop(m) for m in read_metrics(run)]


def _run(tmp_path, name, stop_after=None, resume=False, **over):
    cfg = build_config(gaussian_run(**merged({"rewards": [{"name": "test_overlap:jittery"}], "eval": {"num_prompts": 2},
                                              "run": {"iterations": 3, "out_dir": str(tmp_path / name)},
                                              "rollout": {"prompts_per_iteration": 3}}, over)))
    return train(cfg, resume=resume, progress=False, stop_after=stop_after)


def test_chunks_hold_whole_groups_in_order():
    assert chunk_bounds(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert chunk_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert chunk_bounds(5, 1) == [(0, 5)]


def test_overlapped_scoring_is_bit_identical_to_scoring_after_the_rollout(tmp_path):
    CALLS.clear()
    overlapped = _run(tmp_path, "overlapped", rollout={"chunks": 3})
    # every training chunk (one group of 4 images) was scored in the background thread
    assert [n for name, n in CALLS if name.startswith("scoring")] == [4] * 9
    after = _run(tmp_path, "after", rollout={"chunks": 3, "reward_overlap": False})
    whole = _run(tmp_path, "whole")
    w, m = _end_state(overlapped)
    for other in (after, whole):  # the Gaussian model's velocity of a row does not depend on its batch
        w2, m2 = _end_state(other)
        assert torch.equal(w, w2) and m == m2
    record = read_metrics(overlapped)[0]
    assert record["time/reward_total"] > 0 and record["time/reward_exposed"] >= 0


def test_an_overlapped_run_resumed_ends_equal_to_the_uninterrupted_one(tmp_path):
    reference = _run(tmp_path, "reference", rollout={"chunks": 2})
    _run(tmp_path, "resumed", stop_after=1, rollout={"chunks": 2}, run={"checkpoint_every": 1})
    resumed = _run(tmp_path, "resumed", resume=True, rollout={"chunks": 2}, run={"checkpoint_every": 1})
    w, m = _end_state(resumed)
    w2, m2 = _end_state(reference)
    assert torch.equal(w, w2) and m == m2


@pytest.mark.parametrize("over, field", [({"rollout": {"chunks": 4}}, "rollout.chunks"),
                                         ({"rollout": {"chunks": 0}}, "rollout.chunks"),
                                         ({"rollout": {"chunks": 2}, "parallel": {"rewards_on": "rank0"}},
                                          "rollout.reward_overlap")])
def test_bad_chunking_is_refused_naming_the_field(over, field):
    with pytest.raises(ConfigError, match=field):
        build_config(gaussian_run(**merged({"rollout": {"prompts_per_iteration": 3}}, over)))
