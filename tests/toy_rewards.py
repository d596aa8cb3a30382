"""User rewards for tests, named in configs as "toy_rewards:NAME" (tests/ is on sys.path)."""

import torch


def brightness(images, prompts, target: float = 1.0):
    """Higher when the image is closer to a uniform grey level `target` (an easy, smooth reward)."""
    return -(images.mean(dim=(1, 2, 3)) - target).abs()


def flaky(images, prompts, fail_every: int = 2):
    """Returns NaN for every `fail_every`-th image: exercises the skipped-group policy."""
    scores = images.mean(dim=(1, 2, 3)).clone()
    scores[::fail_every] = float("nan")
    return scores


def broken(images, prompts):
    from mixgrpo.rewards import RewardError

    raise RewardError("the reward server is down")


def constant(images, prompts):
    return torch.zeros(images.shape[0])


def strings(images, prompts):
    """A reward with a bug: it returns text."""
    return ["good"] * images.shape[0]


NOT_A_FUNCTION = 3  # named as a reward by mistake


def keep_input(images, prompts, inputs):
    """Higher the closer each image is to its example's input image (a reward that takes inputs)."""
    return -(images - inputs.to(images.device)).abs().mean(dim=(1, 2, 3))


keep_input.takes_inputs = True
