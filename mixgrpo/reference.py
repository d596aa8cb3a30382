"""Reference curves: what a recipe's held-out metrics did over seeds, shipped with the package, and the test of a
run against them.

A reference is one JSON file per recipe, `configs/references/NAME.json` (installed as package data of
`mixgrpo.configs`):

    {"recipe": NAME, "config": the recipe's comparable config (`comparable`),
     "command": the command of one seed ("{seed}" where the seed goes), "precision", "machine", "torch",
     "mixgrpo": the commit it was run at, "note": anything a reader should know,
     "seeds": {"0": [{"iteration": 0, "minutes": 0.0, "eval/shape_quality": 0.55, ...}, ...], "1": ...}}

Each seed holds the run's eval.jsonl rows with the training minutes at each (evaluations excluded). A recipe
without figures yet (the real models: a GPU run fills them in with `mixgrpo reference`) has "seeds": {}.

The band of a metric at an evaluated iteration is the 95% prediction interval of one more seed from the n
reference seeds: mean +- t(0.975, n - 1) sd sqrt(1 + 1/n) (sd over seeds, n - 1 in the denominator; 4.97 sd at
n = 3), and no narrower than the metric's median band (seeds that agree by chance). A run lies inside for a metric when every evaluation it shares with the reference (the same iteration)
lies inside the band. Minutes are drawn, never judged: they depend on the machine.

A run belongs to a reference when its config equals the recipe's up to what does not change the computation
(the seed, the length, logging, checkpoints, the parallel layout, the micro-batch size, `deterministic`, where
its files are) and the precision, which is reported beside the verdict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixgrpo.config import (REFERENCE_IGNORED, ConfigError, config_diff, load_config, migrate, read_yaml, recipes,
                            to_dict, without_keys)
from mixgrpo.fileio import writing
from mixgrpo.rundir import CONFIG, EVALS, read_metrics, read_records

CONFIDENCE = 0.95


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config (`to_dict`) without the settings that do not change what a run computes at an evaluated
    iteration (`mixgrpo.config.REFERENCE_IGNORED`; the precision is reported instead) and the paths of its files (a
    run makes them absolute; where the files are is not what is computed): what a run must share with a
    reference."""
    from mixgrpo.runfiles import without_paths

    return json.loads(json.dumps(without_keys(without_paths(config), REFERENCE_IGNORED)))


def references_dir() -> Path:
    """configs/references/ of the shipped recipes (beside them in a checkout, package data when installed)."""
    return next(iter(recipes().values())).parent / "references"


@dataclass
class Reference:
    """A recipe's reference: its JSON fields (module docstring) and the file it came from."""

    recipe: str
    config: dict[str, Any]
    command: str
    precision: str
    machine: str
    torch: str
    mixgrpo: str
    seeds: dict[str, list[dict[str, float]]]
    note: str = ""
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def read(cls, path: Path) -> Reference:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            # a reference written before the config had sections: its config in today's layout
            return cls(**{**data, "config": migrate(data["config"])}, path=path)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ConfigError(f"reference file {path} is not a reference ({e}): rewrite it with mixgrpo "
                              f"reference") from None

    def write(self, path: Path) -> None:
        data = {k: v for k, v in self.__dict__.items() if k != "path"}
        with writing(path):
            path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    def metrics(self) -> list[str]:
        """The held-out metrics of the reference ("eval/..."), in the order of its first row."""
        rows = next(iter(self.seeds.values()), [])
        return [k for k in (rows[0] if rows else {}) if k.startswith("eval/")]

    def band(self, metric: str) -> list[tuple[int, float, float, float, float]]:
        """[(iteration, mean minutes, mean, low, high)] at every iteration all seeds evaluated."""
        from scipy.stats import t

        by_it: dict[int, list[tuple[float, float]]] = {}
        for rows in self.seeds.values():
            for row in rows:
                if metric in row:
                    by_it.setdefault(row["iteration"], []).append((row["minutes"], row[metric]))
        n = len(self.seeds)
        rows = []  # (iteration, mean minutes, mean, half-width)
        for it in sorted(by_it):
            points = by_it[it]
            if len(points) < n or n < 2:
                continue
            values = [v for _, v in points]
            mean = sum(values) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            rows.append((it, sum(m for m, _ in points) / n, mean,
                         t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd * math.sqrt(1 + 1 / n)))
        # a few seeds can agree by chance (a count metric: the verifier's strict accuracy is k / 212): no point's
        # band is narrower than the metric's median one
        floor = sorted(h for *_, h in rows)[len(rows) // 2] if rows else 0.0
        return [(it, minutes, mean, mean - max(h, floor), mean + max(h, floor)) for it, minutes, mean, h in rows]

    def gain(self, metric: str, iteration: int) -> list[float]:
        """Each seed's change of `metric` from its first evaluation to the one at `iteration` (paired: the same
        noise); seeds without that evaluation are left out."""
        gains = []
        for rows in self.seeds.values():
            at = {r["iteration"]: r[metric] for r in rows if metric in r}
            if iteration in at and rows:
                gains.append(at[iteration] - rows[0][metric])
        return gains


def shipped_references() -> dict[str, Reference]:
    """Every shipped reference, recipe name -> Reference."""
    folder = references_dir()
    return {p.stem: Reference.read(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def recipe_config(name: str) -> dict[str, Any]:
    """The comparable config of a shipped recipe."""
    return comparable(to_dict(load_config(recipes()[name], [])))


# --------------------------------------------------------------------------------------------------
# runs


@dataclass
class RunCurve:
    """A run directory's held-out evaluations with the training minutes at each, and its config."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, float]]


def training_minutes(metrics: list[dict[str, Any]]) -> dict[int, float]:
    """Training minutes at the end of each iteration (evaluations excluded), from metrics.jsonl's records;
    {0: 0.0} first."""
    minutes, total = {0: 0.0}, 0.0
    for m in metrics:
        total += m["time/iteration"] / 60
        minutes[m["iteration"]] = total
    return minutes


def read_run(run_dir: str | Path) -> RunCurve:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG}): give the --out of a mixgrpo train")
    minutes = training_minutes(read_metrics(run_dir))
    rows = [{"iteration": e["iteration"], "minutes": minutes.get(e["iteration"], math.nan),
             **{k: v for k, v in e.items() if k.startswith("eval/")}} for e in read_records(run_dir / EVALS)]
    return RunCurve(run_dir, migrate(read_yaml(run_dir / CONFIG)), rows)


def reference_of(run: RunCurve, references: dict[str, Reference] | None = None) -> Reference | None:
    """The shipped reference whose recipe the run followed, or None."""
    refs = shipped_references() if references is None else references
    mine = comparable(run.config)
    # a field one side lacks (a newer or older mixgrpo) is no difference (config_diff)
    return next((ref for ref in refs.values() if not config_diff(ref.config, mine)), None)


@dataclass
class Verdict:
    """Whether a run's evaluations of one metric lie inside the reference band; `outside` holds the first
    (iteration, value, low, high) that does not; `checked` counts the evaluations compared."""

    metric: str
    checked: int
    outside: tuple[int, float, float, float] | None

    def text(self) -> str:
        name = self.metric.removeprefix("eval/")
        if not self.checked:
            return f"{name}: no evaluation at the reference's iterations"
        if self.outside is None:
            return f"{name}: inside ({self.checked} evaluations)"
        it, v, lo, hi = self.outside
        return f"{name}: OUTSIDE at iteration {it} ({v:.4f} not in [{lo:.4f}, {hi:.4f}])"


def judge(run: RunCurve, ref: Reference) -> list[Verdict]:
    """One Verdict per metric of the reference."""
    verdicts = []
    for metric in ref.metrics():
        band = {it: (lo, hi) for it, _, _, lo, hi in ref.band(metric)}
        checked, outside = 0, None
        for row in run.rows:
            if metric in row and row["iteration"] in band:
                checked += 1
                lo, hi = band[row["iteration"]]
                if outside is None and not lo <= row[metric] <= hi:
                    outside = (row["iteration"], row[metric], lo, hi)
        verdicts.append(Verdict(metric, checked, outside))
    return verdicts


def describe(run: RunCurve, ref: Reference) -> str:
    """One line: the run against its recipe's reference, per metric."""
    precision = run.config.get("run", {}).get("precision")
    other = f"; this run's precision is {precision}" if precision != ref.precision else ""
    return (f"reference {ref.recipe} ({len(ref.seeds)} seeds, {ref.precision}{other}): "
            + "; ".join(v.text() for v in judge(run, ref)))


def end_of_run_line(run_dir: Path) -> str | None:
    """The line a run prints at its end when its recipe has a reference with figures, else None."""
    run = read_run(run_dir)
    ref = reference_of(run)
    return describe(run, ref) if ref is not None and ref.seeds else None


def plot_comparison(runs: list[RunCurve], ref: Reference | None, path: Path) -> None:
    """One PNG: a row per metric, the reference band and each run's evaluations, against iterations and
    training minutes."""
    from mixgrpo.images import plot_panels

    metrics = ref.metrics() if ref is not None else []
    for run in runs:
        metrics += [k for k in (run.rows[0] if run.rows else {}) if k.startswith("eval/") and k not in metrics]
    panels, bands = {}, {}
    for metric in metrics:
        name = metric.removeprefix("eval/")
        panels[name] = {}
        for run in runs:
            for col, x in enumerate(("iteration", "minutes")):
                panels[name][f"{run.path.name}@{col}"] = [(r[x], r[metric]) for r in run.rows if metric in r]
        if ref is not None:
            band = ref.band(metric)
            bands[name] = {"reference@0": [(it, lo, hi) for it, _, _, lo, hi in band],
                           "reference@1": [(minutes, lo, hi) for _, minutes, _, lo, hi in band]}
    title = f"held-out metrics against the reference of {ref.recipe} ({len(ref.seeds)} seeds)" if ref else \
        "held-out metrics (no reference for this recipe)"
    plot_panels(panels, path, xlabels=("iteration", "training minutes"), title=title, bands=bands)


# --------------------------------------------------------------------------------------------------
# writing a reference from runs


def build_reference(run_dirs: list[str | Path], machine: str, note: str = "") -> Reference:
    """A reference from the runs of one recipe at different seeds (all with the same comparable config and
    precision); the recipe is the shipped one whose config the runs follow."""
    import torch

    runs = [read_run(p) for p in run_dirs]
    mine = comparable(runs[0].config)
    for run in runs[1:]:
        changed = config_diff(mine, comparable(run.config))
        if changed:
            raise ConfigError(f"the runs differ in more than their seed ({run.path}: {'; '.join(changed)}): a "
                              f"reference is one recipe over seeds")
    seeds = [str(r.config["run"]["seed"]) for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"two runs share a seed ({seeds}): give one run per seed")
    precisions = {r.config["run"]["precision"] for r in runs}
    if len(precisions) != 1:
        raise ConfigError(f"the runs differ in precision ({sorted(precisions)}): pin it (run.precision=fp32)")
    name = next((n for n in recipes() if not config_diff(recipe_config(n), mine)), None)
    if name is None:
        raise ConfigError("the runs follow no shipped recipe (configs/*.yaml): a reference belongs to a recipe; "
                          "run the recipe with only run.seed, run.precision and run.out_dir changed")
    precision = precisions.pop()
    return Reference(recipe=name, config=mine, precision=precision, machine=machine,
                     command=f"mixgrpo train --config {name} run.seed={{seed}} run.precision={precision}"
                             f" --out runs/ref/{name}_s{{seed}}",
                     torch=torch.__version__, mixgrpo=_commit(), note=note,
                     seeds={s: r.rows for s, r in sorted(zip(seeds, runs))})


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
