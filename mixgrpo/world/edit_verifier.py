"""The verifier of shapes-world edits: was the edit made, and was everything else kept?

`verify_edit(results, inputs, instructions)` reads both images with the shapes-world detector
(`mixgrpo.world.verifier.detect`: colour, shape, box centre and area of every object) and checks the result
against the input and the instruction (`mixgrpo.world.edits`), batched over examples:

- The edit's own object: the `target` is the single input detection of the instruction's colour and shape
  (recolor, reshape, remove, move; "the red circle"); add and add_one have none.
- kept (everything else as it was): every other input detection is matched one to one with a result detection
  of the same colour and shape whose centre lies within POSITION_TOLERANCE and whose area is within a factor
  SIZE_TOLERANCE of it ("kept: <colour> <shape> at (x, y)", one requirement per object), and every unmatched
  result detection is of a colour-shape the edit may leave ("kept: no other objects": the target's and the
  subject's; an unknown shape never is).
- made (the edit happened), per kind:
    recolor / reshape  exactly one detection of the new colour-shape, within POSITION_TOLERANCE of the target,
                       and none of the old one left;
    remove             none of the target's colour-shape left;
    add                exactly one detection of the added colour-shape;
    add_one            exactly (input count + 1) detections of the colour-shape;
    move               exactly one detection of the moved colour-shape, in the relation to the anchor
                       (`scene.relation_holds` on box centres; the anchor's result detection when there is
                       exactly one, else its input position).
- success = made and kept; dense = fraction of the requirements met (made's and kept's together).

An input that does not show what the instruction names (no single red circle for "make the red circle blue",
an existing green square for "add a green square") is bad data, not a bad result: `EditInputError` names it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from mixgrpo.errors import ConfigError
from mixgrpo.world.edits import MOVE_INPUT_MARGIN, Edit, format_instruction, parse_instruction, place
from mixgrpo.world.scene import COLORS, MAX_INSTANCES, MIN_RADIUS, RELATIONS, SHAPES, Instance, relation_holds
from mixgrpo.world.verifier import Detection, detect

POSITION_TOLERANCE = 3.0 / 32
"""Largest distance between the box centres of an object in the input and in the result (fraction of the image
side: 3 px at 32 x 32) for the object to count as kept (or, for recolor and reshape, as edited in place).
Rendered layouts keep objects exactly (0 px); the smallest move of the world is 2 GAP = 4 px."""
SIZE_TOLERANCE = 1.5
"""Largest area ratio (either way) between a kept object's input and result detections."""


class EditInputError(ConfigError):
    """An input image does not show what its instruction names (it is not a shapes-world edit example)."""


@dataclass(frozen=True)
class EditVerifierResult:
    """Per example, [B] float32 on the CPU: made (1.0 when the edit happened), kept (1.0 when everything else was
    kept), success = made * kept, dense = the fraction of requirements met."""

    made: torch.Tensor
    kept: torch.Tensor
    success: torch.Tensor
    dense: torch.Tensor


def _of(detections: Sequence[Detection], key: tuple[str, str]) -> list[Detection]:
    return [d for d in detections if (d.color, d.shape) == key]


def _describe(detections: Sequence[Detection]) -> str:
    return ", ".join(f"{d.color} {d.shape}" for d in detections) or "no objects"


def edit_requirements(edit: Edit, before: Sequence[Detection], after: Sequence[Detection],
                      size: int) -> dict[str, bool]:
    """Each requirement of `edit` (module docstring) and whether the result's detections `after` meet it, given
    the input's detections `before` of images `size` pixels wide. Keys start with "made: " or "kept: "."""
    key = (edit.color, edit.shape)
    tolerance = POSITION_TOLERANCE * size
    targets = _of(before, key)
    instruction = format_instruction(edit)
    if edit.kind in ("recolor", "reshape", "remove", "move") and len(targets) != 1:
        raise EditInputError(f"the input image of {instruction!r} shows {_describe(before)}, not exactly one "
                             f"{edit.color} {edit.shape}: edit_verifier scores shapes-world edit examples only")
    if (edit.kind == "add" and targets) or (edit.kind == "add_one" and not targets) or (
            edit.kind in ("recolor", "reshape") and _of(before, edit.subject)):
        raise EditInputError(f"the input image of {instruction!r} shows {_describe(before)}: the instruction does "
                             f"not apply to it")
    if edit.kind == "move" and len(_of(before, edit.anchor)) != 1:
        raise EditInputError(f"the input image of {instruction!r} shows {_describe(before)}, not exactly one "
                             f"{' '.join(edit.anchor)}")
    target = targets[0] if edit.kind in ("recolor", "reshape", "remove", "move") else None
    others = [d for d in before if d is not target]

    # kept: match the other input objects one to one, nearest pairs first.
    pairs = sorted(((abs(a.x - b.x) + abs(a.y - b.y), i, j) for i, a in enumerate(others) for j, b in enumerate(after)
                    if (a.color, a.shape) == (b.color, b.shape) and max(abs(a.x - b.x), abs(a.y - b.y)) <= tolerance
                    and max(a.area / b.area, b.area / a.area) <= SIZE_TOLERANCE))
    matched: dict[int, int] = {}
    for _, i, j in pairs:
        if i not in matched and j not in matched.values():
            matched[i] = j
    met = {f"kept: {d.color} {d.shape} at ({d.x:.0f}, {d.y:.0f})": i in matched for i, d in enumerate(others)}
    may_leave = {key, edit.subject}
    leftover = [d for j, d in enumerate(after) if j not in matched.values()]
    met["kept: no other objects"] = all((d.color, d.shape) in may_leave for d in leftover)

    # made
    now = _of(after, edit.subject)
    if edit.kind in ("recolor", "reshape"):
        new = f"{edit.to_color} {edit.shape}" if edit.kind == "recolor" else f"{edit.color} {edit.to_shape}"
        met[f"made: a {new} where the {edit.color} {edit.shape} was"] = len(now) == 1 and max(
            abs(now[0].x - target.x), abs(now[0].y - target.y)) <= tolerance
        met[f"made: no {edit.color} {edit.shape} left"] = not _of(after, key)
    elif edit.kind == "remove":
        met[f"made: no {edit.color} {edit.shape} left"] = not now
    elif edit.kind in ("add", "add_one"):
        n = len(targets) + 1
        met[f"made: {n} {edit.color} {edit.shape}{'s' if n > 1 else ''}"] = len(now) == n
    else:
        met[f"made: one {edit.color} {edit.shape}"] = len(now) == 1
        anchors = _of(after, edit.anchor)
        anchor = anchors[0] if len(anchors) == 1 else _of(before, edit.anchor)[0]
        met[f"made: {edit.color} {edit.shape} {edit.relation} {' '.join(edit.anchor)}"] = any(
            relation_holds(edit.relation, (d.x, d.y), (anchor.x, anchor.y)) for d in now)
    return met


def verify_edit(results: torch.Tensor, inputs: torch.Tensor, instructions: Sequence[str | Edit]) -> EditVerifierResult:
    """Score edit results against their inputs and instructions (module docstring).

    results, inputs: [B, 3, H, W] float in [0, 1], the same size (any device); instructions: B instructions of
    the editing grammar (or parsed `Edit`s). Raises `EditParseError` for an instruction outside the grammar and
    `EditInputError` for an input that does not show what its instruction names.
    """
    if results.shape != inputs.shape:
        raise ValueError(f"results {tuple(results.shape)} and inputs {tuple(inputs.shape)} differ in shape: resize "
                         f"the inputs to the results' size")
    if len(instructions) != results.shape[0]:
        raise ValueError(f"got {results.shape[0]} results but {len(instructions)} instructions")
    edits = [e if isinstance(e, Edit) else parse_instruction(e) for e in instructions]
    size = results.shape[-1]
    made, kept, dense = [], [], []
    for edit, before, after in zip(edits, detect(inputs), detect(results)):
        met = edit_requirements(edit, before, after, size)
        made.append(all(v for k, v in met.items() if k.startswith("made: ")))
        kept.append(all(v for k, v in met.items() if k.startswith("kept: ")))
        dense.append(sum(met.values()) / len(met))
    made_t, kept_t = torch.tensor(made, dtype=torch.float32), torch.tensor(kept, dtype=torch.float32)
    return EditVerifierResult(made_t, kept_t, made_t * kept_t, torch.tensor(dense, dtype=torch.float32))


FAILURES: tuple[str, ...] = ("unedited", "wrong edit", "other moved", "other recolored", "other reshaped",
                              "other removed", "extra object")
"""Ways an edit can fail (`failed_layout`), for testing and measuring the verifier: the first two leave the edit
unmade, the others break what should be kept."""


def failed_layout(layout: Sequence[Instance], target: Sequence[Instance], edit: Edit, failure: str,
                  rng: np.random.Generator, size: int = 32) -> list[Instance] | None:
    """A wrong result of an edit drawn as (input `layout`, true `target`), or None when this pair has no such
    failure (no other object, no room):

        unedited         the input itself
        wrong edit       recolor / reshape to another colour / shape, add an object of another colour, add one
                         more of another colour, move to another relation (the asked one failing); none for remove
        other moved      an untouched object moved by at least twice the POSITION_TOLERANCE
        other recolored  an untouched object given a colour the scene does not show
        other reshaped   an untouched object given a shape its colour does not show
        other removed    an untouched object gone
        extra object     an object of a colour-shape the target does not show, in free space
    """
    key, out = (edit.color, edit.shape), list(target)
    shown = {(i.color, i.shape) for i in (*layout, *target)}
    others = [j for j, inst in enumerate(out) if inst in layout]  # untouched: the same instance in both
    if failure == "unedited":
        return list(layout)
    if failure == "wrong edit":
        if edit.kind == "remove":
            return None
        if edit.kind == "move":
            (anchor,) = [i for i in target if (i.color, i.shape) == tuple(edit.anchor)]
            (j,) = [j for j, i in enumerate(out) if (i.color, i.shape) == key]
            wrong = [r for r in RELATIONS if r != edit.relation]
            centre = place([anchor], out[j].r, rng, size, holds=[(wrong[int(rng.integers(3))], anchor, 0.0)],
                            fails=[(edit.relation, anchor, MOVE_INPUT_MARGIN * size)])
            return None if centre is None else out[:j] + [replace(out[j], x=centre[0], y=centre[1])] + out[j + 1:]
        j = len(out) - 1 if edit.kind in ("add", "add_one") else next(
            j for j, i in enumerate(out) if (i.color, i.shape) == edit.subject)
        if edit.kind == "reshape":
            choices = [replace(out[j], shape=s) for s in SHAPES if (edit.color, s) not in shown]
        else:
            choices = [replace(out[j], color=c) for c in COLORS if (c, out[j].shape) not in shown]
        return out[:j] + [choices[int(rng.integers(len(choices)))]] + out[j + 1:] if choices else None
    if failure == "extra object":
        free = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in shown]
        r = MIN_RADIUS * size
        centre = place(out, r, rng, size)
        if centre is None or len(out) >= MAX_INSTANCES:
            return None
        return out + [Instance(*free[int(rng.integers(len(free)))], *centre, r)]
    if failure not in FAILURES:
        raise ValueError(f"unknown failure {failure!r}; known: {', '.join(FAILURES)}")
    if not others:
        return None
    j = others[int(rng.integers(len(others)))]
    inst = out[j]
    if failure == "other removed":
        return out[:j] + out[j + 1:]
    if failure == "other moved":
        shift = 2 * POSITION_TOLERANCE * size
        for _ in range(8):
            centre = place(out[:j] + out[j + 1:], inst.r, rng, size)
            if centre is not None and max(abs(centre[0] - inst.x), abs(centre[1] - inst.y)) >= shift:
                return out[:j] + [replace(inst, x=centre[0], y=centre[1])] + out[j + 1:]
        return None
    if failure == "other recolored":
        choices = [replace(inst, color=c) for c in COLORS if (c, inst.shape) not in shown]
    else:
        choices = [replace(inst, shape=s) for s in SHAPES if (inst.color, s) not in shown]
    return out[:j] + [choices[int(rng.integers(len(choices)))]] + out[j + 1:] if choices else None
