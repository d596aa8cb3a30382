"""The verifier passes ground-truth renders (also noisy or blurred ones) and fails renders that violate the prompt."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixgrpo.world.scene import COLORS, SHAPES, ObjectSpec, Scene, load_prompts, parse_prompt, render_batch
from mixgrpo.world.verifier import MIN_AREA, _segment, detect, requirements, verify

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _heldout_scenes(n: int, seed: int) -> list[Scene]:
    prompts = load_prompts("heldout")
    return [parse_prompt(prompts[i]) for i in np.random.default_rng(seed).integers(len(prompts), size=n)]


def _blur(images: torch.Tensor) -> torch.Tensor:
    """3 x 3 binomial blur per channel: soft edges like a small generative model's."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


@pytest.mark.parametrize("size, n", [(32, 1000), (64, 300)])
def test_ground_truth_renders_of_heldout_prompts_pass(size, n):
    scenes = _heldout_scenes(n, seed=0)
    result = verify(render_batch(scenes, seed=1, size=size), scenes)
    assert result.strict.shape == result.dense.shape == (n,)
    assert result.strict.mean() >= 0.99 and result.dense.mean() >= 0.995


def test_degraded_ground_truth_still_passes():
    scenes = _heldout_scenes(500, seed=2)
    images = render_batch(scenes, seed=3)
    gen = torch.Generator().manual_seed(0)
    noisy = (images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    blurred_noisy = (_blur(images) + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    assert verify(noisy, scenes).strict.mean() >= 0.99
    assert verify(blurred_noisy, scenes).strict.mean() >= 0.97


def _violations(scene: Scene, rng: np.random.Generator) -> dict[str, Scene]:
    """Scenes that contradict `scene` in one way each (where the change is possible)."""
    objects = list(scene.objects)
    taken = {(o.color, o.shape) for o in objects}
    i = int(rng.integers(len(objects)))
    o = objects[i]

    def replace(new: ObjectSpec) -> tuple[ObjectSpec, ...]:
        return tuple(objects[:i] + [new] + objects[i + 1:])

    out = {}
    colors = [c for c in COLORS if c != o.color and (c, o.shape) not in taken]
    out["wrong colour"] = Scene(replace(dataclasses.replace(o, color=colors[rng.integers(len(colors))])),
                                scene.relation)
    shapes = [s for s in SHAPES if s != o.shape and (o.color, s) not in taken]
    if shapes:
        out["wrong shape"] = Scene(replace(dataclasses.replace(o, shape=shapes[rng.integers(len(shapes))])),
                                   scene.relation)
    if scene.relation is not None:
        out["swapped relation"] = Scene(scene.objects, OPPOSITE[scene.relation])
        out["swapped objects"] = Scene(scene.objects[::-1], scene.relation)
    else:
        counts = [k for k in (o.count - 1, o.count + 1) if 1 <= k <= 3 and scene.n_instances - o.count + k <= 4]
        if counts:
            out["wrong count"] = Scene(replace(dataclasses.replace(o, count=counts[rng.integers(len(counts))])))
        unused = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken]
        if scene.n_instances < 4:
            out["extra object"] = Scene((*objects, ObjectSpec(*unused[rng.integers(len(unused))])))
    if len(objects) > 1:
        out["missing object"] = Scene(tuple(objects[:i] + objects[i + 1:]))
    return out


@pytest.mark.parametrize("size", [32, 64])
def test_renders_that_violate_the_prompt_fail(size):
    rng = np.random.default_rng(4)
    cases: dict[str, list[tuple[Scene, Scene]]] = {}
    for scene in _heldout_scenes(600 if size == 32 else 200, seed=5):
        for kind, wrong in _violations(scene, rng).items():
            cases.setdefault(kind, []).append((scene, wrong))
    assert set(cases) == {"wrong colour", "wrong shape", "swapped relation", "swapped objects", "wrong count",
                          "extra object", "missing object"}
    for kind, pairs in cases.items():
        images = render_batch([wrong for _, wrong in pairs], seed=6, size=size)
        result = verify(images, [scene for scene, _ in pairs])
        assert result.strict.mean() <= 0.01, f"{kind}: {result.strict.mean():.3f} false positives"
        assert (result.dense < 1).float().mean() >= 0.99, kind


def test_blank_image_meets_nothing_but_no_extras():
    scene = parse_prompt("a red circle left of a blue square")
    met = requirements(scene, detect(torch.zeros(1, 3, 32, 32))[0])
    assert met == {"present: red circle": False, "present: blue square": False, "count: 1 red circle": False,
                   "count: 1 blue square": False, "relation: left of": False, "no extras": True}
    assert verify(torch.zeros(1, 3, 32, 32), [scene]).dense.item() == pytest.approx(1 / 6)


def test_dense_score_counts_requirements_met():
    scene = parse_prompt("a red circle left of a blue square")
    swapped = render_batch([Scene(scene.objects, "right of")], seed=7)
    result = verify(swapped, [scene])  # all but the relation: 5 of 6
    assert result.strict.item() == 0 and result.dense.item() == pytest.approx(5 / 6)
    two_of_three = render_batch([parse_prompt("two green triangles")], seed=8)
    result = verify(two_of_three, [parse_prompt("three green triangles")])  # present, no extras; not the count
    assert result.strict.item() == 0 and result.dense.item() == pytest.approx(2 / 3)


def test_detections_report_colour_shape_and_position():
    scene = parse_prompt("a yellow triangle above a green square")
    (dets,) = detect(render_batch([scene], seed=9))
    assert sorted((d.color, d.shape) for d in dets) == [("green", "square"), ("yellow", "triangle")]
    triangle = next(d for d in dets if d.shape == "triangle")
    square = next(d for d in dets if d.shape == "square")
    assert triangle.y < square.y and triangle.area >= 40


def test_specks_below_min_area_are_ignored_but_blobs_count():
    scene = parse_prompt("a blue circle")
    image = render_batch([scene], seed=10)
    (circle,) = detect(image)[0]
    # Paint red squares into the 8 x 8 corner farthest from the circle: its box (half-size <= 7) cannot reach it.
    xs = slice(0, 8) if circle.x > 16 else slice(24, 32)
    ys = slice(0, 8) if circle.y > 16 else slice(24, 32)
    red = torch.tensor(COLORS["red"], dtype=torch.float32)[:, None, None] / 255
    side = int(np.sqrt(MIN_AREA * 32 * 32))
    speck, blob = image.clone(), image.clone()
    speck[0, :, ys, xs][:, :side - 1, :side - 1] = red  # (side - 1)^2 < MIN_AREA pixels
    blob[0, :, ys, xs][:, :side + 2, :side + 2] = red
    assert verify(speck, [scene]).strict.item() == 1
    assert sorted((d.color, d.shape) for d in detect(blob)[0]) == [("blue", "circle"), ("red", "square")]
    assert verify(blob, [scene]).strict.item() == 0


def test_segmentation_follows_blends_with_the_background():
    red = np.array(COLORS["red"]) / 255
    yellow = np.array(COLORS["yellow"]) / 255
    pixels = np.stack([red, 0.6 * red, 0.4 * red, (red + yellow) / 2 + [0, 0, 0.3], np.full(3, 0.5)])
    owner = _segment(pixels)
    red_index = list(COLORS).index("red")
    # Full and 60% red belong to red; 40% red is background; a red-yellow mix pushed off both segments
    # and mid grey belong to nobody.
    assert owner.tolist() == [red_index, red_index, -1, -1, -1]


def test_verify_checks_its_inputs():
    with pytest.raises(ValueError, match="one scene per image"):
        verify(torch.zeros(2, 3, 32, 32), [parse_prompt("a red circle")])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        detect(torch.zeros(3, 32, 32))
