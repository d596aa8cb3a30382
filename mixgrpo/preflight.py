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
- prompts: the train and eval prompt files read; their input images (editing, image-to-video) exist and are images,
  and they fit the model: images exactly when it is image-conditioned (`ModelSpec.image_inputs`), no more per
  example than it takes, and a reward that compares with the inputs (`takes_inputs`) only where there are some;
- the model: its name, arguments that fit its factory, and its own checks (`ModelSpec.check`): the pipeline
  directory, the embedding cache's coverage of the train and eval prompts, its widths and token length
  against the transformer and model.args, prompt lengths against the text encoders.
- the teachers of on-policy distillation (`distill.teachers`): each path holds a model (a run, a checkpoint, an
  export), a run's model is the student's, each teacher's prompts are read and hold training prompts, and every
  training prompt has a teacher unless a reward term trains it too;
- the trained steps: every sigma a GRPO run's plans train, over all its iterations, lies in the range the model
  can train (`ModelSpec.trained_sigma_check`; Wan 2.2 A14B trains one expert).

Rank 0 checks and broadcasts what it found, so every rank stops together.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from mixgrpo import dist, packages
from mixgrpo.config import ConfigError, TrainConfig, getattr_path
from mixgrpo.prompts import Example, read_examples, read_prompts


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
    examples: dict[str, tuple[str, list[Example]]] = {}
    for split, field, count in (("train", "rollout.prompts", None), ("eval", "eval.prompts", cfg.eval.num_prompts)):
        source = getattr_path(cfg, field)
        if count == 0:
            continue  # no evaluation: the eval prompts are never read
        try:
            examples[split] = (source, read_examples(source)[:count])
        except ValueError as e:
            problems.append(f"{field}: {e}")
    prompts = {k: (src, [e.prompt for e in ex]) for k, (src, ex) in examples.items()}
    problems += input_problems(cfg.model.name, examples, cfg.rewards)
    problems += _model_problems(cfg, prompts)
    problems += _teacher_problems(cfg, prompts["train"][1] if "train" in prompts else None)
    return problems + _trained_sigma_problems(cfg)


def input_problems(model: str, examples: dict[str, tuple[str, list[Example]]], specs: list = ()) -> list[str]:
    """The examples' input images against the model and the rewards: each file opens as an image, an
    image-conditioned model gets images and a text-to-image model none, no example has more than the model takes,
    and a reward that compares with the inputs (`takes_inputs`) has some (specs: the rewards' configs)."""
    from PIL import Image

    from mixgrpo.models import MODELS

    wanted = MODELS.spec(model).image_inputs if model in MODELS.names() else None
    problems = []
    for split, (source, items) in examples.items():
        most = max((len(e.images) for e in items), default=0)
        if wanted is not None and wanted and not most:
            problems.append(f"{split}_prompts: model {model!r} edits input images ({wanted} per example) but {source} "
                            f"gives none: give an example file with images (docs/prompts.md), e.g. world:edit_{split}")
        elif wanted is not None and not wanted and most:
            problems.append(f"{split}_prompts: {source} gives input images but model {model!r} is text-to-image: "
                            f"use an editing model (e.g. tiny_edit), or a prompt file without images")
        elif wanted and most > wanted:
            problems.append(f"{split}_prompts: an example of {source} has {most} input images, model {model!r} takes "
                            f"at most {wanted}: give each example at most {wanted}")
        for path in dict.fromkeys(p for e in items for p in e.images):
            try:
                with Image.open(path) as img:
                    img.size  # noqa: B018  (the header parses)
            except (OSError, ValueError) as e:
                problems.append(f"{split}_prompts: input image {path!r} of {source} is not an image Pillow can read "
                                f"({type(e).__name__}): give PNG, JPEG or WebP files")
                break
        if not most:
            for i, spec in enumerate(specs):
                if _takes_inputs(spec):
                    problems.append(f"rewards[{i}] ({spec.name}) compares each result with its example's input "
                                    f"image, but the {split} prompts ({source}) have none: drop it, or train an "
                                    f"editing model on examples with images")
    return problems


def _takes_inputs(spec) -> bool:
    """Whether a reward's config names one that compares with input images (built lazily: it reads no file and
    loads no model, so a served reward is built here too; False when it cannot be built: `_reward_problems` says why,
    or, served, the server's /health)."""
    import mixgrpo.rewards  # noqa: F401  (registers the rewards)
    from mixgrpo.rewards import build_reward

    try:
        return bool(getattr(build_reward(spec.name, spec.args, spec.frames), "takes_inputs", False))
    except ValueError:
        return False


def package_needs(cfg: TrainConfig, training: bool = True) -> list[tuple[str, str]]:
    """(import name, what needs it) for every package beyond the core that a run of `cfg` imports (training
    False: only what loading its model needs, for sample / eval / export); a user's own model or reward
    ("package.module:factory") names no package here."""
    from mixgrpo.models import MODELS

    needs = [(m, f"model {cfg.model.name!r}") for m in MODELS.modules(cfg.model.name)]  # its description names them
    if cfg.lora.rank > 0:
        needs.append(("peft", f"LoRA (lora.rank = {cfg.lora.rank})"))
    if not training:
        return needs
    from mixgrpo.rewards import REWARDS

    for reward in cfg.rewards:
        needs += [(m, f"reward {reward.name!r}") for m in REWARDS.modules(reward.name)]
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


MACHINE_ARGS = ("device", "dtype", "embedding_cache")
"""model.args that say where and how a model runs, not what it is: a teacher may differ from the student in them."""


def _teacher_problems(cfg: TrainConfig, train_prompts: list[str] | None) -> list[str]:
    """One line per problem of `cfg.distill.teachers` (module docstring). train_prompts: the run's training prompts
    (None when they cannot be read: said already)."""
    from mixgrpo.config import load_config
    from mixgrpo.rundir import CONFIG

    problems: list[str] = []
    taught: set[str] = set()
    teaches_all = False
    for i, spec in enumerate(cfg.distill.teachers):
        where = f"distill.teachers[{i}]"
        path = Path(spec.path).expanduser()
        # its run: the run directory, the run of an export in it (RUN/final), or of a checkpoint (RUN/checkpoints/N)
        run = next((p for p in (path, path.parent, path.parent.parent) if (p / CONFIG).is_file()), None)
        if not path.exists():
            problems.append(f"{where}.path: {spec.path} does not exist: give a run directory, a checkpoint of a run "
                            f"or an exported model directory (RUN/final)")
        elif run is not None:
            theirs, ours = _model_identity(load_config(run / CONFIG, saved=True).model), _model_identity(cfg.model)
            if not _same_model(theirs, ours):
                problems.append(f"{where}.path: run {run} trains {_describe(*theirs)} and the student is "
                                f"{_describe(*ours)}: a teacher must be the student's own model, since it reads the "
                                f"student's states and conditioning")
        elif not any(path.glob("*.safetensors")):
            problems.append(f"{where}.path: {spec.path} holds no model (no run's config.yaml, no exported weights): "
                            f"give a run directory, a checkpoint of a run or an exported model directory (RUN/final)")
        if not spec.prompts:
            teaches_all = True
            continue
        try:
            prompts = set(read_prompts(spec.prompts))
        except ValueError as e:
            problems.append(f"{where}.prompts: {e}")
            continue
        if train_prompts is not None and not prompts & set(train_prompts):
            problems.append(f"{where}.prompts: {spec.prompts} holds none of the training prompts "
                            f"({cfg.rollout.prompts}), so this teacher would teach nothing: give the prompts it teaches "
                            f"as rollout.prompts writes them")
        taught |= prompts
    if train_prompts is not None and cfg.distill.teachers and not teaches_all and cfg.distill.reward_weight == 0:
        untaught = [p for p in train_prompts if p not in taught]
        if untaught:
            problems.append(f"distill.teachers: {len(untaught)} of the {len(train_prompts)} training prompts (e.g. "
                            f"{untaught[0]!r}) have no teacher and no reward term: add them to a teacher's prompts, "
                            f"add a teacher with prompts '' (every prompt), or set distill.reward_weight > 0")
    return problems


def _model_identity(model) -> tuple[str, dict]:
    """(name, args without MACHINE_ARGS) of a ModelConfig: what a teacher must share with the student."""
    return model.name, {k: v for k, v in model.args.items() if k not in MACHINE_ARGS}


def _same_model(a: tuple[str, dict], b: tuple[str, dict]) -> bool:
    """Whether two `_model_identity`s name one model: the same name and arguments, where a file argument (the base's
    pipeline directory) may name the same files at another place (`mixgrpo.runfiles.identity`)."""
    from mixgrpo.runfiles import PATH_ARGS, identity

    (name_a, args_a), (name_b, args_b) = a, b
    if name_a != name_b or args_a.keys() != args_b.keys():
        return False
    return all(args_a[k] == args_b[k] or (k in PATH_ARGS and isinstance(args_a[k], str) and isinstance(args_b[k], str)
                                          and identity(k, args_a[k]).get("sha256") is not None
                                          and identity(k, args_a[k]).get("sha256") == identity(k, args_b[k]).get("sha256"))
               for k in args_a)


def _describe(name: str, args: dict) -> str:
    return f"model {name!r}" + (f" ({', '.join(f'{k}={v}' for k, v in args.items())})" if args else "")


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
