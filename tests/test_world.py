"""The shapes world: grammar round trips, splits, and renders that satisfy their spec."""

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from mixgrpo.world import scene as W
from mixgrpo.world.scene import (
    COLORS,
    RELATIONS,
    ObjectSpec,
    PromptParseError,
    Scene,
    format_prompt,
    is_heldout,
    load_prompts,
    parse_prompt,
    random_scene,
    render,
    render_batch,
)


def test_every_shipped_prompt_round_trips():
    for split in ("train", "heldout"):
        for prompt in load_prompts(split):
            assert format_prompt(parse_prompt(prompt)) == prompt


def test_scenes_round_trip_through_their_prompt():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene(rng, max_objects=3, allow_heldout=True)
        assert parse_prompt(format_prompt(scene)) == scene


@pytest.mark.parametrize("prompt, scene", [
    ("a red circle", Scene((ObjectSpec("red", "circle"),))),
    ("One red circle.", Scene((ObjectSpec("red", "circle"),))),
    ("two blue squares", Scene((ObjectSpec("blue", "square", 2),))),
    ("a green triangle left of a yellow circle",
     Scene((ObjectSpec("green", "triangle"), ObjectSpec("yellow", "circle")), "left of")),
    ("a red circle   below a blue square", Scene((ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), "below")),
    ("a red circle and three blue squares", Scene((ObjectSpec("red", "circle"), ObjectSpec("blue", "square", 3)))),
    ("a red circle, a blue square, and a green triangle",
     Scene((ObjectSpec("red", "circle"), ObjectSpec("blue", "square"), ObjectSpec("green", "triangle")))),
    ("a red circle and a blue square and a green triangle",
     Scene((ObjectSpec("red", "circle"), ObjectSpec("blue", "square"), ObjectSpec("green", "triangle")))),
])
def test_parse_prompt(prompt, scene):
    assert parse_prompt(prompt) == scene


@pytest.mark.parametrize("prompt, names", [
    ("a purple circle", "'purple'"),
    ("two red circle", "'circle'"),
    ("a red circles", "'circles'"),
    ("four red circles", "'four'"),
    ("a red circle next to a blue square", "'next'"),
    ("a red circle left of two blue squares", "two objects of count 1"),
    ("a red circle left of a blue square and a green circle", "'and'"),
    ("a red circle and a red circle", "differ in colour or shape"),
    ("three red circles and two blue squares", "at most 4"),
    ("a red circle and", "the end of the prompt"),
    ("a red circle!", "only letters"),
    ("", "a count"),
])
def test_parse_errors_name_the_prompt_and_the_problem(prompt, names):
    with pytest.raises(PromptParseError) as info:
        parse_prompt(prompt)
    assert repr(prompt) in str(info.value) and names in str(info.value)


def test_splits_are_the_generator_output_and_disjoint():
    generated = W.split_prompts()
    train, heldout = load_prompts("train"), load_prompts("heldout")
    assert train == generated["train"] and heldout == generated["heldout"]
    assert not set(train) & set(heldout)
    assert len(set(train)) == len(train) > 800 and len(set(heldout)) == len(heldout) > 100
    assert max(parse_prompt(p).n_instances for p in train + heldout) == W.DEFAULT_INSTANCES
    assert len(W.split_prompts(max_instances=4)["train"]) > len(train)


def _pairs(scene: Scene) -> set[frozenset]:
    """The unordered colour-shape pairs that a scene shows together."""
    return {frozenset(p) for p in itertools.combinations([(o.color, o.shape) for o in scene.objects], 2)}


def test_heldout_compositions_never_appear_in_train():
    train = [parse_prompt(p) for p in load_prompts("train")]
    heldout = [parse_prompt(p) for p in load_prompts("heldout")]
    assert all(is_heldout(s) for s in heldout) and not any(is_heldout(s) for s in train)
    train_pairs = set().union(*map(_pairs, train))
    train_counts = {(o.count, o.color, o.shape) for s in train for o in s.objects}
    for s in heldout:
        counts = {(o.count, o.color, o.shape) for o in s.objects}
        assert (_pairs(s) - train_pairs) or (counts - train_counts), format_prompt(s)
    # ... while every held-out prompt is built from parts that train does show: objects, counts, relations.
    assert {(o.color, o.shape) for s in train for o in s.objects} == {(c, s) for c in COLORS for s in W.SHAPES}
    assert {k for k, _, _ in train_counts} == {1, 2, 3} and {s.relation for s in train} >= set(RELATIONS)
    assert any(s.relation for s in heldout) and any(o.count > 1 for s in heldout for o in s.objects)


def test_random_scene_stays_in_train_unless_asked():
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(500)]
    assert not any(is_heldout(s) for s in scenes)
    assert {len(s.objects) for s in scenes} == {1, 2} and {s.relation for s in scenes} == {None, *RELATIONS}
    assert any(is_heldout(random_scene(rng, allow_heldout=True)) for _ in range(500))
    assert {len(random_scene(rng, max_objects=3).objects) for _ in range(100)} == {1, 2, 3}
    assert max(s.n_instances for s in scenes) == W.DEFAULT_INSTANCES
    assert max(random_scene(rng, max_instances=4).n_instances for _ in range(200)) == 4
    for bad in (0, 5):
        with pytest.raises(ValueError, match="max_instances"):
            random_scene(rng, max_instances=bad)
        with pytest.raises(ValueError, match="max_instances"):
            W.all_scenes(max_instances=bad)


def test_relations_are_mutually_exclusive():
    rng = np.random.default_rng(2)
    for a, b in rng.uniform(0, 32, size=(500, 2, 2)):
        assert sum(W.relation_holds(r, a, b) for r in RELATIONS) <= 1


def _boxes(image: torch.Tensor, color: str) -> list[tuple[slice, slice]]:
    """Bounding boxes of the 8-connected components of exactly `color` (checks renders without the verifier)."""
    rgb = torch.tensor(COLORS[color], dtype=torch.float32)[:, None, None] / 255
    labels, _ = ndimage.label((image - rgb).abs().amax(0).numpy() < 1e-6, structure=np.ones((3, 3)))
    return ndimage.find_objects(labels)


def _centre(box: tuple[slice, slice]) -> tuple[float, float]:
    return (box[1].start + box[1].stop) / 2, (box[0].start + box[0].stop) / 2


@pytest.mark.parametrize("size", [32, 64])
def test_renders_draw_every_instance_separate_and_legible(size):
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, max_objects=3, allow_heldout=True, max_instances=4) for _ in range(300)]
    images = render_batch(scenes, seed=4, size=size)
    assert images.shape == (300, 3, size, size) and images.dtype == torch.float32
    palette = torch.tensor([W.BACKGROUND, *COLORS.values()], dtype=torch.float32) / 255
    assert (images.permute(0, 2, 3, 1)[..., None, :] == palette).all(-1).any(-1).all(), "colours stay exact"
    for scene, image in zip(scenes, images):
        for color in COLORS:
            boxes = _boxes(image, color)
            # One component per instance: instances of a colour never touch.
            assert len(boxes) == sum(o.count for o in scene.objects if o.color == color), format_prompt(scene)
            # Smallest side: a square of half-size 0.886 * 5 px at 32 x 32 spans 8 px.
            assert all(min(y.stop - y.start, x.stop - x.start) >= 8 * size / 32 for y, x in boxes)


@pytest.mark.parametrize("size", [32, 64])
def test_renders_hold_the_relation_with_a_margin(size):
    rng = np.random.default_rng(5)
    colors = list(COLORS)
    for k in range(200):
        ca, cb = rng.choice(len(colors), size=2, replace=False)
        sa, sb = rng.choice(W.SHAPES, size=2)
        scene = Scene((ObjectSpec(colors[ca], sa), ObjectSpec(colors[cb], sb)), RELATIONS[k % 4])
        image = render(scene, rng, size)
        (a,), (b,) = _boxes(image, colors[ca]), _boxes(image, colors[cb])
        # Rendered with a 3 px margin between box centres; pixel boxes of triangles shift by up to ~1 px.
        assert W.relation_holds(scene.relation, _centre(a), _centre(b), margin=1.5 * size / 32), format_prompt(scene)


def test_render_is_deterministic_in_the_seed():
    scenes = [parse_prompt("a red circle left of a blue square"), parse_prompt("three green triangles")]
    assert torch.equal(render_batch(scenes, seed=5), render_batch(scenes, seed=5))
    assert not torch.equal(render_batch(scenes, seed=5), render_batch(scenes, seed=6))
    one = render(scenes[0], np.random.default_rng(7))
    assert one.shape == (3, 32, 32) and torch.equal(one, render_batch(scenes[:1], np.random.default_rng(7))[0])
