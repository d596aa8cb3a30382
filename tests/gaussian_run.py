"""The small training run the trainer tests start from: the analytic Gaussian model (exact velocities, 4x4
images), 8 steps, 2 prompts x 4 images, 2 optimizer steps per iteration, the brightness toy reward
(tests/toy_rewards.py); about a second per iteration on one CPU core. Each test sets what it is about."""

import copy

import yaml

GAUSSIAN_RUN = {
    "algorithm": "mixgrpo",
    "sampler": {"num_steps": 8, "window": {"size": 2, "tau": 2}},
    "model": {"name": "gaussian", "args": {"size": 4}},
    "rewards": [{"name": "toy_rewards:brightness"}],
    "prompts_per_iteration": 2,
    "group_size": 4,
    "updates_per_iteration": 2,
    "micro_batch_size": 4,
    "lr": 0.05,
}


def gaussian_run(**over) -> dict:
    """The run's raw config (for `mixgrpo.config.build_config`), top-level keys replaced by `over`."""
    return {**copy.deepcopy(GAUSSIAN_RUN), **over}


def gaussian_run_yaml(**over) -> str:
    """The same as a YAML recipe (for the CLI)."""
    return yaml.safe_dump(gaussian_run(**over), sort_keys=False)
