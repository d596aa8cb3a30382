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
from mixgrpo.images import plot_lines, save_grid
from mixgrpo.models.base import FlowModel
from mixgrpo.models.flux import FluxAdapter
from mixgrpo.models.tiny import TinyConfig, build_tiny, load_tiny, save_tiny
from mixgrpo.evaluate import generate
from mixgrpo.plan import ode_plan
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


def pretrain(cfg: PretrainConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Pre-train a tiny model from scratch; returns the checkpoint directory out_dir/model (EMA weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.eval_every:
        import mixgrpo.world.verifier  # noqa: F401  (fail now, not after the first eval_every steps)
        if cfg.task == "edit":
            import mixgrpo.world.edit_verifier  # noqa: F401
    model: FluxAdapter = build_tiny(cfg.model)
    if cfg.init:
        start_from = load_tiny(cfg.init, model.text_encoder)
        # the editing base has the text-to-image one's architecture: it may start from it
        if dataclasses.replace(start_from.config, image_inputs=cfg.model.image_inputs) != cfg.model:
            raise ConfigError(f"PretrainConfig.init: {cfg.init} has config {start_from.config}, the run has "
                              f"{cfg.model}; pre-train with the checkpoint's model config")
        model.transformer.load_state_dict(start_from.transformer.state_dict())
    ema: FluxAdapter = build_tiny(cfg.model, model.text_encoder)
    ema.transformer.load_state_dict(model.transformer.state_dict())
    net = model.transformer.train()
    params = [p for p in net.parameters() if p.requires_grad]
    ema_params = list(ema.transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_params = sum(p.numel() for p in params)

    editing = cfg.task == "edit"
    if editing:
        from mixgrpo.prompts import read_examples
        from mixgrpo.world.edits import edit_pairs

        train_prompts, train_scenes = [], []  # drawn fresh every step
        heldout = read_examples("world:edit_heldout")
        eval_examples = [heldout[int(i * len(heldout) / cfg.eval_prompts)]
                         for i in range(min(cfg.eval_prompts, len(heldout)))]
        eval_prompts = [e.prompt for e in eval_examples]
    else:
        train_prompts = load_prompts("train")
        train_scenes = [parse_prompt(p) for p in train_prompts]
        eval_prompts = _eval_subset(load_prompts("heldout"), cfg.eval_prompts)
    log(f"pretrain: {n_params / 1e6:.2f}M parameters, " + ("editing triples of world:edit_train" if editing else
        f"{len(train_prompts)} train prompts") + f", budget {cfg.steps} steps or {cfg.minutes:g} min, out {out}")

    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
    history: dict[str, list[tuple[float, float]]] = {"loss": [], "strict": [], f"strict_g{cfg.eval_guidance:g}": []}
    start = time.perf_counter()
    eval_time = 0.0
    loss_sum, loss_n, last_log = 0.0, 0, start

    def evaluate_edits(step: int) -> None:
        nonlocal eval_time
        t0 = time.perf_counter()
        ema.eval()
        plain = heldout_edit_success(ema, eval_examples, 1.0, cfg.seed, cfg.sample_steps, cfg.sample_shift)
        guided = heldout_edit_success(ema, eval_examples, cfg.eval_guidance, cfg.seed, cfg.sample_steps,
                                      cfg.sample_shift)
        pairs = torch.stack([guided["inputs"][:16], guided["images"][:16]], dim=1).flatten(0, 1)  # input, result
        save_grid(pairs, out / "samples" / f"step_{step:06d}.png", nrow=8, scale=2,
                  captions=[c for p in eval_prompts[:16] for c in ("input", p)])
        save_tiny(ema, out / "model")
        eval_time += time.perf_counter() - t0
        row = {"step": step, "minutes": (time.perf_counter() - start) / 60, "guidance": cfg.eval_guidance,
               "eval_prompts": len(eval_examples),
               **{f"eval_{k}": plain[k] for k in ("success", "made", "kept", "dense")},
               **{f"eval_{k}_guided": guided[k] for k in ("success", "made", "kept", "dense")}}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        history["strict"].append((step, plain["success"]))
        history[f"strict_g{cfg.eval_guidance:g}"].append((step, guided["success"]))
        log(f"eval step {step}: held-out edit success {plain['success']:.3f} (made {plain['made']:.3f}, kept "
            f"{plain['kept']:.3f}); guidance {cfg.eval_guidance:g}: {guided['success']:.3f} (made "
            f"{guided['made']:.3f}, kept {guided['kept']:.3f}) [{time.perf_counter() - t0:.0f} s]")

    def evaluate(step: int) -> None:
        nonlocal eval_time
        if editing:
            return evaluate_edits(step)
        t0 = time.perf_counter()
        ema.eval()
        plain = heldout_accuracy(ema, eval_prompts, 1, 1.0, cfg.seed, cfg.sample_steps, cfg.sample_shift)
        guided = heldout_accuracy(ema, eval_prompts, 1, cfg.eval_guidance, cfg.seed, cfg.sample_steps,
                                  cfg.sample_shift)
        grid = generate(ema, eval_prompts[:32], ode_plan(cfg.sample_steps, cfg.sample_shift), 1, cfg.seed,
                        cfg.eval_guidance)[:, 0]
        save_grid(grid, out / "samples" / f"step_{step:06d}.png", nrow=8, scale=2)
        save_tiny(ema, out / "model")
        eval_time += time.perf_counter() - t0
        minutes = (time.perf_counter() - start) / 60
        row = {"step": step, "minutes": minutes, "eval_strict": plain["strict"], "eval_dense": plain["dense"],
               "eval_strict_guided": guided["strict"], "eval_dense_guided": guided["dense"],
               "guidance": cfg.eval_guidance, "eval_prompts": len(eval_prompts)}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        history["strict"].append((step, plain["strict"]))
        history[f"strict_g{cfg.eval_guidance:g}"].append((step, guided["strict"]))
        log(f"eval step {step}: held-out strict {plain['strict']:.3f} (guidance {cfg.eval_guidance:g}: "
            f"{guided['strict']:.3f}), dense {plain['dense']:.3f} / {guided['dense']:.3f} "
            f"[{time.perf_counter() - t0:.0f} s]")

    step = 0
    while True:
        progress = max(step / cfg.steps, (time.perf_counter() - start) / (60 * cfg.minutes))
        if progress >= 1:
            break
        if editing:  # inputs, targets [B, 3, H, W]; the instruction dropped, never the input image
            inputs, prompts, images = edit_pairs(int(rng.integers(2**31)), cfg.batch_size, "train",
                                                 cfg.model.image_size)
            drop = rng.random(cfg.batch_size) < cfg.prompt_dropout
            cond = model.encode_prompts(["" if d else p for p, d in zip(prompts, drop)], [(x,) for x in inputs])
        else:
            idx = rng.integers(len(train_prompts), size=cfg.batch_size)
            images = render_batch([train_scenes[i] for i in idx], rng, cfg.model.image_size)  # [B, 3, H, W]
            drop = rng.random(cfg.batch_size) < cfg.prompt_dropout
            cond = model.encode_prompts(["" if d else train_prompts[i] for i, d in zip(idx, drop)])
        x0 = images * 2 - 1
        t = torch.sigmoid(torch.randn(cfg.batch_size))                                       # logit-normal
        loss = rectified_flow_loss(model, x0, cond, t, torch.randn_like(x0))
        lr = learning_rate(cfg, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        # EMA with a warm-up (decay (1 + k) / (10 + k) early on), so early evaluations are not the random init.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1
        loss_sum += loss.item()
        loss_n += 1
        if step % cfg.log_every == 0:
            now = time.perf_counter()
            mean_loss = loss_sum / loss_n
            history["loss"].append((step, mean_loss))
            metrics.write(json.dumps({"step": step, "minutes": (now - start) / 60, "loss": mean_loss, "lr": lr})
                          + "\n")
            metrics.flush()
            log(f"step {step} loss {mean_loss:.4f} lr {lr:.2e} {cfg.log_every / (now - last_log):.2f} steps/s "
                f"{(now - start) / 60:.1f} min")
            loss_sum, loss_n, last_log = 0.0, 0, now
        if cfg.eval_every and step % cfg.eval_every == 0:
            evaluate(step)
            last_log = time.perf_counter()
    total = (time.perf_counter() - start) / 60
    log(f"pretrain: {step} steps in {total:.1f} min ({eval_time / 60:.1f} min evaluating)")
    if cfg.eval_every:
        evaluate(step)
    else:
        save_tiny(ema, out / "model")
    metrics.close()
    plot_lines({"loss": history["loss"]}, out / "curve_loss.png", title="rectified-flow loss", xlabel="step")
    if cfg.eval_every:
        plot_lines({k: v for k, v in history.items() if k != "loss"}, out / "curve_accuracy.png",
                   title=("held-out edit success" if editing else "held-out strict accuracy") + " (EMA, 25-step ODE)",
                   xlabel="step")
    return out / "model"


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
