"""The editing world: instruction grammar, edits of scenes, layout-preserving pairs, splits, the shipped example
files, the edit verifier and its reward."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import build_reward
from mixgrpo.world.edit_verifier import FAILURES, EditInputError, failed_layout, verify_edit
from mixgrpo.world.edits import (
    EDIT_KINDS,
    EXAMPLES_PER_SPLIT,
    HELDOUT_EDITS,
    Edit,
    EditError,
    EditParseError,
    apply_edit,
    edit_is_heldout,
    edit_layouts,
    edit_pairs,
    example_file,
    format_instruction,
    load_edit_examples,
    parse_instruction,
    possible_edits,
    random_edits,
    write_example_files,
)
from mixgrpo.world.scene import COLORS, SHAPES, ObjectSpec, Scene, all_scenes, draw, is_heldout, parse_prompt
from mixgrpo.world.verifier import detect


def _png(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _drawn(n: int, split: str, seed: int):
    """n (input layout, target layout, edit) of `split`, kinds in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for scene, edit in random_edits(rng, n, split, kinds=[EDIT_KINDS[i % 6] for i in range(n)]):
        while (pair := edit_layouts(scene, edit, rng)) is None:
            pass
        out.append((*pair, edit))
    return out


# ---------------------------------------------------------------------------------------------------------
# Grammar


def test_every_possible_edit_of_every_scene_round_trips():
    n = 0
    for scene in all_scenes():
        for kind in EDIT_KINDS:
            for edit in possible_edits(scene, kind):
                assert parse_instruction(format_instruction(edit)) == edit
                n += 1
    assert n > 10_000


@pytest.mark.parametrize("text, edit", [
    ("make the red circle blue", Edit("recolor", "red", "circle", to_color="blue")),
    ("Turn the green square into a triangle.", Edit("reshape", "green", "square", to_shape="triangle")),
    ("remove   the blue triangle", Edit("remove", "blue", "triangle")),
    ("add a green square", Edit("add", "green", "square")),
    ("add one more yellow circle", Edit("add_one", "yellow", "circle")),
    ("move the red circle left of the blue square",
     Edit("move", "red", "circle", relation="left of", anchor=("blue", "square"))),
])
def test_parse_instruction(text, edit):
    assert parse_instruction(text) == edit


@pytest.mark.parametrize("text, names", [
    ("make the purple circle blue", "'purple'"),
    ("make the red circle red", "other than red"),
    ("paint the red circle blue", "'paint'"),
    ("move the red circle near the blue square", "'near'"),
    ("move the red circle left of the red circle", "itself"),
    ("remove the blue triangle now", "the end of the instruction"),
    ("add a red circle; then stop", "only letters"),
])
def test_a_bad_instruction_names_the_problem(text, names):
    with pytest.raises(EditParseError, match=names):
        parse_instruction(text)


# ---------------------------------------------------------------------------------------------------------
# Edits of scenes


@pytest.mark.parametrize("scene, instruction, expected", [
    ("a red circle and a blue square", "make the red circle yellow", "a yellow circle and a blue square"),
    ("a red circle left of a blue square", "turn the red circle into a triangle", "a red triangle and a blue square"),
    ("a red circle and two blue squares", "remove the red circle", "two blue squares"),
    ("a red circle", "add a green square", "a red circle and a green square"),
    ("a red circle and a blue square", "add one more blue square", "a red circle and two blue squares"),
    ("a red circle left of a blue square", "move the blue square below the red circle",
     "a blue square below a red circle"),
    ("a red circle and a blue square", "move the red circle above the blue square", "a red circle above a blue square"),
])
def test_apply_edit(scene, instruction, expected):
    assert apply_edit(parse_prompt(scene), parse_instruction(instruction)) == parse_prompt(expected)


@pytest.mark.parametrize("scene, instruction, names", [
    ("a blue square", "make the red circle yellow", "exactly one red circle"),
    ("two red circles", "remove the red circle", "exactly one red circle"),
    ("a red circle", "remove the red circle", "empty scene"),
    ("a red circle", "add a red circle", "add one more"),
    ("a red circle", "add one more blue square", "add a"),
    ("a red circle and a yellow circle", "make the red circle yellow", "differ in colour or shape"),
    ("three red circles", "add one more red circle", "largest count"),
    ("a red circle left of a blue square", "move the red circle left of the blue square", "other axis"),
    ("a red circle left of a blue square", "move the blue square left of the red circle", "other axis"),
    ("a red circle, a blue square and a green circle", "move the red circle above the blue square", "exactly one"),
])
def test_an_edit_that_does_not_apply_names_why(scene, instruction, names):
    with pytest.raises(EditError, match=names):
        apply_edit(parse_prompt(scene), parse_instruction(instruction))


def test_possible_edits_are_the_edits_that_apply():
    for scene in all_scenes()[::7]:
        for kind in EDIT_KINDS:
            edits = possible_edits(scene, kind)
            assert len(set(edits)) == len(edits)
            for edit in edits:
                assert edit.kind == kind and apply_edit(scene, edit).n_instances <= 3
        recolors = {(e.color, e.shape, e.to_color) for e in possible_edits(scene, "recolor")}
        have = {(o.color, o.shape) for o in scene.objects}
        assert recolors == {(o.color, o.shape, c) for o in scene.objects if o.count == 1 for c in COLORS
                            if (c, o.shape) not in have}


# ---------------------------------------------------------------------------------------------------------
# Layout-preserving pairs


def test_targets_keep_every_untouched_object_and_change_the_edited_one():
    for layout, target, edit in _drawn(300, "train", seed=0):
        key = (edit.color, edit.shape)
        untouched = [i for i in layout if edit.kind in ("add", "add_one") or (i.color, i.shape) != key]
        assert all(i in target for i in untouched), format_instruction(edit)
        changed = [i for i in target if i not in layout]
        assert len(target) - len(layout) == {"remove": -1, "add": 1, "add_one": 1}.get(edit.kind, 0)
        if edit.kind == "remove":
            assert changed == []
        else:
            (new,) = changed
            assert (new.color, new.shape) == edit.subject
            if edit.kind in ("recolor", "reshape"):
                (old,) = [i for i in layout if (i.color, i.shape) == key]
                assert (new.x, new.y, new.r) == (old.x, old.y, old.r)
            if edit.kind == "move":
                (old,) = [i for i in layout if (i.color, i.shape) == key]
                assert new.r == old.r and (new.x, new.y) != (old.x, old.y)


def test_rendered_targets_show_the_target_scene():
    from mixgrpo.world.verifier import verify

    rng = np.random.default_rng(1)
    pairs = random_edits(rng, 300, "heldout")
    layouts = []
    for scene, edit in pairs:
        while (drawn := edit_layouts(scene, edit, rng)) is None:
            pass
        layouts.append(drawn)
    assert verify(draw([a for a, _ in layouts]), [s for s, _ in pairs]).strict.mean() == 1.0
    assert verify(draw([b for _, b in layouts]), [apply_edit(s, e) for s, e in pairs]).strict.mean() == 1.0


def test_edit_pairs_are_deterministic_and_in_their_split():
    inputs, instructions, targets = edit_pairs(seed=3, n=64)
    assert inputs.shape == targets.shape == (64, 3, 32, 32) and len(instructions) == 64
    assert 0 <= inputs.min() and inputs.max() <= 1
    again = edit_pairs(seed=3, n=64)
    assert torch.equal(again[0], inputs) and again[1] == instructions and torch.equal(again[2], targets)
    assert not any(edit_is_heldout(parse_instruction(i)) for i in instructions)
    assert {parse_instruction(i).kind for i in instructions} == set(EDIT_KINDS)
    _, heldout, _ = edit_pairs(seed=3, n=32, split="heldout")
    assert all(edit_is_heldout(parse_instruction(i)) for i in heldout)
    with pytest.raises(ConfigError, match="'train' or 'heldout'"):
        edit_pairs(seed=0, n=1, split="test")


def test_heldout_edits_hold_out_each_colour_shape_with_one_kind():
    assert sorted((c, s) for _, c, s in HELDOUT_EDITS) == sorted((c, s) for c in COLORS for s in SHAPES)
    for kind in EDIT_KINDS:
        (a, b) = [(c, s) for k, c, s in HELDOUT_EDITS if k == kind]
        assert a[0] != b[0] and a[1] != b[1]


# ---------------------------------------------------------------------------------------------------------
# The shipped example files


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shipped_examples_are_valid_and_in_their_split(split):
    examples = load_edit_examples(split)
    assert len(examples) == EXAMPLES_PER_SPLIT[split]
    images = torch.stack([_png(path) for _, path in examples])
    assert images.shape[1:] == (3, 32, 32)
    for (instruction, _), found in zip(examples, detect(images)):
        edit = parse_instruction(instruction)
        counts: dict = {}
        for d in found:
            assert d.shape != "unknown"
            counts[(d.color, d.shape)] = counts.get((d.color, d.shape), 0) + 1
        scene = Scene(tuple(ObjectSpec(c, s, n) for (c, s), n in counts.items()))
        target = apply_edit(scene, edit)  # raises unless the input shows what the instruction names
        assert edit_is_heldout(edit) == (split == "heldout")
        if split == "train":  # no held-out composition, of edits or of scenes, in what train shows
            assert not is_heldout(scene) and not is_heldout(target)
    assert {parse_instruction(i).kind for i, _ in examples} == set(EDIT_KINDS)


def test_example_files_regenerate_identically(tmp_path):
    write_example_files(tmp_path / "a")
    write_example_files(tmp_path / "b")
    for split in EXAMPLES_PER_SPLIT:
        shipped = example_file(split)
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == shipped.read_bytes()
        for line in shipped.read_text().splitlines():
            (name,) = json.loads(line)["images"]
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
            # pixels, not bytes, against the shipped files: PNG compression may differ between zlib builds
            assert torch.equal(_png(tmp_path / "a" / name), _png(shipped.parent / name)), name
        assert len(list((tmp_path / "a" / split).glob("*.png"))) == EXAMPLES_PER_SPLIT[split]


# ---------------------------------------------------------------------------------------------------------
# The edit verifier


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_the_verifier_passes_true_targets_and_fails_every_kind_of_failure(split):
    drawn = _drawn(240, split, seed=2)
    inputs = draw([a for a, _, _ in drawn])
    edits = [e for _, _, e in drawn]
    result = verify_edit(draw([b for _, b, _ in drawn]), inputs, [format_instruction(e) for e in edits])
    assert result.success.mean() == 1.0 and result.dense.mean() == 1.0
    rng = np.random.default_rng(3)
    for failure in FAILURES:
        wrong = [(i, failed_layout(a, b, e, failure, rng)) for i, (a, b, e) in enumerate(drawn)]
        idx = [i for i, w in wrong if w is not None]
        assert len(idx) >= 100, failure
        result = verify_edit(draw([w for _, w in wrong if w is not None]), inputs[idx], [edits[i] for i in idx])
        assert result.success.sum() == 0, failure
        assert (result.made if failure in ("unedited", "wrong edit") else result.kept).sum() == 0, failure
        assert result.dense.max() < 1, failure
        if failure == "unedited":
            assert result.kept.mean() == 1.0  # nothing else changed


def test_the_verifier_tolerates_a_blurry_noisy_result():
    import torch.nn.functional as F

    drawn = _drawn(120, "train", seed=4)
    inputs, targets = draw([a for a, _, _ in drawn]), draw([b for _, b, _ in drawn])
    k = torch.tensor([1.0, 2.0, 1.0])
    blur = F.conv2d(F.pad(targets, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k / 16).expand(3, 1, 3, 3), groups=3)
    noisy = (blur + 0.05 * torch.randn(blur.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert verify_edit(noisy, inputs, [e for _, _, e in drawn]).success.mean() >= 0.97


def test_an_input_that_does_not_show_the_instruction_is_named():
    (layout, target, _), = _drawn(1, "train", seed=5)
    image = draw([layout])
    names = {f"{i.color} {i.shape}" for i in layout}
    absent = next(f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in names)
    with pytest.raises(EditInputError, match=f"not exactly one {absent}"):
        verify_edit(image, image, [f"remove the {absent}"])
    with pytest.raises(ValueError, match="resize the inputs"):
        verify_edit(image, torch.zeros(1, 3, 64, 64), [f"remove the {absent}"])


# ---------------------------------------------------------------------------------------------------------
# The reward


def test_edit_verifier_reward_scores_against_the_inputs():
    drawn = _drawn(12, "train", seed=6)
    inputs, targets = draw([a for a, _, _ in drawn]), draw([b for _, b, _ in drawn])
    prompts = [format_instruction(e) for _, _, e in drawn]
    strict = build_reward("edit_verifier", {"score": "strict"})
    assert strict.takes_inputs
    assert strict(targets, prompts, inputs=inputs).tolist() == [1.0] * 12
    assert strict(inputs, prompts, inputs=inputs).tolist() == [0.0] * 12
    kept = build_reward("edit_verifier", {"score": "kept"})
    assert kept(inputs, prompts, inputs=inputs).tolist() == [1.0] * 12
    dense = build_reward("edit_verifier")(inputs, prompts, inputs=inputs)
    assert ((0 < dense) & (dense < 1)).all()
    broken = targets.clone()
    broken[0, 0, 0, 0] = float("nan")
    scores = strict(broken, prompts, inputs=inputs)
    assert scores[0].isnan() and scores[1:].tolist() == [1.0] * 11


def test_edit_verifier_reward_refuses_bad_use():
    with pytest.raises(ConfigError, match="dense, strict, made, kept"):
        build_reward("edit_verifier", {"score": "success"})
    reward = build_reward("edit_verifier")
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="got none"):
        reward(images, ["remove the red circle"])
    with pytest.raises(EditParseError, match="edit_verifier reward.*edit instructions only"):
        reward(images, ["a red circle"], inputs=images)


def test_an_unknown_example_split_names_the_sources():
    with pytest.raises(ConfigError, match="world:edit_train and world:edit_heldout"):
        load_edit_examples("test")
