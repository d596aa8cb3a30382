"""Editing on the shapes world: instruction grammar, edits of a scene, layout-preserving (input, target) pairs,
train / held-out edit compositions and the shipped example files.

An edit names one object of the input scene by its colour and shape ("the red circle": a single object of the
scene) and changes only that object:

    kind       instruction                                      target scene (`apply_edit`)
    recolor    "make the red circle blue"                       the red circle becomes a blue circle
    reshape    "turn the red circle into a square"              the red circle becomes a red square
    remove     "remove the blue triangle"                       the blue triangle is gone
    add        "add a green square"                             a green square more (none in the input)
    add_one    "add one more yellow circle"                     the yellow circles' count + 1
    move       "move the red circle left of the blue square"    the red circle now left of the blue square

`edit_pairs(seed, n)` renders (input, instruction, target) triples for pre-training: the target keeps the input's
layout (every untouched object at the same position and size, pixel for pixel) and changes only the edited
object (a recoloured or reshaped object keeps its box; an added object goes into free space; a moved object keeps
its size). `mixgrpo.world.edit_verifier` checks an image against an input and an instruction.

Held-out edit compositions (`edit_is_heldout`): (kind, colour, shape) triples of `HELDOUT_EDITS`; no train
example has one, nor a scene of a held-out composition of `mixgrpo.world.scene.is_heldout` (input or target).
The example files (`world:edit_train`, `world:edit_heldout`) live in `mixgrpo/world/edit_examples/`;
regenerate them with `python -m mixgrpo.world.edits`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mixgrpo.errors import ConfigError
from mixgrpo.world.scene import (
    BORDER,
    COLORS,
    DEFAULT_INSTANCES,
    GAP,
    MAX_OBJECTS,
    MAX_RADIUS,
    MIN_RADIUS,
    RELATION_MARGIN,
    RELATIONS,
    SHAPES,
    Instance,
    ObjectSpec,
    PromptParseError,
    Scene,
    draw,
    is_heldout,
    layout_batch,
    random_scene,
    relation_margins,
)

EDIT_KINDS: tuple[str, ...] = ("recolor", "reshape", "remove", "add", "add_one", "move")

HELDOUT_EDITS: frozenset[tuple[str, str, str]] = frozenset({
    ("recolor", "blue", "circle"), ("recolor", "yellow", "triangle"),
    ("reshape", "green", "circle"), ("reshape", "red", "triangle"),
    ("remove", "yellow", "circle"), ("remove", "blue", "square"),
    ("add", "red", "square"), ("add", "green", "triangle"),
    ("add_one", "green", "square"), ("add_one", "blue", "triangle"),
    ("move", "red", "circle"), ("move", "yellow", "square"),
})
"""Held-out (kind, colour, shape) compositions, keyed by the edit's `subject` (the object the edit leaves in the
image: a recolour's new colour with the old shape, a reshape's old colour with the new shape, else the named
object). Each of the 12 colour-shapes is held out with exactly one kind, and each kind with two colour-shapes
that differ in colour and shape, so train shows every kind with 10 colour-shapes and every colour-shape with 5
kinds: "make the green circle blue" is held out (a blue circle made by recolouring), "turn the green square into
a circle" too (a green circle made by reshaping)."""

MOVE_INPUT_MARGIN = 1.0 / 32
"""In a move example's input the requested relation fails by at least this much (fraction of the side, 1 px at
32 x 32, `scene.relation_holds` margins), so the unedited input never passes for the edited one."""

EXAMPLES_PER_SPLIT = {"train": 384, "heldout": 128}
"""Examples in the shipped files, the kinds in turn (64 per kind in train, 21-22 held out)."""
EXAMPLE_SEEDS = {"train": 0, "heldout": 1}


class EditParseError(PromptParseError):
    """An instruction does not follow the editing grammar (see `parse_instruction`)."""


class EditError(ValueError):
    """An edit does not apply to a scene (it names an object the scene lacks, or makes an invalid scene)."""


@dataclass(frozen=True)
class Edit:
    """One edit of the object (color, shape): `to_color` for recolor, `to_shape` for reshape, `relation` and the
    `anchor` object (colour, shape) for move ("move A <relation> the anchor")."""

    kind: str
    color: str
    shape: str
    to_color: str | None = None
    to_shape: str | None = None
    relation: str | None = None
    anchor: tuple[str, str] | None = None

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; known: {', '.join(EDIT_KINDS)}")
        ObjectSpec(self.color, self.shape)  # validates both
        wants = {"recolor": "to_color", "reshape": "to_shape", "move": "relation"}.get(self.kind)
        given = {f for f in ("to_color", "to_shape", "relation") if getattr(self, f) is not None}
        if given != ({wants} if wants else set()) or (self.kind == "move") != (self.anchor is not None):
            raise ValueError(f"a {self.kind} edit takes {wants or 'no argument'}"
                             f"{' and an anchor' if self.kind == 'move' else ''}, got {sorted(given)}")
        if self.kind == "recolor" and (self.to_color not in COLORS or self.to_color == self.color):
            raise ValueError(f"recolor needs a new colour of {', '.join(COLORS)} other than {self.color}, "
                             f"got {self.to_color!r}")
        if self.kind == "reshape" and (self.to_shape not in SHAPES or self.to_shape == self.shape):
            raise ValueError(f"reshape needs a new shape of {', '.join(SHAPES)} other than {self.shape}, "
                             f"got {self.to_shape!r}")
        if self.kind == "move":
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; known: {', '.join(RELATIONS)}")
            ObjectSpec(*self.anchor)
            if tuple(self.anchor) == (self.color, self.shape):
                raise ValueError("move relates an object to another object, not to itself")

    @property
    def subject(self) -> tuple[str, str]:
        """The (colour, shape) the edit leaves in the image: what `HELDOUT_EDITS` keys on."""
        if self.kind == "recolor":
            return self.to_color, self.shape
        if self.kind == "reshape":
            return self.color, self.to_shape
        return self.color, self.shape


# ---------------------------------------------------------------------------------------------------------
# Grammar


def format_instruction(edit: Edit) -> str:
    """The canonical instruction of an edit; `parse_instruction(format_instruction(e)) == e`."""
    obj = f"{edit.color} {edit.shape}"
    if edit.kind == "recolor":
        return f"make the {obj} {edit.to_color}"
    if edit.kind == "reshape":
        return f"turn the {obj} into a {edit.to_shape}"
    if edit.kind == "remove":
        return f"remove the {obj}"
    if edit.kind == "add":
        return f"add a {obj}"
    if edit.kind == "add_one":
        return f"add one more {obj}"
    return f"move the {obj} {edit.relation} the {' '.join(edit.anchor)}"


_WORD = re.compile(r"[a-z]+")


def parse_instruction(text: str) -> Edit:
    """Parse an instruction of the grammar

        instruction := "make the" object colour                 (recolor)
                     | "turn the" object "into" ("a" | "an") shape   (reshape)
                     | "remove the" object                      (remove)
                     | "add" ("a" | "an") object                (add)
                     | "add one more" object                    (add_one)
                     | "move the" object relation "the" object  (move)
        object      := colour shape
        relation    := left of | right of | above | below

    Case, surrounding whitespace and a final period are ignored. Raises `EditParseError` naming the instruction
    and the first word that does not fit.
    """
    clean = text.strip().lower().rstrip(".")
    words = _WORD.findall(clean)
    if " ".join(words) != " ".join(clean.split()):
        raise EditParseError(f"cannot parse instruction {text!r}: only letters and spaces are allowed")
    pos = 0

    def fail(expected: str) -> EditParseError:
        got = repr(words[pos]) if pos < len(words) else "the end of the instruction"
        return EditParseError(f"cannot parse instruction {text!r}: expected {expected} at word {pos + 1}, got {got}")

    def take(options: Sequence[str], what: str) -> str:
        nonlocal pos
        for option in options:  # options may span words ("left of")
            n = len(option.split())
            if " ".join(words[pos:pos + n]) == option:
                pos += n
                return option
        raise fail(what)

    def take_object() -> tuple[str, str]:
        color = take(list(COLORS), f"a colour ({', '.join(COLORS)})")
        return color, take(SHAPES, f"a shape ({', '.join(SHAPES)})")

    verb = take(("make the", "turn the", "remove the", "add one more", "add a", "add an", "move the"),
                "'make the', 'turn the', 'remove the', 'add a', 'add one more' or 'move the'")
    color, shape = take_object()
    fields: dict = {}
    if verb == "make the":
        kind, fields["to_color"] = "recolor", take(list(COLORS), f"the new colour ({', '.join(COLORS)})")
    elif verb == "turn the":
        take(("into a", "into an"), "'into a'")
        kind, fields["to_shape"] = "reshape", take(SHAPES, f"the new shape ({', '.join(SHAPES)})")
    elif verb == "move the":
        kind, fields["relation"] = "move", take(RELATIONS, f"a relation ({', '.join(RELATIONS)})")
        take(("the",), "'the'")
        fields["anchor"] = take_object()
    else:
        kind = {"remove the": "remove", "add one more": "add_one"}.get(verb, "add")
    if pos < len(words):
        raise fail("the end of the instruction")
    try:
        return Edit(kind, color, shape, **fields)
    except ValueError as e:
        raise EditParseError(f"cannot parse instruction {text!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Edits of scene specs


def _index(scene: Scene, key: tuple[str, str]) -> int | None:
    return next((i for i, o in enumerate(scene.objects) if (o.color, o.shape) == key), None)


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene an edit asks for (the target spec). Raises `EditError` when the edit does not apply: recolor,
    reshape, remove and move name a single object of the scene ("the red circle"); add names a colour-shape the
    scene lacks, add_one one it has; move needs a scene of exactly its two objects, both single; the result
    must be a valid scene (distinct colour-shapes, at most MAX_OBJECTS objects and MAX_INSTANCES instances); a
    move of a scene with a relation goes along the other axis ("A left of B" -> "move A above B"): the same
    relation is no edit, and the opposite one leaves no room at 32 x 32 for an input and a target layout that
    share the anchor (two boxes of up to 14 px, 2 px apart, on each side of it).

    Positions are not part of a spec: a kept relation is the layout's business (`render_edits` keeps it), so a
    target spec has a relation only after a move.
    """
    i = _index(scene, (edit.color, edit.shape))
    objects = list(scene.objects)
    if edit.kind in ("recolor", "reshape", "remove", "move") and (i is None or objects[i].count != 1):
        raise EditError(f"{format_instruction(edit)!r} needs exactly one {edit.color} {edit.shape} in the scene")
    if edit.kind == "add" and i is not None:
        raise EditError(f"{format_instruction(edit)!r}: the scene already has a {edit.color} {edit.shape} "
                        f"(use 'add one more')")
    if edit.kind == "add_one" and i is None:
        raise EditError(f"{format_instruction(edit)!r}: the scene has no {edit.color} {edit.shape} (use 'add a')")
    if edit.kind == "recolor":
        objects[i] = replace(objects[i], color=edit.to_color)
    elif edit.kind == "reshape":
        objects[i] = replace(objects[i], shape=edit.to_shape)
    elif edit.kind == "remove":
        if len(objects) == 1:
            raise EditError(f"{format_instruction(edit)!r} would leave an empty scene")
        del objects[i]
    elif edit.kind == "add":
        objects.append(ObjectSpec(edit.color, edit.shape))
    elif edit.kind == "add_one":
        if objects[i].count == 3:
            raise EditError(f"{format_instruction(edit)!r}: the scene already has three, the largest count")
        objects[i] = replace(objects[i], count=objects[i].count + 1)
    else:
        j = _index(scene, edit.anchor)
        if j is None or len(objects) != 2 or objects[j].count != 1:
            raise EditError(f"{format_instruction(edit)!r} needs a scene of exactly one {edit.color} {edit.shape} "
                            f"and one {' '.join(edit.anchor)}")
        if scene.relation is not None:
            stated = scene.relation if i == 0 else _OPPOSITE[scene.relation]  # as "edited <relation> anchor"
            if edit.relation in (stated, _OPPOSITE[stated]):
                raise EditError(f"{format_instruction(edit)!r}: the scene puts the {edit.color} {edit.shape} "
                                f"{stated} the {' '.join(edit.anchor)}; a move keeps to the other axis (the same "
                                f"relation is no edit, the opposite one leaves no room for both layouts)")
        return Scene((objects[i], objects[j]), edit.relation)
    try:
        return Scene(tuple(objects))
    except ValueError as e:
        raise EditError(f"{format_instruction(edit)!r} does not apply to the scene: {e}") from None


def possible_edits(scene: Scene, kind: str, max_instances: int = DEFAULT_INSTANCES) -> list[Edit]:
    """Every edit of `kind` that applies to `scene` with a target of at most `max_instances` drawn instances, in a
    fixed order."""
    singles = [(o.color, o.shape) for o in scene.objects if o.count == 1]
    have = {(o.color, o.shape) for o in scene.objects}
    room = scene.n_instances < max_instances
    if kind == "recolor":
        edits = [Edit(kind, c, s, to_color=t) for c, s in singles for t in COLORS if (t, s) not in have]
    elif kind == "reshape":
        edits = [Edit(kind, c, s, to_shape=t) for c, s in singles for t in SHAPES if (c, t) not in have]
    elif kind == "remove":
        edits = [Edit(kind, c, s) for c, s in singles] if len(scene.objects) > 1 else []
    elif kind == "add":
        ok = room and len(scene.objects) < MAX_OBJECTS
        edits = [Edit(kind, c, s) for c in COLORS for s in SHAPES if (c, s) not in have] if ok else []
    elif kind == "add_one":
        edits = [Edit(kind, o.color, o.shape) for o in scene.objects if o.count < 3] if room else []
    elif kind == "move":
        edits = ([Edit(kind, *a, relation=r, anchor=b) for a, b in (singles, singles[::-1]) for r in RELATIONS]
                 if len(scene.objects) == 2 and len(singles) == 2 else [])
    else:
        raise ValueError(f"unknown edit kind {kind!r}; known: {', '.join(EDIT_KINDS)}")
    return [e for e in edits if _applies(scene, e)]


def _applies(scene: Scene, edit: Edit) -> bool:
    try:
        apply_edit(scene, edit)
    except EditError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Splits


def edit_is_heldout(edit: Edit) -> bool:
    """Whether the edit is a held-out composition: (kind, *subject) in HELDOUT_EDITS."""
    return (edit.kind, *edit.subject) in HELDOUT_EDITS


def in_split(scene: Scene, edit: Edit, split: str) -> bool:
    """Whether (input scene, edit) belongs to `split`: "heldout" = a held-out edit composition (any scene);
    "train" = neither the edit nor the input or target scene is a held-out composition."""
    if split == "heldout":
        return edit_is_heldout(edit)
    if split == "train":
        return not (edit_is_heldout(edit) or is_heldout(scene) or is_heldout(apply_edit(scene, edit)))
    raise ConfigError(f"unknown edit split {split!r}; use 'train' or 'heldout'")


def random_edits(rng: np.random.Generator, n: int, split: str = "train",
                 kinds: Sequence[str] | None = None) -> list[tuple[Scene, Edit]]:
    """n random (input scene, edit) pairs of `split`: the kind uniform (or kinds[i] for the i-th pair), the input
    a `random_scene` of 1-2 objects (held-out scene compositions allowed only in "heldout"), the edit uniform
    among the possible edits of that kind in the split (inputs without one are redrawn)."""
    if split not in EXAMPLES_PER_SPLIT:
        raise ConfigError(f"unknown edit split {split!r}; use 'train' or 'heldout'")
    out = []
    for i in range(n):
        kind = kinds[i] if kinds is not None else EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
        while True:
            scene = random_scene(rng, max_objects=2, allow_heldout=split == "heldout")
            edits = [e for e in possible_edits(scene, kind) if in_split(scene, e, split)]
            if edits:
                out.append((scene, edits[int(rng.integers(len(edits)))]))
                break
    return out


# ---------------------------------------------------------------------------------------------------------
# Layout-preserving rendering


def place(others: Sequence[Instance], r: float, rng: np.random.Generator, size: int, tries: int = 256,
           holds: Sequence[tuple[str, Instance, float]] = (),
           fails: Sequence[tuple[str, Instance, float]] = ()) -> tuple[float, float] | None:
    """A centre (x, y) in pixels for a new box of half-size r inside the border and GAP from every box of
    `others`, with "new <relation> other" holding by more than `margin` (pixels) for each of `holds` and failing by
    at least `margin` for each of `fails`: the first valid of `tries` uniform candidates, or None."""
    lo = r + BORDER * size
    cand = lo + rng.random((tries, 2)) * (size - 2 * lo)  # [tries, 2]
    ok = np.ones(tries, dtype=bool)
    for o in others:
        ok &= np.abs(cand - [o.x, o.y]).max(1) >= r + o.r + GAP * size
    for rules, sign in ((holds, 1), (fails, -1)):
        for relation, other, margin in rules:
            m = relation_margins(cand, np.array([other.x, other.y]))[:, RELATIONS.index(relation)]  # [tries]
            ok &= m > margin if sign > 0 else m <= -margin
    return (float(cand[ok.argmax(), 0]), float(cand[ok.argmax(), 1])) if ok.any() else None


def edit_layouts(scene: Scene, edit: Edit, rng: np.random.Generator,
                 size: int = 32) -> tuple[list[Instance], list[Instance]] | None:
    """A random (input, target) layout pair of an edit of `scene`, or None when this draw found no room (draw
    again). The target keeps every untouched instance of the input exactly; the edited one is changed in place
    (recolour, reshape: same centre and half-size), gone (remove), added in free space (add, add_one: half-size
    uniform in [MIN_RADIUS, MAX_RADIUS], shrunk in 5% steps down to MIN_RADIUS while it does not fit) or moved
    (same half-size). Moves are drawn backwards, since a random input rarely leaves room on the requested side:
    the target scene's layout first (the relation held with RELATION_MARGIN), then the input position of the
    moved object in free space where the relation fails by MOVE_INPUT_MARGIN (and the input scene's own relation,
    if any, holds with RELATION_MARGIN)."""
    key = (edit.color, edit.shape)
    if edit.kind == "move":
        target_scene = apply_edit(scene, edit)
        (target,) = layout_batch([target_scene], rng, size)
        moved, anchor = target  # target_scene lists the moved object first
        holds = []
        if scene.relation is not None:  # "first <relation> second" of the input, as "moved <relation> anchor"
            first_moved = (scene.objects[0].color, scene.objects[0].shape) == key
            holds = [(scene.relation if first_moved else _OPPOSITE[scene.relation], anchor, RELATION_MARGIN * size)]
        centre = place([anchor], moved.r, rng, size, holds=holds,
                        fails=[(edit.relation, anchor, MOVE_INPUT_MARGIN * size)])
        if centre is None:
            return None
        start = replace(moved, x=centre[0], y=centre[1])
        layout = [start, anchor] if (scene.objects[0].color, scene.objects[0].shape) == key else [anchor, start]
        return layout, target
    (layout,) = layout_batch([scene], rng, size)
    out = list(layout)
    if edit.kind in ("add", "add_one"):
        r = rng.uniform(MIN_RADIUS, MAX_RADIUS) * size
        while True:
            centre = place(out, r, rng, size)
            if centre is not None:
                return layout, out + [Instance(edit.color, edit.shape, *centre, r)]
            if r <= MIN_RADIUS * size:
                return None
            r = max(r * 0.95, MIN_RADIUS * size)
    (i,) = [i for i, inst in enumerate(layout) if (inst.color, inst.shape) == key]
    if edit.kind == "recolor":
        out[i] = replace(out[i], color=edit.to_color)
    elif edit.kind == "reshape":
        out[i] = replace(out[i], shape=edit.to_shape)
    else:
        del out[i]
    return layout, out


def render_edits(pairs: Sequence[tuple[Scene, Edit]], seed: int | np.random.Generator,
                 size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, 3, size, size] float32 in [0, 1] of (input scene, edit) pairs (`edit_layouts`,
    drawn by the world's renderer); deterministic in `seed`. A draw without room is redrawn (up to 100 times)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    inputs, targets = [], []
    for scene, edit in pairs:
        apply_edit(scene, edit)  # a clear error for an edit that does not apply, before any layout
        for _ in range(100):
            drawn = edit_layouts(scene, edit, rng, size)
            if drawn is not None:
                break
        else:
            raise RuntimeError(f"could not draw {format_instruction(edit)!r} on {scene} at size {size}")
        inputs.append(drawn[0])
        targets.append(drawn[1])
    return draw(inputs, size), draw(targets, size)


def edit_pairs(seed: int, n: int, split: str = "train",
               size: int = 32) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """n random editing examples of `split` for pre-training: inputs [n, 3, size, size], the n instructions,
    targets [n, 3, size, size], float32 in [0, 1]; deterministic in `seed`. The "train" split never shows a
    held-out edit or scene composition."""
    rng = np.random.default_rng(seed)
    pairs = random_edits(rng, n, split)
    inputs, targets = render_edits(pairs, rng, size)
    return inputs, [format_instruction(e) for _, e in pairs], targets


# ---------------------------------------------------------------------------------------------------------
# Example files


def _examples_dir() -> Path:
    return Path(str(resources.files("mixgrpo.world").joinpath("edit_examples")))


def example_file(split: str) -> Path:
    """The JSONL file of the shipped editing examples of `split` ("train" or "heldout"): one
    {"prompt": instruction, "images": [path of the input PNG, relative to the file's folder]} per line."""
    if split not in EXAMPLES_PER_SPLIT:
        raise ConfigError(f"unknown edit split {split!r}: the editing examples are world:edit_train and "
                          f"world:edit_heldout")
    return _examples_dir() / f"{split}.jsonl"


def load_edit_examples(split: str) -> list[tuple[str, Path]]:
    """The shipped examples of `split` ("train" or "heldout") as (instruction, absolute input PNG path)."""
    path = example_file(split)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["prompt"], path.parent / r["images"][0]) for r in records]


def write_example_files(root: Path | None = None, size: int = 32) -> None:
    """Write the example files (JSONL and input PNGs) of both splits under `root` (default: the package's
    edit_examples folder); deterministic: the kinds in turn, `EXAMPLE_SEEDS`."""
    from PIL import Image

    root = Path(root) if root is not None else _examples_dir()
    for split, n in EXAMPLES_PER_SPLIT.items():
        rng = np.random.default_rng(EXAMPLE_SEEDS[split])
        pairs = random_edits(rng, n, split, kinds=[EDIT_KINDS[i % len(EDIT_KINDS)] for i in range(n)])
        inputs, _ = render_edits(pairs, rng, size)
        (root / split).mkdir(parents=True, exist_ok=True)
        for stale in (root / split).glob("*.png"):
            stale.unlink()
        lines = []
        pixels = (inputs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, ((_, edit), image) in enumerate(zip(pairs, pixels)):
            name = f"{split}/{i:04d}.png"
            Image.fromarray(image).save(root / name, format="PNG")
            lines.append(json.dumps({"prompt": format_instruction(edit), "images": [name]}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_example_files()
