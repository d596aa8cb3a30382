"""The embedded editing job's table and grid from its runs: held-out edit success (the edit made AND everything else
kept) and keep-rate before and after training, mean and standard deviation over seeds, for each recipe; and one
before/after grid (input, instruction, the base's result, each recipe's result after training).

    for r in edit_mixgrpo edit_diffusion_nft; do for s in 0 1 2; do
        nice -n 10 mixgrpo train --config configs/$r.yaml seed=$s precision=fp32 --out runs/ref/${r}_s$s
    done; done
    python benchmarks/editing_job.py runs/ref            # -> benchmarks/results/editing_job.{json,md}, docs/edit_grid.png

The figures are the runs' own held-out evaluations (eval.jsonl: world:edit_heldout, 128 examples x 1 image, before
and after training, each seed on its own evaluation noise). The gain's standard deviation is over seeds; the
keep-rate's 95% interval is the binomial one of a single evaluation (128 images). The grid redraws the first 8
held-out examples on one noise with the base (tiny_edit) and with each recipe's seed-0 model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"edit_diffusion_nft": "DiffusionNFT", "edit_mixgrpo": "MixGRPO"}
SUCCESS, KEPT, MADE = "eval/edit_verifier_strict", "eval/edit_verifier_kept", "eval/edit_verifier_made"


def _evals(run: Path) -> tuple[dict, dict, float]:
    """(before, after, training minutes) of a run: its first and last eval.jsonl rows."""
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line.strip()]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    minutes = sum(m["time/iteration"] for m in metrics) / 60
    return rows[0], rows[-1], minutes


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def table(root: Path) -> dict:
    out = {}
    for recipe in RECIPES:
        runs = sorted(p for p in root.glob(f"{recipe}_s*") if p.is_dir())
        if not runs:
            continue
        per_seed = {}
        for run in runs:
            before, after, minutes = _evals(run)
            per_seed[run.name] = {"before": {k: before[k] for k in (SUCCESS, MADE, KEPT)},
                                  "after": {k: after[k] for k in (SUCCESS, MADE, KEPT)}, "train_minutes": minutes}
        summary = {}
        for key in (SUCCESS, MADE, KEPT):
            b = [s["before"][key] for s in per_seed.values()]
            a = [s["after"][key] for s in per_seed.values()]
            summary[key] = {"before": _mean_std(b), "after": _mean_std(a),
                            "gain": _mean_std([y - x for x, y in zip(b, a)])}
        out[recipe] = {"seeds": per_seed, "summary": summary}
    return out


def markdown(results: dict, images: int = 128) -> str:
    lines = ["| recipe | edit success before | after | gain (seed std) | gain / std | keep-rate before | after | "
             "keep-rate 95% interval of one evaluation | made before | after |", "|---|" + "---|" * 9]
    for recipe, r in results.items():
        s = r["summary"]
        gain, std = s[SUCCESS]["gain"]
        kept = s[KEPT]["before"][0]
        half = 1.96 * math.sqrt(kept * (1 - kept) / images)
        lines.append(
            f"| {RECIPES[recipe]} ({len(r['seeds'])} seeds) | {s[SUCCESS]['before'][0]:.3f} ± "
            f"{s[SUCCESS]['before'][1]:.3f} | {s[SUCCESS]['after'][0]:.3f} ± {s[SUCCESS]['after'][1]:.3f} | "
            f"{gain:+.3f} ± {std:.3f} | {gain / std if std > 0 else float('inf'):.1f} | {kept:.3f} | "
            f"{s[KEPT]['after'][0]:.3f} ± {s[KEPT]['after'][1]:.3f} | ± {half:.3f} | "
            f"{s[MADE]['before'][0]:.3f} | {s[MADE]['after'][0]:.3f} |")
    return "\n".join(lines) + "\n"


def grid(root: Path, path: Path, count: int = 8) -> None:
    """Rows of (input, the base's result, each recipe's seed-0 result) for the first `count` held-out examples,
    captioned with the instruction, on one noise (seed 0), 16-step ODE, guidance 3."""
    from mixgrpo.evaluate import example_inputs, generate
    from mixgrpo.images import save_grid
    from mixgrpo.loading import ModelLoader
    from mixgrpo.plan import ode_plan
    from mixgrpo.prompts import read_examples

    examples = read_examples("world:edit_heldout")[:count]
    prompts = [e.prompt for e in examples]
    columns = []
    runs = [root / f"{recipe}_s0" for recipe in RECIPES if (root / f"{recipe}_s0").is_dir()]
    loader = ModelLoader([str(runs[0])], device="cpu")
    models = [("base", loader.load("base"))] + [(RECIPES[r.name[:-3]], loader.load(str(r))) for r in runs]
    inputs = example_inputs(models[0][1], examples)
    columns.append(torch.stack([t[0] for t in inputs]))
    for _, model in models:
        columns.append(generate(model, prompts, ode_plan(16, 3.0), 1, 0, 3.0, inputs=inputs)[:, 0])
    cells = torch.stack(columns, dim=1)                                           # [count, 2 + recipes, 3, H, W]
    captions = [c for p in prompts for c in ("input: " + p, *(label for label, _ in models))]
    save_grid(cells.flatten(0, 1), path, nrow=cells.shape[1], scale=3, captions=captions)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("root", help="the folder of the runs RECIPE_sSEED")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "editing_job.json"))
    parser.add_argument("--grid", default=str(ROOT / "docs" / "edit_grid.png"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine  # noqa: E402  benchmarks/common.py

    results = table(Path(args.root))
    text = markdown(results)
    Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=1) + "\n")
    Path(args.json).with_suffix(".md").write_text(text)
    print(text)
    grid(Path(args.root), Path(args.grid))
    print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
