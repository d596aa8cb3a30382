"""A model from a path: what `mixgrpo sample`, `mixgrpo eval` and `mixgrpo export` load, decided in one place.

A path names one of
- a run directory (RUN, with its config.yaml): the run's base model with the fine-tuned weights of RUN/final, or of
  its newest complete checkpoint when the run has not finished (a run still training may rotate that checkpoint
  away while it is read: the next newest is taken);
- a checkpoint of a run (RUN/checkpoints/iter_N) or an export inside it (RUN/final): the run's base with these
  weights;
- "base" (or None): the base model of the run among the command's paths, else the registered default of the
  command's model name;
- a model directory of that model name (a pipeline directory, or the tiny model's own export).

The run's config, with the command's `key=value` overrides (a run whose base model moved: model.args.path=...), is
`ModelLoader.cfg`; the models of one run share its text encoders (a fine-tuned model and its base in hybrid
inference). The weights go in through `mixgrpo.export.load_run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from mixgrpo.checkpoint import CheckpointRotated
from mixgrpo.errors import UsageError
from mixgrpo.export import final_or_latest, load_run, run_config, run_of
from mixgrpo.models.base import FlowModel, build_model


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class NoTextEncoder:
    """Stands in for the text encoders where only the weights are read (export): T5 & co. are never loaded."""

    def encode(self, prompts):
        raise RuntimeError("this model was loaded without text encoders (for its weights only)")


class ModelLoader:
    """Loads the models of one command from their paths (see the module docstring).

    paths: every model path of the command; the first that belongs to a run names the run (`run`, `cfg`).
    model: the registered model name of plain model directories and of "base" without a run.
    overrides: `key.sub=value` overrides of the run's config.yaml (the command's --set).
    device (default: cuda when available), dtype, resolution (height, width): for every model loaded.
    ema: a checkpoint's EMA weights when it has them. text_encoders: False loads the weights alone (export)."""

    def __init__(self, paths: Sequence[str | None], model: str = "tiny", overrides: Sequence[str] = (),
                 device: str | None = None, dtype: str | None = None, resolution: tuple[int, int] | None = None,
                 ema: bool = True, text_encoders: bool = True):
        self.paths = list(paths)
        self.model_name, self.overrides = model, tuple(overrides)
        self.device, self.dtype, self.resolution = device or default_device(), dtype, resolution
        self.ema, self.text_encoders = ema, text_encoders
        self.run = next((r for r in map(run_of, self.paths) if r is not None), None)
        self.cfg = run_config(self.run, self.overrides) if self.run is not None else None
        self._shared: dict[Path, object] = {}  # run -> its text encoder, shared by its models

    def load(self, path: str | None, prompts: Sequence[str] = (), guidance: float = 1.0) -> FlowModel:
        """The model of `path`, in eval mode. prompts, guidance: what it will be asked to encode (a run's
        embedding cache that lacks any of them gives way to the model's own text encoders)."""
        if path in (None, "base"):
            if self.run is not None:
                return self._load_run(self.run, None, prompts, guidance)
            return self._base()
        p = Path(path).expanduser()
        run = run_of(p)
        if run is not None and p != run:
            return self._load_run(run, p, prompts, guidance)
        if run is not None:
            return self.load_newest(run, final_or_latest, prompts, guidance)[0]
        if not p.exists():
            raise UsageError(f"model path {path!r} does not exist: give a model directory or a run directory")
        from safetensors import SafetensorError

        try:
            return build_model(self.model_name, {"path": str(p)}, self.device, self.dtype, self.resolution)
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
            raise UsageError(f"cannot load model {self.model_name!r} from {path!r} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}): the files are corrupted or from another model or size; "
                             f"pass the matching --model, or the run directory itself") from e

    def load_newest(self, run: Path, pick: Callable[[Path], Path], prompts: Sequence[str] = (),
                    guidance: float = 1.0, retry: bool = True) -> tuple[FlowModel, Path]:
        """(model, weights): the run's model with the weights `pick(run)` names (RUN/final or a checkpoint). A run
        still training rotates its old checkpoints away, maybe during the read: then (retry) `pick` is asked
        again, up to three times."""
        tries = 0
        while True:
            weights = pick(run)
            try:
                return self._load_run(run, weights, prompts, guidance), weights
            except CheckpointRotated:
                tries += 1
                if not retry or tries == 3:
                    raise
                print(f"{weights.name} was rotated away by the run training into {run} while it was read: "
                      f"loading the newest checkpoint instead", flush=True)

    def _base(self) -> FlowModel:
        """--model's registered default, for "base" without a run."""
        try:
            return build_model(self.model_name, {}, self.device, self.dtype, self.resolution)
        except ValueError as e:
            if "path" not in str(e):
                raise
            raise UsageError(f"'base' is the base model of a run, and no run directory was given; model "
                             f"{self.model_name!r} has no built-in base: give its pipeline directory instead of "
                             f"'base', or a run directory") from None

    def _load_run(self, run: Path, weights: Path | None, prompts: Sequence[str], guidance: float) -> FlowModel:
        if weights is not None and weights.name != "final":
            print(f"{run}: loading the weights of {weights}", flush=True)
        cache = run_config(run, self.overrides).model.args.get("embedding_cache")
        if self.text_encoders:
            args = self._cache_args(cache, prompts, guidance)
            text_encoder = self._shared.get(run)
        else:  # the weights are all that is read: neither the text encoders nor the embedding cache are needed
            args = {"embedding_cache": None} if cache else None
            text_encoder = NoTextEncoder()
        model = load_run(run, weights, self.device, self.dtype, self.resolution, text_encoder=text_encoder, args=args,
                         ema=self.ema, overrides=self.overrides)
        if self.text_encoders:
            self._shared.setdefault(run, model.text_encoder if hasattr(model, "text_encoder") else None)
        return model

    @staticmethod
    def _cache_args(cache: str | None, prompts: Sequence[str], guidance: float) -> dict:
        """model.args overrides that load the text encoders instead of a run's embedding cache that is not here (a
        run that moved without it) or lacks some of the prompts (it serves the run's own)."""
        if cache and not Path(cache).expanduser().is_dir():
            print(f"the run's embedding cache {cache} is not here: loading the text encoders instead (--set "
                  f"model.args.embedding_cache=PATH uses the cache where it is now)", flush=True)
            return {"embedding_cache": None}
        if cache:
            from mixgrpo.models.text import EmbeddingCache

            wanted = set(prompts) | ({""} if guidance != 1.0 else set())
            missing = [p for p in wanted if p not in EmbeddingCache(cache)]
            if missing:
                print(f"{len(missing)} prompts are not in the run's embedding cache {cache}: loading the text "
                      f"encoders instead", flush=True)
                return {"embedding_cache": None}
        return {}
