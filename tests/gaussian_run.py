"""The small training run the trainer tests start from: the analytic Gaussian model (exact velocities, 4x4
images), 8 steps, 2 prompts x 4 images, 2 optimizer steps per iteration, the brightness toy reward
(tests/toy_rewards.py); about a second per iteration on one CPU core. Each test sets what it is about."""

import copy

import yaml

from mixgrpo.config import MOVED_KEYS

GAUSSIAN_RUN = {
    "algorithm": "mixgrpo",
    "sampler": {"num_steps": 8, "window": {"size": 2, "tau": 2}},
    "model": {"name": "gaussian", "args": {"size": 4}},
    "rewards": [{"name": "toy_rewards:brightness"}],
    "rollout": {"prompts_per_iteration": 2, "group_size": 4},
    "update": {"steps_per_epoch": 2, "micro_batch_size": 4},
    "optim": {"lr": 0.05},
}

SETTING_SECTIONS = {key.split(".")[0] for key in MOVED_KEYS.values()}
"""The sections that group single settings (run, optim, rollout, ...): `merged` merges them key by key."""


def merged(data: dict, over: dict) -> dict:
    """A copy of a raw config with the top-level keys of `over` replaced (sampler, model, rewards, ... as a whole),
    except that a section of settings (run, optim, ...) in `over` sets only the keys it names."""
    out = {**copy.deepcopy(data), **copy.deepcopy(over)}
    for key in SETTING_SECTIONS & set(over) & set(data):
        out[key] = {**data[key], **over[key]}
    return out


def gaussian_run(**over) -> dict:
    """The run's raw config (for `mixgrpo.config.build_config`), `over` on top (`merged`)."""
    return merged(GAUSSIAN_RUN, over)


def gaussian_run_yaml(**over) -> str:
    """The same as a YAML recipe (for the CLI)."""
    return yaml.safe_dump(gaussian_run(**over), sort_keys=False)
