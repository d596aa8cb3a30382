"""Pre-flight: what a training run will need, checked before any model is loaded or called.

A problem found here costs seconds; found by the run, it costs the model load (minutes for FLUX.1), the
first evaluation, or every iteration since the last checkpoint. Each problem is one line naming the fix, and
all of them are reported together:

- packages: every Python package the run imports beyond the core (the model's, LoRA's peft, the reward models'
  transformers, tensorboard when `run.tensorboard: true`, wandb when `run.wandb_project` is set), each missing one named
  with the pip command that installs it (`package_problems`); programs a reward runs (OCR's tesseract) are
  checked by the reward's own `check()`;
- devices: model.args.device and every reward's args.device exist in this torch build and machine;
- rewards: registered names, arguments that fit the factory, and their files (paths, checkpoint keys and
  shapes, checked on the meta device by `reward.check()`, before any reward model is built); a reward with
  `server:` instead: each of its servers answers /health and hosts it with the config's arguments;
- prompts: the train and eval prompt files read;
- the model: its name, arguments that fit its factory, and its own checks (`ModelSpec.check`): the pipeline
  directory, the embedding cache's coverage of the train and eval prompts, its widths and token length
  against the transformer and model.args, prompt lengths against the text encoders.
- the trained steps: every sigma a GRPO run's plans train, over all its iterations, lies in the range the model
  can train (`ModelSpec.trained_sigma_check`; Wan 2.2 A14B trains one expert).

Rank 0 checks and broadcasts what it found, so every rank stops together.
"""

from __future__ import annotations

import inspect

import torch

from mixgrpo import dist, packages
from mixgrpo.config import ConfigError, TrainConfig, getattr_path
from mixgrpo.prompts import read_prompts


class PreflightError(ConfigError):
    """One or more problems found before training; one line each."""


def check_run(cfg: TrainConfig) -> None:
    """Raise PreflightError listing every problem of `cfg` found without loading a model (every rank calls it)."""
    problems = problems_of(cfg) if dist.is_main() else None
    problems = dist.broadcast_object(problems)
    if problems:
        raise PreflightError("\n".join(problems))


def problems_of(cfg: TrainConfig) -> list[str]:
    missing = package_problems(cfg)
    if missing:  # the checks below import the model's and the rewards' packages
        return missing
    problems = device_problems("model.args.device", cfg.model.args.get("device"))
    for i, spec in enumerate(cfg.rewards):
        if not spec.servers:  # a served reward's device is the server's
            problems += device_problems(f"rewards[{i}].args.device", spec.args.get("device"))
    problems += _reward_problems(cfg)
    prompts: dict[str, tuple[str, list[str]]] = {}
    for split, field, count in (("train", "rollout.prompts", None), ("eval", "eval.prompts", cfg.eval.num_prompts)):
        source = getattr_path(cfg, field)
        if count == 0:
            continue  # no evaluation: the eval prompts are never read
        try:
            prompts[split] = (source, read_prompts(source)[:count])
        except ValueError as e:
            problems.append(f"{field}: {e}")
    problems += _model_problems(cfg, prompts)
    return problems + _trained_sigma_problems(cfg)


REWARD_MODULES = {name: ("transformers",) for name in ("hps", "imagereward", "pickscore", "clipscore", "aesthetic")}
"""The Python modules a registered reward imports (the others need nothing beyond the core)."""


def package_needs(cfg: TrainConfig, training: bool = True) -> list[tuple[str, str]]:
    """(import name, what needs it) for every package beyond the core that a run of `cfg` imports (training
    False: only what loading its model needs, for sample / eval / export); a user's own model or reward
    ("package.module:factory") names no package here."""
    from mixgrpo.models import MODELS

    model = cfg.model.name
    modules = MODELS.spec(model).modules if model in MODELS else ()  # the model's description names them
    needs = [(m, f"model {model!r}") for m in modules]
    if cfg.lora.rank > 0:
        needs.append(("peft", f"LoRA (lora.rank = {cfg.lora.rank})"))
    if not training:
        return needs
    for reward in cfg.rewards:
        needs += [(m, f"reward {reward.name!r}") for m in REWARD_MODULES.get(reward.name, ())]
    if cfg.run.tensorboard:
        needs.append(("tensorboard", "run.tensorboard: true (set run.tensorboard=false to go without)"))
    if cfg.run.wandb_project:
        needs.append(("wandb", f"run.wandb_project = {cfg.run.wandb_project!r}"))
    return needs


def package_problems(cfg: TrainConfig, training: bool = True) -> list[str]:
    """One line naming every missing package of `package_needs`, what needs it, and the pip command."""
    needs = package_needs(cfg, training)
    absent = packages.missing(m for m, _ in needs)
    if not absent:
        return []
    listed = "; ".join(f"{m} ({', '.join(dict.fromkeys(why for n, why in needs if n == m))})" for m in absent)
    return [f"missing Python packages: {listed}: {packages.install_command(absent)}"]


def device_problems(where: str, value) -> list[str]:
    """A device name torch does not know (a typo), or a CUDA device named where this torch has none (a CPU-only
    build, no GPU visible, or a wrong index)."""
    if not isinstance(value, str):
        return []
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return [f"{where} = {value!r} is not a device: use cpu, cuda (each rank's own GPU) or cuda:N"]
    if not value.startswith("cuda"):
        return []
    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
        return [f"{where} = {value!r}, but torch {torch.__version__} has no CUDA device ({why}): set {where}=cpu, "
                f"or run on a machine with a GPU and a CUDA build of torch"]
    index = torch.device(value).index
    if index is not None and index >= torch.cuda.device_count():
        return [f"{where} = {value!r}, but only {torch.cuda.device_count()} GPU(s) are visible: use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}, or plain cuda (each rank's own GPU)"]
    return []


def _reward_problems(cfg: TrainConfig) -> list[str]:
    import mixgrpo.rewards  # noqa: F401  (registers the rewards)
    from mixgrpo.rewards import RewardError, build_reward

    problems = _server_problems(cfg)
    for i, spec in enumerate(cfg.rewards):
        if spec.servers:
            continue
        try:
            reward = build_reward(spec.name, spec.args, spec.frames)  # lazy: reads no file, builds no model
        except ValueError as e:
            problems.append(f"rewards[{i}]: {e}")
            continue
        check = getattr(reward, "check", None)
        if callable(check):
            try:
                check()
            except RewardError as e:
                problems.append(f"rewards[{i}]: {e}")
    return problems


def _server_problems(cfg: TrainConfig) -> list[str]:
    """Each reward server the config names answers /health (with the token) and hosts its rewards with the
    config's name, arguments and frame aggregation."""
    from mixgrpo.rewards.base import RewardError
    from mixgrpo.rewards.remote import ServerClient, ServerSetupError, hosted_match, token_from

    urls = list(dict.fromkeys(url for spec in cfg.rewards for url in spec.servers))
    if not urls:
        return []
    try:
        token = token_from(cfg.scoring.server_token_env)
    except ValueError as e:
        return [str(e)]
    problems, hosted = [], {}
    for url in urls:
        try:
            hosted[url] = ServerClient(url, cfg.scoring.server_timeout, token).health()["rewards"]
        except (RewardError, ServerSetupError, TimeoutError, ConnectionError) as e:
            problems.append(f"{e}; start it (mixgrpo serve-rewards, docs/rewards.md) or fix the reward's server:")
    for i, spec in enumerate(cfg.rewards):
        for url in spec.servers:
            if url in hosted:
                label, why = hosted_match(spec.name, spec.args, spec.frames, hosted[url])
                if label is None:
                    problems.append(f"rewards[{i}] ({spec.name}): reward server {url} cannot score it: {why}; serve "
                                    f"it there (mixgrpo serve-rewards --reward ...) or change the config")
    return problems


def _model_problems(cfg: TrainConfig, prompts: dict[str, tuple[str, list[str]]]) -> list[str]:
    from mixgrpo.models import MODELS

    try:
        spec = MODELS.spec(cfg.model.name)
    except ValueError as e:
        return [f"model.name: {e}"]
    factory = spec.factory
    try:
        inspect.signature(factory).bind(**cfg.model.args)
    except TypeError as e:
        return [f"model.args do not fit model {cfg.model.name!r} ({e}); its arguments: "
                f"{', '.join(inspect.signature(factory).parameters)}"]
    except ValueError:  # a callable without a signature: nothing to check
        pass
    return spec.check(cfg.model.args, prompts) if spec.check is not None else []


def _trained_sigma_problems(cfg: TrainConfig) -> list[str]:
    """The model's check of the sigmas its run's plans train, for an objective that trains stored transitions (the
    forward-process objectives draw their sigmas at run time)."""
    from mixgrpo.models import MODELS
    from mixgrpo.objectives import OBJECTIVES
    from mixgrpo.plan import build_plan

    try:
        check = MODELS.spec(cfg.model.name).trained_sigma_check
    except ValueError:
        return []  # an unknown model name: named by _model_problems
    if check is None or not OBJECTIVES.get(cfg.objective).stores_transitions:
        return []
    trained: dict[float, int] = {}
    for iteration in range(cfg.run.iterations):
        for step in build_plan(cfg.sampler, iteration=iteration, seed=cfg.run.seed).steps:
            if step.train:
                trained.setdefault(step.sigma, iteration)
    return check(cfg.model.args, trained)
