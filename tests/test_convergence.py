"""The convergence check: the main job, cut to its first 16 iterations, must still learn.

Every other test passes on a change that stops the model from learning (a flipped advantage sign, a gradient that
never reaches the weights) as long as nothing crashes. This one trains configs/diffusion_nft.yaml for 16
iterations in fp32 (so the result does not depend on the machine's matrix units) and requires the held-out
trained reward (shape_quality, all 106 held-out compositions x 2 images, the same noise before and after) to rise
by at least half of the smallest rise of the shipped reference's seeds at iteration 16
(configs/references/diffusion_nft.json). It also prints where the run lies against the reference band.

4.4 CPU-minutes (about 4-5 minutes on an idle machine), so it is marked slow; .ci/run runs it after the default
suite:
    pytest -m slow tests/test_convergence.py
"""

from __future__ import annotations

import pytest

from mixgrpo.config import load_config, recipes
from mixgrpo.reference import describe, read_run, shipped_references
from mixgrpo.train import train

RECIPE, ITERATIONS, METRIC = "diffusion_nft", 16, "eval/shape_quality"


@pytest.mark.slow
def test_the_main_job_learns_as_far_as_its_reference_says(tmp_path):
    ref = shipped_references()[RECIPE]
    gains = ref.gain(METRIC, ITERATIONS)
    assert len(gains) >= 3, f"the reference of {RECIPE} has no evaluation at iteration {ITERATIONS} over 3 seeds"
    margin = 0.5 * min(gains)
    cfg = load_config(recipes()[RECIPE], [f"run.iterations={ITERATIONS}", "run.precision=fp32", "run.seed=0",
                                          f"run.out_dir={tmp_path / 'run'}", "run.tensorboard=false"])
    run = read_run(train(cfg, progress=False))
    evals = {row["iteration"]: row[METRIC] for row in run.rows}
    gain = evals[ITERATIONS] - evals[0]
    print(f"\nheld-out shape_quality {evals[0]:.4f} -> {evals[ITERATIONS]:.4f} ({gain:+.4f}) after {ITERATIONS} "
          f"iterations; required: > {margin:+.4f} (half the smallest of the reference's seeds: "
          f"{', '.join(f'{g:+.4f}' for g in gains)})\n{describe(run, ref)}")
    assert gain > margin, (f"the main job no longer learns: held-out shape_quality rose {gain:+.4f} in "
                           f"{ITERATIONS} iterations, the reference's seeds rose {', '.join(f'{g:+.4f}' for g in gains)}"
                           f" (required: > {margin:+.4f})")
