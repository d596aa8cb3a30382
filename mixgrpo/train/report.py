"""What a run reports to a person: one progress line per iteration, and summary.md with its two curves at the end.

The summary is a function of the run directory's files only (config.yaml, metrics.jsonl, eval.jsonl), so a
resumed run summarises all of its launches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mixgrpo.config import migrate, read_yaml
from mixgrpo.fileio import writing
from mixgrpo.images import plot_panels
from mixgrpo.reference import training_minutes
from mixgrpo.rundir import CONFIG, EVALS, SUMMARY, read_metrics, read_records
from mixgrpo.train.control import no_signal_message


def progress_line(record: dict[str, Any], trained: list[str], held_out: dict[str, float], iterations: int,
                  eta: float) -> str:
    """One line per iteration: the trained rewards (labels `trained`), the latest held-out figures, the loss
    and KL in scientific notation (they are often ~1e-5), clipping, speed and ETA (seconds)."""
    rewards = " ".join(f"{label} {record[f'reward/{label}']:.4f}" for label in trained)
    window = "all" if record["window_start"] is None else f"{record['window_start']}-{record['window_end'] - 1}"
    parts = [f"it {record['iteration']:4d}/{iterations}", rewards, f"window {window}", f"nfe {record['nfe_rollout']}",
             f"loss {record.get('loss', 0.0):+.2e}"]
    if "kl_to_base" in record:
        parts.append(f"kl {record['kl_to_base']:.2e}")
    if "clip_fraction" in record:
        parts.append(f"clip {record['clip_fraction']:.3f}")
    if held_out:
        parts.append("held-out " + " ".join(f"{k[5:]} {v:.3f}" for k, v in held_out.items()))
    parts.append(f"{record['time/iteration']:5.2f} s/it | ETA {_format_eta(eta)}")
    return " | ".join(parts)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def write_curves(run_dir: Path) -> None:
    """The two curves, from the run directory's files: reward_curve.png (training reward per iteration, one panel
    per reward, held-out evaluations as points; once an iteration is logged) and eval_curve.png (every held-out
    metric against iterations and training minutes). The trainer redraws them at every evaluation, so a long run
    can be watched without TensorBoard."""
    cfg = migrate(read_yaml(run_dir / CONFIG))
    metrics = read_metrics(run_dir)
    evals = read_records(run_dir / EVALS)
    reward_keys = [k for k in metrics[0] if k.startswith("reward/") and not k.endswith("_std")] if metrics else []
    if reward_keys:
        plot_panels({k[7:]: {"train": [(m["iteration"], m[k]) for m in metrics]} for k in reward_keys},
                    run_dir / "reward_curve.png", xlabels=("iteration",), title=f"{cfg['algorithm']}: training reward",
                    markers={k[7:]: {"held-out": [(e["iteration"], e[f"eval/{k[7:]}"]) for e in evals
                                                  if f"eval/{k[7:]}" in e]} for k in reward_keys})
    minutes = training_minutes(metrics)
    eval_keys = [k for k in (evals[0] if evals else {}) if k.startswith("eval/")]
    if eval_keys:
        plot_panels({k[5:]: {"held-out@0": [(e["iteration"], e[k]) for e in evals if k in e],
                             "held-out@1": [(minutes[e["iteration"]], e[k]) for e in evals
                                            if k in e and e["iteration"] in minutes]} for k in eval_keys},
                    run_dir / "eval_curve.png", xlabels=("iteration", "training minutes"),
                    title=f"{cfg['algorithm']}: held-out evaluation ({cfg['eval']['num_prompts']} prompts x "
                          f"{cfg['eval']['images_per_prompt']} images, the same noise each time)")


def write_summary(run_dir: Path) -> None:
    """summary.md (before / after table) and the two curves (`write_curves`)."""
    write_curves(run_dir)
    cfg = migrate(read_yaml(run_dir / CONFIG))
    metrics = read_metrics(run_dir)
    evals = read_records(run_dir / EVALS)
    lines = [f"# Run summary: {cfg['algorithm']} ({cfg['objective']})", "",
             f"- iterations: {cfg['run']['iterations']}, prompts x group: "
             f"{cfg['rollout']['prompts_per_iteration']} x {cfg['rollout']['group_size']}",
             f"- median seconds per iteration: {_median([m['time/iteration'] for m in metrics]):.2f}", ""]
    lines += _server_lines(cfg, metrics)
    no_signal = no_signal_message(metrics)
    if no_signal:
        lines += [f"**Warning: {no_signal}.**", ""]
    if len(evals) >= 2:
        lines += ["| held-out metric | before | after |", "|---|---|---|"]
        for k in evals[0]:
            if k.startswith("eval/") and k in evals[-1]:
                lines.append(f"| {k[5:]} | {evals[0][k]:.4f} | {evals[-1][k]:.4f} |")
    with writing(run_dir / SUMMARY):
        (run_dir / SUMMARY).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _server_lines(cfg: dict[str, Any], metrics: list[dict[str, Any]]) -> list[str]:
    """Which reward server scored which rewards, and how many training images over the run (rank 0's)."""
    from mixgrpo.config import RewardConfig, from_dict
    from mixgrpo.rewards.scoring import reward_labels

    specs = [from_dict(RewardConfig, r) for r in cfg.get("rewards", [])]
    hosted: dict[str, list[str]] = {}
    for spec, label in zip(specs, reward_labels(specs)):
        for url in spec.servers:
            hosted.setdefault(url, []).append(label)
    images = {url: sum(m.get("reward_servers", {}).get(url, 0) for m in metrics) for url in hosted}
    return [f"- reward server {url} scored {', '.join(labels)}: {images[url]} training images"
            for url, labels in hosted.items()] + ([""] if hosted else [])


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else math.nan
