"""Reference curves (mixgrpo.reference) and `mixgrpo compare`: the band over seeds, a run inside it told apart
from a run outside it, the end-of-run line, and the shipped reference files kept in step with their recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mixgrpo import reference
from mixgrpo.cli import main
from mixgrpo.config import config_diff, load_config, recipes, save_config
from mixgrpo.reference import Reference, build_reference, comparable, judge, read_run, recipe_config

METRICS = ("eval/shape_quality", "eval/color_purity")
# three seeds of a recipe, evaluated at iterations 0, 16 and 32 (iteration -> metric -> value per seed)
SEEDS = {0: {0: (0.55, 0.94), 16: (0.60, 0.93), 32: (0.66, 0.91)},
         1: {0: (0.56, 0.94), 16: (0.61, 0.93), 32: (0.65, 0.92)},
         2: {0: (0.55, 0.95), 16: (0.62, 0.92), 32: (0.67, 0.91)}}


def _fake_run(path: Path, seed: int, evals: dict[int, tuple[float, float]], recipe: str = "diffusion_nft",
              seconds_per_iteration: float = 9.0) -> Path:
    """A run directory as `mixgrpo train` leaves it (config.yaml, metrics.jsonl, eval.jsonl), with given
    held-out figures, without training."""
    path.mkdir(parents=True)
    save_config(load_config(recipes()[recipe], [f"run.seed={seed}", "run.precision=fp32", f"run.out_dir={path}"]),
                path / "config.yaml")
    last = max(evals)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "time/iteration": seconds_per_iteration})
                                                + "\n" for i in range(1, last + 1)))
    (path / "eval.jsonl").write_text("".join(json.dumps({"iteration": it, **dict(zip(METRICS, values))}) + "\n"
                                             for it, values in evals.items()))
    return path


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """A reference of the diffusion_nft recipe from three fake seeds, as the only shipped reference."""
    runs = [_fake_run(tmp_path / f"ref_s{s}", s, SEEDS[s]) for s in SEEDS]
    folder = tmp_path / "references"
    folder.mkdir()
    build_reference(runs, machine="test machine").write(folder / "diffusion_nft.json")
    monkeypatch.setattr(reference, "references_dir", lambda: folder)
    return folder


def test_the_band_is_the_prediction_interval_of_one_more_seed(shipped):
    ref = Reference.read(shipped / "diffusion_nft.json")
    assert ref.recipe == "diffusion_nft" and sorted(ref.seeds) == ["0", "1", "2"]
    assert ref.precision == "fp32" and ref.machine == "test machine" and "run.seed={seed}" in ref.command
    band = {it: (minutes, mean, lo, hi) for it, minutes, mean, lo, hi in ref.band("eval/shape_quality")}
    assert sorted(band) == [0, 16, 32]
    minutes, mean, lo, hi = band[16]
    assert minutes == pytest.approx(16 * 9 / 60)
    assert mean == pytest.approx(0.61)
    # sd of (0.60, 0.61, 0.62) is 0.01; t(0.975, 2) = 4.303; sqrt(1 + 1/3)
    assert hi - mean == pytest.approx(4.3027 * 0.01 * math.sqrt(4 / 3), rel=1e-3)
    assert mean - lo == pytest.approx(hi - mean)
    assert ref.gain("eval/shape_quality", 32) == pytest.approx([0.11, 0.09, 0.12])


def test_a_run_inside_the_band_and_one_outside_are_told_apart(shipped, tmp_path, capsys):
    inside = _fake_run(tmp_path / "inside", 3, {0: (0.555, 0.945), 16: (0.615, 0.925), 32: (0.655, 0.915)})
    # learns nothing: at its first evaluation it is a base model like every seed, then it stays there
    outside = _fake_run(tmp_path / "outside", 4, {0: (0.555, 0.945), 16: (0.556, 0.925), 32: (0.557, 0.915)})
    ref = reference.reference_of(read_run(inside))
    assert ref is not None and ref.recipe == "diffusion_nft"
    assert [v.outside for v in judge(read_run(inside), ref)] == [None, None]
    verdicts = {v.metric: v for v in judge(read_run(outside), ref)}
    assert verdicts["eval/color_purity"].outside is None and verdicts["eval/color_purity"].checked == 3
    it, value, lo, hi = verdicts["eval/shape_quality"].outside
    assert (it, value) == (16, 0.556) and value < lo < hi

    png = tmp_path / "compare.png"
    assert main(["compare", str(inside), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "shape_quality: inside (3 evaluations); color_purity: inside (3 evaluations)" in out
    assert main(["compare", str(inside), str(outside), "--out", str(png)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{inside}: reference diffusion_nft (3 seeds, fp32): shape_quality: inside")
    assert out[1].startswith(f"{outside}: reference diffusion_nft (3 seeds, fp32): shape_quality: OUTSIDE at "
                             f"iteration 16 (0.5560 not in [")
    assert png.stat().st_size > 10_000  # a PNG with the runs over the band (8 axes)


def test_the_end_of_a_run_says_where_it_lies(shipped, tmp_path):
    run = _fake_run(tmp_path / "run", 5, {0: (0.555, 0.945), 16: (0.615, 0.925)}, seconds_per_iteration=30.0)
    line = reference.end_of_run_line(run)
    assert line == ("reference diffusion_nft (3 seeds, fp32): shape_quality: inside (2 evaluations); "
                    "color_purity: inside (2 evaluations)")
    other = _fake_run(tmp_path / "other", 5, {0: (0.5, 0.9)}, recipe="mixgrpo")  # no reference for mixgrpo here
    assert reference.end_of_run_line(other) is None


def test_a_run_of_another_config_has_no_reference(shipped, tmp_path, capsys):
    run = _fake_run(tmp_path / "lr", 0, SEEDS[0])
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lr: 0.0001", "lr: 0.001"))
    assert reference.reference_of(read_run(run)) is None
    assert main(["compare", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert "no reference: its config follows no shipped recipe" in capsys.readouterr().out


def test_a_reference_is_one_recipe_over_distinct_seeds(tmp_path):
    a = _fake_run(tmp_path / "a", 0, SEEDS[0])
    b = _fake_run(tmp_path / "b", 0, SEEDS[1])
    with pytest.raises(ValueError, match="two runs share a seed"):
        build_reference([a, b], machine="m")
    c = _fake_run(tmp_path / "c", 1, SEEDS[1], recipe="mixgrpo")
    with pytest.raises(ValueError, match="differ in more than their seed"):
        build_reference([a, c], machine="m")


@pytest.mark.parametrize("name", sorted(recipes()))
def test_every_recipe_has_a_current_reference(name):
    """Every shipped recipe has a reference file whose config is the recipe's (a recipe changed since its
    figures were made fails here: rerun the reference's command), with figures over at least 3 seeds or a
    note saying how to make them."""
    path = reference.references_dir() / f"{name}.json"
    assert path.is_file(), (f"{path} is missing: every recipe has a reference file, with figures (mixgrpo reference) "
                            f"or with its command and no seeds yet (docs/reproducibility.md)")
    ref = Reference.read(path)
    assert ref.recipe == name
    assert config_diff(ref.config, recipe_config(name)) == []
    assert ref.config == comparable(ref.config)
    assert "{seed}" in ref.command and ref.precision in ("fp32", "bf16")
    if ref.seeds:
        assert len(ref.seeds) >= 3 and ref.machine and ref.torch and ref.mixgrpo
        assert all(rows[0]["iteration"] == 0 and len(rows) >= 2 for rows in ref.seeds.values())
    else:
        assert "mixgrpo reference" in ref.note


def test_seeds_that_agree_by_chance_do_not_make_a_zero_width_band():
    rows = lambda *values: [{"iteration": it, "minutes": it / 10, "eval/strict": v}  # noqa: E731
                            for it, v in zip((0, 16, 32), values)]
    ref = Reference(recipe="r", config={}, command="", precision="fp32", machine="", torch="", mixgrpo="",
                    seeds={"0": rows(0.09, 0.15, 0.20), "1": rows(0.09, 0.17, 0.21), "2": rows(0.09, 0.16, 0.23)})
    band = {it: (lo, hi) for it, _, _, lo, hi in ref.band("eval/strict")}
    assert band[0][0] < 0.09 < band[0][1]  # all three seeds scored 0.09 before training
    assert band[0][1] - band[0][0] == pytest.approx(band[16][1] - band[16][0])  # the median width: iteration 16's
