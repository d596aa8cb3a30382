"""Rectified-flow pre-training of the tiny model on the train split of the shapes world.

    mixgrpo pretrain --out runs/pretrain --minutes 30          (or: python -m mixgrpo.pretrain --out ...)

Each step draws `batch_size` prompts uniformly from the train prompt file, parses them and renders a fresh
random layout of each (so the model never sees the same image twice), then takes one AdamW step on

    x0 = 2 * image - 1,  eps ~ N(0, I),  t ~ logit-normal = sigmoid(N(0, 1)),
    x_t = (1 - t) x0 + t eps,            loss = mean |v_theta(x_t, t, c) - (eps - x0)|^2

with the prompt replaced by "" with probability `prompt_dropout`, so that classifier-free guidance works.
The learning rate warms up linearly, stays constant, and decays linearly to 0 over the last `decay_fraction`
of the budget; the budget is `steps` or `minutes`, whichever runs out first (progress = the larger of the two
fractions). An exponential moving average (EMA) of the weights is what gets evaluated and saved.

With task = "edit" it pre-trains the editing base (`tiny_edit`) instead: each step renders `batch_size` fresh
(input, instruction, target) triples of the editing world's train split (`mixgrpo.world.edits.edit_pairs`), the
input image's tokens beside the target's (Kontext-style), x0 = the target, and the instruction (not the input) is
dropped with probability `prompt_dropout`; `init` may then name a text-to-image checkpoint of the same architecture
(the shipped base) to warm-start from. Its evaluation is the held-out edit success (`mixgrpo.world.edit_verifier`:
the edit made and everything else kept) on world:edit_heldout examples.

Every `eval_every` steps the EMA model samples one image per held-out prompt (a fixed subset) with the
default 25-step Euler ODE grid (shift 3), with and without guidance, and the shapes-world verifier scores
them; a sample grid is written to out/samples/. Output: out/model (the checkpoint, `load_tiny(out/model)`),
out/metrics.jsonl, out/curve_loss.png, out/curve_accuracy.png. Evaluation runs in the training process, so
it costs wall time (~5% at the defaults); set eval_every = 0 to skip it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mixgrpo.errors import ConfigError
from mixgrpo.evaluate import generate
from mixgrpo.images import plot_lines, save_grid
from mixgrpo.models.base import FlowModel
from mixgrpo.models.flux import FluxAdapter
from mixgrpo.models.tiny import TinyConfig, build_tiny, load_tiny, save_tiny
from mixgrpo.plan import ode_plan
from mixgrpo.rundir import append_record
from mixgrpo.train.weights import EMA, swapped_weights
from mixgrpo.world.scene import load_prompts, parse_prompt, render_batch


@dataclass
class PretrainConfig:
    steps: int = 20000                 # step budget (the run also stops when `minutes` are used up)
    minutes: float = 30.0              # wall-clock budget
    batch_size: int = 32
    lr: float = 1.2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay_fraction: float = 0.2        # linear decay to 0 over the last 20% of the budget
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1        # probability of training on "" (unconditional) instead of the prompt
    seed: int = 0
    init: str = ""                     # start from this tiny checkpoint (its weights; config must match) instead of
                                       # a random init: continues a run under a fresh schedule
    task: str = "text"                 # "text": text-to-image on world:train; "edit": the editing base on
                                       # (input, instruction, target) triples of mixgrpo.world.edits
    threads: int = 0                   # torch intra-op threads; 0 = torch's default. 1 is faster when other
                                       # jobs share the cores (2 threads on a busy 2-core machine spin-wait)
    log_every: int = 50
    eval_every: int = 1000             # steps between evaluations; 0 = never
    eval_prompts: int = 64             # held-out prompts per evaluation (a fixed, evenly spaced subset)
    eval_guidance: float = 3.0         # classifier-free guidance scale of the guided evaluation
    sample_steps: int = 25             # the default Euler ODE grid ...
    sample_shift: float = 3.0          # ... and its time shift
    model: TinyConfig = field(default_factory=TinyConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = TinyConfig.from_dict(self.model)
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PretrainConfig.{name} = {getattr(self, name)} must be >= 1")
        if self.minutes <= 0:
            raise ConfigError(f"PretrainConfig.minutes = {self.minutes} must be > 0")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"PretrainConfig.prompt_dropout = {self.prompt_dropout} must be in [0, 1)")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"PretrainConfig.decay_fraction = {self.decay_fraction} must be in [0, 1]")
        if self.task not in ("text", "edit"):
            raise ConfigError(f"PretrainConfig.task = {self.task!r} must be 'text' (text-to-image) or 'edit' (the "
                              f"editing base)")
        self.model = dataclasses.replace(self.model, image_inputs=int(self.task == "edit"))


def rectified_flow_loss(model: FlowModel, x0: torch.Tensor, cond: dict, t: torch.Tensor,
                        eps: torch.Tensor) -> torch.Tensor:
    """Scalar loss mean |v(x_t, t) - (eps - x0)|^2 with x_t = (1 - t) x0 + t eps.

    x0, eps: [B, C, H, W]; t: [B] in (0, 1) (sigma: 1 = noise, see docs/notation.md).
    """
    t_ = t.view(-1, *([1] * (x0.dim() - 1)))                                  # [B, 1, 1, 1]
    x_t = (1 - t_) * x0 + t_ * eps                                            # [B, C, H, W]
    v = model(x_t, t, cond)                                                   # [B, C, H, W]
    return (v - (eps - x0)).pow(2).mean()


def learning_rate(cfg: PretrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 as progress goes 1 - decay_fraction -> 1."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay = 1.0 if cfg.decay_fraction == 0 else min(1.0, (1.0 - progress) / cfg.decay_fraction)
    return cfg.lr * warm * max(0.0, decay)


def heldout_accuracy(model: FlowModel, prompts: Sequence[str], images_per_prompt: int = 1, guidance: float = 1.0,
                     seed: int = 0, num_steps: int = 25, shift: float = 3.0, batch_size: int = 128) -> dict:
    """Verifier accuracy of `images_per_prompt` samples per prompt.

    Returns strict (mean strict accuracy over all images), dense (mean dense score), best_of_n (fraction of
    prompts with at least one strictly correct image), mixed (fraction of prompts whose images disagree:
    the groups where GRPO gets a learning signal), and the per-image strict scores [N, n].
    """
    from mixgrpo.world.verifier import verify

    images = generate(model, prompts, ode_plan(num_steps, shift), images_per_prompt, seed, guidance, batch_size)
    result = verify(images.flatten(0, 1), [parse_prompt(p) for p in prompts for _ in range(images_per_prompt)])
    s = result.strict.view(len(prompts), images_per_prompt)
    d = result.dense
    best = s.max(1).values
    mixed = (s.max(1).values != s.min(1).values).float()
    return {"strict": s.mean().item(), "dense": d.mean().item(), "best_of_n": best.mean().item(),
            "mixed": mixed.mean().item(), "scores": s}


def heldout_edit_success(model: FlowModel, examples: Sequence, guidance: float = 1.0, seed: int = 0,
                         num_steps: int = 25, shift: float = 3.0, batch_size: int = 128) -> dict:
    """Edit verifier figures of one sample per held-out editing example (`mixgrpo.prompts.Example`): success (the
    edit made and everything else kept), made, kept, dense; and `images` [N, 3, H, W], `inputs` [N, 3, H, W]."""
    from mixgrpo.images import load_inputs
    from mixgrpo.world.edit_verifier import verify_edit

    inputs = load_inputs(examples, model.image_size())
    prompts = [e.prompt for e in examples]
    images = generate(model, prompts, ode_plan(num_steps, shift), 1, seed, guidance, batch_size, inputs=inputs)[:, 0]
    first = torch.stack([t[0] for t in inputs])
    result = verify_edit(images, first, prompts)
    return {"success": result.success.mean().item(), "made": result.made.mean().item(),
            "kept": result.kept.mean().item(), "dense": result.dense.mean().item(), "images": images, "inputs": first}


def _eval_subset(prompts: list[str], n: int) -> list[str]:
    """`n` evenly spaced prompts (deterministic, covers the whole file, which is ordered by composition)."""
    if n >= len(prompts):
        return prompts
    return [prompts[int(i * len(prompts) / n)] for i in range(n)]


class _Data:
    """Text-to-image: the shapes world's train prompts (parsed once), and the held-out prompts of the evaluations."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.train_prompts = load_prompts("train")
        self.train_scenes = [parse_prompt(p) for p in self.train_prompts]
        self.eval_prompts = _eval_subset(load_prompts("heldout"), cfg.eval_prompts)
        self.describe = f"{len(self.train_prompts)} train prompts"

    def batch(self, model: FlowModel, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        """(x0 [B, 3, H, W] in [-1, 1], cond): `batch_size` prompts drawn uniformly, each rendered as a fresh random
        layout, each prompt replaced by "" with probability `prompt_dropout`."""
        cfg = self.cfg
        idx = rng.integers(len(self.train_prompts), size=cfg.batch_size)
        images = render_batch([self.train_scenes[i] for i in idx], rng, cfg.model.image_size)      # [B, 3, H, W]
        drop = rng.random(cfg.batch_size) < cfg.prompt_dropout
        cond = model.encode_prompts(["" if d else self.train_prompts[i] for i, d in zip(idx, drop)])
        return images * 2 - 1, cond


class _EditData:
    """Editing (task = "edit"): (input, instruction, target) triples of the editing world's train split, drawn fresh
    every step, and an evenly spaced subset of its held-out examples for the evaluations."""

    def __init__(self, cfg: PretrainConfig):
        from mixgrpo.prompts import read_examples

        self.cfg = cfg
        heldout = read_examples("world:edit_heldout")
        self.eval_examples = [heldout[int(i * len(heldout) / cfg.eval_prompts)]
                              for i in range(min(cfg.eval_prompts, len(heldout)))]
        self.eval_prompts = [e.prompt for e in self.eval_examples]
        self.describe = "editing triples of world:edit_train"

    def batch(self, model: FlowModel, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        """(x0 = the targets [B, 3, H, W] in [-1, 1], cond of the instructions and the input images): the
        instruction dropped with probability `prompt_dropout`, never the input image."""
        from mixgrpo.world.edits import edit_pairs

        cfg = self.cfg
        inputs, prompts, images = edit_pairs(int(rng.integers(2**31)), cfg.batch_size, "train", cfg.model.image_size)
        drop = rng.random(cfg.batch_size) < cfg.prompt_dropout
        cond = model.encode_prompts(["" if d else p for p, d in zip(prompts, drop)], [(x,) for x in inputs])
        return images * 2 - 1, cond


class _Evaluation:
    """The held-out evaluation of the EMA weights, each time: verifier accuracy without and with guidance, a sample
    grid (out/samples/step_N.png), the checkpoint (out/model) and a line of metrics.jsonl."""

    title = "held-out strict accuracy"

    def __init__(self, cfg: PretrainConfig, out: Path, data, log: Callable[[str], None]):
        self.cfg, self.out, self.data, self.log = cfg, out, data, log
        self.history: dict[str, list[tuple[float, float]]] = {"strict": [], f"strict_g{cfg.eval_guidance:g}": []}
        self.seconds = 0.0

    def __call__(self, model: FluxAdapter, step: int, minutes: Callable[[], float]) -> None:
        """Evaluate and save `model` (the EMA weights in place) at `step`."""
        t0 = time.perf_counter()
        fields, plain, guided, line = self.measure(model, self.out / "samples" / f"step_{step:06d}.png")
        save_tiny(model, self.out / "model")
        self.seconds += time.perf_counter() - t0
        append_record(self.out / "metrics.jsonl", {"step": step, "minutes": minutes(), **fields})
        self.history["strict"].append((step, plain))
        self.history[f"strict_g{self.cfg.eval_guidance:g}"].append((step, guided))
        self.log(f"eval step {step}: {line} [{time.perf_counter() - t0:.0f} s]")

    def measure(self, model: FluxAdapter, grid: Path) -> tuple[dict, float, float, str]:
        """(metrics.jsonl fields, the curve's value without and with guidance, the log line); writes `grid`."""
        cfg, prompts = self.cfg, self.data.eval_prompts
        plain = heldout_accuracy(model, prompts, 1, 1.0, cfg.seed, cfg.sample_steps, cfg.sample_shift)
        guided = heldout_accuracy(model, prompts, 1, cfg.eval_guidance, cfg.seed, cfg.sample_steps, cfg.sample_shift)
        images = generate(model, prompts[:32], ode_plan(cfg.sample_steps, cfg.sample_shift), 1, cfg.seed,
                          cfg.eval_guidance)[:, 0]
        save_grid(images, grid, nrow=8, scale=2)
        fields = {"eval_strict": plain["strict"], "eval_dense": plain["dense"], "eval_strict_guided": guided["strict"],
                  "eval_dense_guided": guided["dense"], "guidance": cfg.eval_guidance, "eval_prompts": len(prompts)}
        line = (f"held-out strict {plain['strict']:.3f} (guidance {cfg.eval_guidance:g}: {guided['strict']:.3f}), "
                f"dense {plain['dense']:.3f} / {guided['dense']:.3f}")
        return fields, plain["strict"], guided["strict"], line


class _EditEvaluation(_Evaluation):
    """The editing base's evaluation: held-out edit success (`heldout_edit_success`) without and with guidance, and a
    grid of input / result pairs."""

    title = "held-out edit success"

    def measure(self, model: FluxAdapter, grid: Path) -> tuple[dict, float, float, str]:
        cfg, examples = self.cfg, self.data.eval_examples
        plain = heldout_edit_success(model, examples, 1.0, cfg.seed, cfg.sample_steps, cfg.sample_shift)
        guided = heldout_edit_success(model, examples, cfg.eval_guidance, cfg.seed, cfg.sample_steps, cfg.sample_shift)
        pairs = torch.stack([guided["inputs"][:16], guided["images"][:16]], dim=1).flatten(0, 1)  # input, result
        save_grid(pairs, grid, nrow=8, scale=2, captions=[c for p in self.data.eval_prompts[:16] for c in ("input", p)])
        figures = ("success", "made", "kept", "dense")
        fields = {"guidance": cfg.eval_guidance, "eval_prompts": len(examples),
                  **{f"eval_{k}": plain[k] for k in figures}, **{f"eval_{k}_guided": guided[k] for k in figures}}
        line = (f"held-out edit success {plain['success']:.3f} (made {plain['made']:.3f}, kept {plain['kept']:.3f}); "
                f"guidance {cfg.eval_guidance:g}: {guided['success']:.3f} (made {guided['made']:.3f}, kept "
                f"{guided['kept']:.3f})")
        return fields, plain["success"], guided["success"], line


def _initial_model(cfg: PretrainConfig) -> FluxAdapter:
    """A random tiny model of `cfg.model` (torch's global seed set), or the weights of `cfg.init` (the editing base
    may start from a text-to-image checkpoint: it has the same architecture)."""
    model: FluxAdapter = build_tiny(cfg.model)
    if cfg.init:
        start_from = load_tiny(cfg.init, model.text_encoder)
        if dataclasses.replace(start_from.config, image_inputs=cfg.model.image_inputs) != cfg.model:
            raise ConfigError(f"PretrainConfig.init: {cfg.init} has config {start_from.config}, the run has "
                              f"{cfg.model}; pre-train with the checkpoint's model config")
        model.transformer.load_state_dict(start_from.transformer.state_dict())
    return model


def _train_step(cfg: PretrainConfig, model: FluxAdapter, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                x0: torch.Tensor, cond: dict, lr: float) -> float:
    """One AdamW step on the rectified-flow loss at logit-normal t; returns the loss."""
    t = torch.sigmoid(torch.randn(cfg.batch_size))                                       # logit-normal
    loss = rectified_flow_loss(model, x0, cond, t, torch.randn_like(x0))
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return loss.item()


def pretrain(cfg: PretrainConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Pre-train a tiny model from scratch; returns the checkpoint directory out_dir/model (EMA weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    editing = cfg.task == "edit"
    if cfg.eval_every:
        import mixgrpo.world.verifier  # noqa: F401  (fail now, not after the first eval_every steps)
        if editing:
            import mixgrpo.world.edit_verifier  # noqa: F401
    model = _initial_model(cfg)
    # Draws what building a second model as the EMA copy drew before the EMA became `EMA` (trainable weights only), so
    # that the seed gives the same random stream as before: a fixed `--steps` budget reproduces the shipped checkpoint.
    build_tiny(cfg.model, model.text_encoder)
    net = model.transformer.train()
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    ema = EMA(params, cfg.ema_decay)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = _EditData(cfg) if editing else _Data(cfg)
    log(f"pretrain: {sum(p.numel() for p in params.values()) / 1e6:.2f}M parameters, {data.describe}, budget "
        f"{cfg.steps} steps or {cfg.minutes:g} min, out {out}")
    evaluation = (_EditEvaluation if editing else _Evaluation)(cfg, out, data, log)
    start = time.perf_counter()
    minutes = lambda: (time.perf_counter() - start) / 60  # noqa: E731

    def evaluate_ema(step: int) -> None:
        with swapped_weights(net, ema.shadow):
            evaluation(model.eval(), step, minutes)
        net.train()

    step, losses = _train(cfg, model, opt, params, ema, data, rng, evaluate_ema, out, log, start)
    log(f"pretrain: {step} steps in {minutes():.1f} min ({evaluation.seconds / 60:.1f} min evaluating)")
    if cfg.eval_every:
        evaluate_ema(step)
    else:
        with swapped_weights(net, ema.shadow):
            save_tiny(model, out / "model")
    plot_lines({"loss": losses}, out / "curve_loss.png", title="rectified-flow loss", xlabel="step")
    if cfg.eval_every:
        plot_lines(evaluation.history, out / "curve_accuracy.png", title=f"{evaluation.title} (EMA, 25-step ODE)",
                   xlabel="step")
    return out / "model"


def _train(cfg: PretrainConfig, model: FluxAdapter, opt: torch.optim.Optimizer, params: dict, ema: EMA,
           data: _Data | _EditData, rng: np.random.Generator, evaluate: Callable[[int], None], out: Path,
           log: Callable[[str], None], start: float) -> tuple[int, list[tuple[float, float]]]:
    """The steps until the budget (`steps` or `minutes`) runs out, with the EMA, the logged loss (every `log_every`
    steps: a line of metrics.jsonl and of the log) and the evaluations (every `eval_every`); returns the steps
    taken and the logged (step, mean loss) points."""
    step, loss_sum, loss_n, last_log, losses = 0, 0.0, 0, start, []
    while True:
        progress = max(step / cfg.steps, (time.perf_counter() - start) / (60 * cfg.minutes))
        if progress >= 1:
            break
        lr = learning_rate(cfg, step, progress)
        loss_sum += _train_step(cfg, model, opt, list(params.values()), *data.batch(model, rng), lr)
        # EMA with a warm-up (decay (1 + k) / (10 + k) early on), so early evaluations are not the random init.
        ema.update(params, decay=min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        loss_n += 1
        if step % cfg.log_every == 0:
            now = time.perf_counter()
            losses.append((step, loss_sum / loss_n))
            append_record(out / "metrics.jsonl", {"step": step, "minutes": (now - start) / 60,
                                                  "loss": loss_sum / loss_n, "lr": lr})
            log(f"step {step} loss {loss_sum / loss_n:.4f} lr {lr:.2e} {cfg.log_every / (now - last_log):.2f} "
                f"steps/s {(now - start) / 60:.1f} min")
            loss_sum, loss_n, last_log = 0.0, 0, now
        if cfg.eval_every and step % cfg.eval_every == 0:
            evaluate(step)
            last_log = time.perf_counter()
    return step, losses


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m mixgrpo.pretrain --out DIR [--minutes M] [--steps N] [--field value ...]`: every scalar
    field of PretrainConfig is a flag (underscores as dashes)."""
    parser = argparse.ArgumentParser(prog="mixgrpo pretrain", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", required=True, help="output directory (checkpoint in OUT/model)")
    for f in dataclasses.fields(PretrainConfig):
        if f.name != "model":
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return pretrain(PretrainConfig(**args), out, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
