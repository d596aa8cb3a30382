"""The shapes world: prompt grammar, scene spec, renderer and train / held-out splits.

A scene is one to three objects (a colour, a shape and a count each) on a plain background, with an
optional spatial relation between the first two objects when both are single:

    "a red circle"                                  Scene((ObjectSpec("red", "circle"),))
    "two blue squares"                              Scene((ObjectSpec("blue", "square", 2),))
    "a green triangle left of a yellow circle"      Scene((green triangle, yellow circle), "left of")
    "a red circle and two blue squares"             Scene((red circle, ObjectSpec("blue", "square", 2)))
    "a red circle, a blue square and a green triangle"

`render` draws a random layout satisfying the spec (objects never overlap; a relation holds with a clear
margin along its axis; `layout_batch` and `draw` are its two halves); `mixgrpo.world.verifier` checks images
against the same spec. Held-out compositions (`is_heldout`) are object pairs and count-colour-shape triples
that no train prompt contains; `split_prompts` enumerates the two prompt files shipped in
`mixgrpo/world/prompts/` (regenerate them with `python -m mixgrpo.world.scene`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mixgrpo.errors import ConfigError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
}
"""Object colours (8-bit RGB), pairwise at least 0.6 apart in [0, 1] RGB so they survive a blurry model."""

BACKGROUND: tuple[int, int, int] = (0, 0, 0)
"""Background colour (8-bit RGB), at least 0.8 from every object colour."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
"""Words accepted as counts; `format_prompt` writes "a", "two", "three"."""

MAX_OBJECTS = 3
"""Most distinct object specs in a scene (the default prompt files use 1 or 2)."""
MAX_INSTANCES = 4
"""Most drawn instances in a scene (sum of counts): four objects of radius >= 5 px still fit 32 x 32."""
DEFAULT_INSTANCES = 3
"""Most drawn instances in the scenes of the shipped prompt files (`split_prompts`, `random_scene`): a tiny
model learns uncrowded scenes in minutes; prompts with four instances parse, render and verify all the same."""

MIN_RADIUS = 5.0 / 32
MAX_RADIUS = 7.0 / 32
"""Object half-size range as a fraction of the image side (5 to 7 px at 32 x 32)."""
GAP = 2.0 / 32
"""Minimum free space between the bounding boxes of two objects, as a fraction of the side."""
RELATION_MARGIN = 3.0 / 32
"""Rendered relations hold with this margin (fraction of the side), see `relation_holds`."""
BORDER = 1.0 / 32
"""Minimum free space between an object's bounding box and the image border (fraction of the side)."""

HELDOUT_PAIRS: frozenset[frozenset[tuple[str, str]]] = frozenset(
    frozenset(pair)
    for pair in [
        (("red", "circle"), ("green", "square")),
        (("red", "square"), ("blue", "triangle")),
        (("red", "triangle"), ("yellow", "circle")),
        (("green", "circle"), ("yellow", "triangle")),
        (("green", "triangle"), ("blue", "square")),
        (("blue", "circle"), ("yellow", "square")),
    ]
)
"""Held-out object pairs: a perfect matching of the 12 colour-shape objects (each pair differs in colour and
shape), so every object still appears in train with 10 of its 11 possible partners."""

HELDOUT_COUNTS: frozenset[tuple[int, str, str]] = frozenset({(2, "yellow", "triangle"), (3, "green", "square")})
"""Held-out (count, colour, shape) triples; train still has each count with other colour-shapes."""


class PromptParseError(ConfigError):
    """A prompt does not follow the shapes-world grammar (see `parse_prompt`)."""


@dataclass(frozen=True)
class ObjectSpec:
    """`count` objects of one colour and shape."""

    color: str
    shape: str
    count: int = 1

    def __post_init__(self):
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if not 1 <= self.count <= 3:
            raise ValueError(f"count must be 1, 2 or 3, got {self.count}")


@dataclass(frozen=True)
class Scene:
    """Objects with distinct colour-shapes; `relation` relates objects[0] to objects[1] ("A left of B"),
    only in a scene of exactly two single objects."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        keys = [(o.color, o.shape) for o in self.objects]
        if len(set(keys)) != len(keys):
            raise ValueError(f"objects of a scene must differ in colour or shape (merge them into one count): {keys}")
        if sum(o.count for o in self.objects) > MAX_INSTANCES:
            raise ValueError(f"a scene draws at most {MAX_INSTANCES} objects in all, got {self.objects}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; known: {', '.join(RELATIONS)}")
            if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
                raise ValueError("a relation needs exactly two objects of count 1")

    @property
    def n_instances(self) -> int:
        return sum(o.count for o in self.objects)


# ---------------------------------------------------------------------------------------------------------
# Grammar


def _object_phrase(o: ObjectSpec) -> str:
    if o.count == 1:
        return f"a {o.color} {o.shape}"
    return f"{['two', 'three'][o.count - 2]} {o.color} {o.shape}s"


def format_prompt(scene: Scene) -> str:
    """The canonical prompt of a scene; `parse_prompt(format_prompt(s)) == s`."""
    phrases = [_object_phrase(o) for o in scene.objects]
    if scene.relation is not None:
        return f"{phrases[0]} {scene.relation} {phrases[1]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_TOKEN = re.compile(r"[a-z]+|,")


def parse_prompt(text: str) -> Scene:
    """Parse a prompt of the grammar

        prompt   := object [relation object]  |  object ("," object)* ["and" object]  (also "and" for ",")
        object   := count colour shape        (shape plural iff count > 1)
        count    := a | an | one | two | three
        relation := left of | right of | above | below

    Case, surrounding whitespace and a final period are ignored. Raises `PromptParseError` naming the prompt
    and the first word that does not fit.
    """
    words = _TOKEN.findall(text.strip().lower().rstrip("."))
    if "".join(words) != re.sub(r"\s+", "", text.strip().lower().rstrip(".")):
        raise PromptParseError(f"cannot parse prompt {text!r}: only letters, spaces and commas are allowed")
    pos = 0

    def fail(expected: str) -> PromptParseError:
        got = repr(words[pos]) if pos < len(words) else "the end of the prompt"
        return PromptParseError(f"cannot parse prompt {text!r}: expected {expected} at word {pos + 1}, "
                                f"got {got}")

    def take_object() -> ObjectSpec:
        nonlocal pos
        if pos >= len(words) or words[pos] not in COUNT_WORDS:
            raise fail(f"a count ({', '.join(COUNT_WORDS)})")
        count = COUNT_WORDS[words[pos]]
        pos += 1
        if pos >= len(words) or words[pos] not in COLORS:
            raise fail(f"a colour ({', '.join(COLORS)})")
        color = words[pos]
        pos += 1
        shape_word = words[pos] if pos < len(words) else ""
        forms = {s if count == 1 else s + "s": s for s in SHAPES}  # the plural agrees with the count
        if shape_word not in forms:
            raise fail(f"a {'singular' if count == 1 else 'plural'} shape ({', '.join(forms)})")
        pos += 1
        return ObjectSpec(color, forms[shape_word], count)

    objects = [take_object()]
    relation = None
    while pos < len(words):
        word = words[pos]
        two = " ".join(words[pos:pos + 2])
        if word in ("and", ","):
            pos += 1
            if pos < len(words) and words[pos] == "and":  # "A, and B"
                pos += 1
        elif relation is None and len(objects) == 1 and (word in RELATIONS or two in RELATIONS):
            relation = word if word in RELATIONS else two
            pos += 1 if word in RELATIONS else 2
        else:
            raise fail("'and', ',' or a relation (" + ", ".join(RELATIONS) + ")")
        objects.append(take_object())
        if relation is not None and pos < len(words):
            raise fail("the end of the prompt (a relation relates exactly two objects)")
    try:
        return Scene(tuple(objects), relation)
    except ValueError as e:
        raise PromptParseError(f"cannot parse prompt {text!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Relations and layout


def relation_holds(relation: str, a_xy: Sequence[float], b_xy: Sequence[float], margin: float = 0.0) -> bool:
    """Whether "A <relation> B" holds for centres a_xy, b_xy = (x, y) in pixels (y grows downward).

    The relation's axis must dominate: "A left of B" iff (x_B - x_A) - |y_B - y_A| > margin, and likewise
    for the other three, so at most one relation holds for a pair of centres.
    """
    margins = relation_margins(np.asarray(a_xy, dtype=float), np.asarray(b_xy, dtype=float))
    return bool(margins[RELATIONS.index(relation)] > margin)


def relation_margins(a_xy: np.ndarray, b_xy: np.ndarray) -> np.ndarray:
    """(offset along each relation's axis) - |offset across it| for centres [..., 2]: [..., 4] in RELATIONS
    order; a relation holds iff its entry is > 0."""
    dx, dy = b_xy[..., 0] - a_xy[..., 0], b_xy[..., 1] - a_xy[..., 1]
    return np.stack([dx - np.abs(dy), -dx - np.abs(dy), dy - np.abs(dx), -dy - np.abs(dx)], axis=-1)


def _layout(scenes: Sequence[Scene], rng: np.random.Generator, size: int,
            tries: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Centres [N, 2] (x, y in pixels) and half-sizes [N] of all N instances, scene after scene, each scene's
    objects in order. Vectorised over scenes.

    One or two instances: the first valid of `tries` uniform candidate layouts (boxes inside the border, at
    least GAP apart, the relation held with RELATION_MARGIN); a scene without a valid candidate shrinks its
    radii by 5% (never below MIN_RADIUS) and draws again. Three or four instances (no relation) fill too much
    of the canvas for rejection sampling: each gets its own random quadrant and a uniform position inside it.
    """
    n = np.array([s.n_instances for s in scenes])  # [B]
    first = np.cumsum(n) - n  # [B] index of each scene's first instance
    radii = rng.uniform(MIN_RADIUS, MAX_RADIUS, size=n.sum()) * size  # [N]
    centres = np.empty((n.sum(), 2))
    gap, border, margin = GAP * size, BORDER * size, RELATION_MARGIN * size

    crowded = np.flatnonzero(n >= 3)
    if crowded.size:
        quadrants = np.argsort(rng.random((crowded.size, 4)), axis=1)  # a random permutation per scene
        quadrant = quadrants[np.arange(4)[None] < n[crowded, None]]  # [instances of crowded scenes]
        idx = np.concatenate([np.arange(first[b], first[b] + n[b]) for b in crowded])
        half, pad = size / 2, max(border, gap / 2)  # boxes in adjacent quadrants are >= 2 pad >= GAP apart
        corner = half * np.stack([quadrant % 2, quadrant // 2], axis=1)  # [M, 2] (x, y)
        room = half - 2 * pad - 2 * radii[idx]  # [M] free play of a box in its quadrant, >= 0 at MAX_RADIUS
        centres[idx] = corner + pad + radii[idx, None] + rng.random((idx.size, 2)) * room[:, None]

    pending = np.flatnonzero(n <= 2)
    pair = n == 2
    relation = np.array([RELATIONS.index(s.relation) if s.relation else -1 for s in scenes])
    for _ in range(20):
        if not pending.size:
            return centres, radii
        second = np.where(pair[pending], first[pending] + 1, first[pending])  # singles: a dummy copy
        r = np.stack([radii[first[pending]], radii[second]], axis=1)  # [P, 2]
        lo = r + border
        cand = lo[:, None, :, None] + rng.random((pending.size, tries, 2, 2)) * (size - 2 * lo)[:, None, :, None]
        # cand [P, tries, 2 instances, (x, y)]; Chebyshev distance between the two boxes' centres.
        ok = ~pair[pending, None] | (np.abs(cand[:, :, 0] - cand[:, :, 1]).max(-1) >= r.sum(1)[:, None] + gap)
        rel = relation[pending]
        margins = relation_margins(cand[:, :, 0], cand[:, :, 1])  # [P, tries, 4]
        held = np.take_along_axis(margins, np.maximum(rel, 0)[:, None, None], 2)[..., 0] > margin  # [P, tries]
        ok &= (rel[:, None] < 0) | held
        found = ok.any(1)
        pick = cand[np.arange(pending.size), ok.argmax(1)]  # [P, 2, 2] first valid candidate
        centres[first[pending[found]]] = pick[found, 0]
        centres[second[found]] = pick[found, 1]
        shrink = np.unique(np.concatenate([first[pending[~found]], second[~found]]))
        radii[shrink] = np.maximum(radii[shrink] * 0.95, MIN_RADIUS * size)
        pending = pending[~found]
    raise RuntimeError(f"could not lay out {format_prompt(scenes[pending[0]])!r} at size {size}")


def _rasterise(batch_index: np.ndarray, centres: np.ndarray, radii: np.ndarray, shapes: np.ndarray,
               colors: np.ndarray, batch: int, size: int) -> torch.Tensor:
    """Draw N non-overlapping instances into [batch, 3, size, size] images.

    batch_index [N] image of each instance; centres [N, 2]; radii [N]; shapes [N] index into SHAPES;
    colors [N, 3] in [0, 1]; batch_index sorted. A pixel belongs to an instance when its centre (i + 0.5) lies
    inside the shape: circle |p - c| <= r; square |p - c|_inf <= 0.886 r (the circle's area); triangle apex up,
    base 2r, height 2r, inside the box of half-size r. No anti-aliasing: colours stay exact.
    """
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - centres[:, 0, None, None].astype(np.float32)  # [N, 1, W]
    dy = grid[None, :, None] - centres[:, 1, None, None].astype(np.float32)  # [N, H, 1]
    r = radii[:, None, None].astype(np.float32)
    s = shapes[:, None, None]
    circle = dx * dx + dy * dy <= r * r
    square = (np.abs(dx) <= 0.886 * r) & (np.abs(dy) <= 0.886 * r)
    triangle = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    mask = np.where(s == 0, circle, np.where(s == 1, square, triangle))  # [N, H, W]
    background = np.array(BACKGROUND, dtype=np.float32) / 255.0
    # Instances do not overlap, so an image is the background plus each instance's colour offset on its mask.
    # Instances go into per-image slots (slot = rank within its image) so one einsum sums them.
    slot = np.arange(len(batch_index)) - np.searchsorted(batch_index, batch_index)  # [N]
    masks = np.zeros((batch, MAX_INSTANCES, size, size), dtype=np.float32)
    offsets = np.zeros((batch, MAX_INSTANCES, 3), dtype=np.float32)
    masks[batch_index, slot] = mask
    offsets[batch_index, slot] = colors - background
    images = np.einsum("bkhw,bkc->bchw", masks, offsets) + background[None, :, None, None]
    return torch.from_numpy(images)


_COLOR_TABLE = {name: np.array(rgb, dtype=np.float32) / 255.0 for name, rgb in COLORS.items()}


@dataclass(frozen=True)
class Instance:
    """One drawn object of a layout: colour, shape, centre (x, y) and half-size r in pixels (y grows downward)."""

    color: str
    shape: str
    x: float
    y: float
    r: float


def layout_batch(scenes: Sequence[Scene], seed: int | np.random.Generator, size: int = 32) -> list[list[Instance]]:
    """Random layouts of scenes (see `render_batch`): one list of instances per scene, its objects in order, each
    object's `count` instances in a row. Deterministic in `seed`; `draw(layout_batch(s, seed))` is
    `render_batch(s, seed)`."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if not scenes:
        return []
    centres, radii = _layout(scenes, rng, size)
    out: list[list[Instance]] = []
    i = 0
    for scene in scenes:
        out.append([])
        for o in scene.objects:
            for _ in range(o.count):
                out[-1].append(Instance(o.color, o.shape, float(centres[i, 0]), float(centres[i, 1]), float(radii[i])))
                i += 1
    return out


def draw(layouts: Sequence[Sequence[Instance]], size: int = 32) -> torch.Tensor:
    """Draw layouts: [B, 3, size, size] float32 in [0, 1]. Instances of one layout must not overlap (the layouts
    of `layout_batch`, or ones edited keeping boxes GAP apart), at most MAX_INSTANCES per layout."""
    if not layouts:
        return torch.zeros(0, 3, size, size)
    if max(len(lay) for lay in layouts) > MAX_INSTANCES:
        raise ValueError(f"a layout draws at most {MAX_INSTANCES} instances")
    instances = [(b, inst) for b, lay in enumerate(layouts) for inst in lay]
    if not instances:
        return torch.from_numpy(np.broadcast_to(np.array(BACKGROUND, dtype=np.float32)[None, :, None, None] / 255.0,
                                                (len(layouts), 3, size, size)).copy())
    batch_index = np.array([b for b, _ in instances])
    centres = np.array([(inst.x, inst.y) for _, inst in instances], dtype=np.float64)
    radii = np.array([inst.r for _, inst in instances], dtype=np.float64)
    shapes = np.array([SHAPES.index(inst.shape) for _, inst in instances])
    colors = np.stack([_COLOR_TABLE[inst.color] for _, inst in instances])
    return _rasterise(batch_index, centres, radii, shapes, colors, len(layouts), size)


def render_batch(scenes: Sequence[Scene], seed: int | np.random.Generator, size: int = 32) -> torch.Tensor:
    """Render scenes with random layouts: [B, 3, size, size] float32 in [0, 1]; deterministic in `seed`."""
    if not scenes:
        return torch.zeros(0, 3, size, size)
    return draw(layout_batch(scenes, seed, size), size)


def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> torch.Tensor:
    """Render one scene with a random layout drawn from `rng`: [3, size, size] float32 in [0, 1]."""
    return render_batch([scene], rng, size)[0]


# ---------------------------------------------------------------------------------------------------------
# Splits


def is_heldout(scene: Scene) -> bool:
    """Whether the scene contains a held-out composition: two objects forming a pair of HELDOUT_PAIRS (in any
    relation or conjunction), or an object whose (count, colour, shape) is in HELDOUT_COUNTS."""
    keys = [(o.color, o.shape) for o in scene.objects]
    if any(frozenset(p) in HELDOUT_PAIRS for p in itertools.combinations(keys, 2)):
        return True
    return any((o.count, o.color, o.shape) in HELDOUT_COUNTS for o in scene.objects)


def all_scenes(max_objects: int = 2, max_instances: int = DEFAULT_INSTANCES) -> list[Scene]:
    """Every scene of 1..max_objects objects and at most max_instances drawn instances, in a fixed order
    (ordered objects: "A and B" != "B and A")."""
    if not 1 <= max_instances <= MAX_INSTANCES:
        raise ValueError(f"max_instances must be in 1..{MAX_INSTANCES}, got {max_instances}")
    objects = [(c, s) for c in COLORS for s in SHAPES]
    scenes: list[Scene] = []
    for n in range(1, max_objects + 1):
        for keys in itertools.permutations(objects, n):
            for counts in itertools.product((1, 2, 3), repeat=n):
                if sum(counts) > max_instances:
                    continue
                specs = tuple(ObjectSpec(c, s, k) for (c, s), k in zip(keys, counts))
                scenes.append(Scene(specs))
                if n == 2 and counts == (1, 1):
                    scenes += [Scene(specs, rel) for rel in RELATIONS]
    return scenes


def split_prompts(max_objects: int = 2, max_instances: int = DEFAULT_INSTANCES) -> dict[str, list[str]]:
    """The prompt files: {"train": [...], "heldout": [...]}, every scene of `all_scenes` in one of them."""
    out: dict[str, list[str]] = {"train": [], "heldout": []}
    for scene in all_scenes(max_objects, max_instances):
        out["heldout" if is_heldout(scene) else "train"].append(format_prompt(scene))
    return out


def random_scene(rng: np.random.Generator, max_objects: int = 2, relation_prob: float = 0.5,
                 allow_heldout: bool = False, max_instances: int = DEFAULT_INSTANCES) -> Scene:
    """A random scene of 1..max_objects objects (uniform); a two-object scene gets a uniform relation with
    probability `relation_prob` (counts 1), otherwise uniform counts within max_instances (at least the
    number of objects). Held-out compositions are redrawn unless `allow_heldout`."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    if not 1 <= max_instances <= MAX_INSTANCES:
        raise ValueError(f"max_instances must be in 1..{MAX_INSTANCES}, got {max_instances}")
    objects = [(c, s) for c in COLORS for s in SHAPES]
    while True:
        n = int(rng.integers(1, max_objects + 1))
        keys = [objects[i] for i in rng.choice(len(objects), size=n, replace=False)]
        if n == 2 and rng.random() < relation_prob:
            scene = Scene(tuple(ObjectSpec(c, s) for c, s in keys), RELATIONS[int(rng.integers(len(RELATIONS)))])
        else:
            counts = rng.integers(1, 4, size=n)
            if counts.sum() > max(max_instances, n):
                continue
            scene = Scene(tuple(ObjectSpec(c, s, int(k)) for (c, s), k in zip(keys, counts)))
        if allow_heldout or not is_heldout(scene):
            return scene


def _prompt_file(split: str) -> Path:
    return Path(str(resources.files("mixgrpo.world").joinpath("prompts", f"{split}.txt")))


def load_prompts(split: str) -> list[str]:
    """The prompts of a split ("train" or "heldout"), one per line of mixgrpo/world/prompts/{split}.txt."""
    if split not in ("train", "heldout"):
        raise ConfigError(f"unknown split {split!r}; use 'train' or 'heldout'")
    return [line for line in _prompt_file(split).read_text().splitlines() if line.strip()]


def write_prompt_files() -> None:
    """Regenerate the shipped prompt files from `split_prompts` (run `python -m mixgrpo.world.scene`)."""
    for split, prompts in split_prompts().items():
        _prompt_file(split).write_text("\n".join(prompts) + "\n")


if __name__ == "__main__":
    write_prompt_files()
