"""Why does a tiny model fail the verifier? Requirement failure rates and the kind of every extra object.

    python benchmarks/failure_modes.py [--path MODEL_DIR] [--split heldout] [--every 1] [--images 4]

Samples `--images` images per prompt of a shapes-world split (every `--every`-th prompt) with the default
25-step Euler ODE grid and guidance 3, runs the verifier, and reports for each requirement kind (present,
count, relation, no extras) the share of images that fail it, and for every detection the prompt does not
name what it is:

- swap: its colour and its shape are both named, but by different objects ("a red circle and a green
  square" drawn as a red square): the model binds the prompt's words to the wrong objects;
- other shape: a named colour with a shape no object of that colour has (and not a swap);
- other colour: a colour the prompt does not name;
- unknown: a blob the verifier cannot call a circle, square or triangle.

The default model is the shipped base (`mixgrpo/assets/tiny_base`).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from mixgrpo.evaluate import generate
from mixgrpo.models.tiny import load_tiny
from mixgrpo.plan import ode_plan
from mixgrpo.world.scene import load_prompts, parse_prompt
from mixgrpo.world.verifier import detect, requirements


def extra_kind(scene, detection) -> str | None:
    """None when the prompt names the detection's colour-shape, else one of the kinds of the module doc."""
    named = {(o.color, o.shape) for o in scene.objects}
    if (detection.color, detection.shape) in named:
        return None
    if detection.shape == "unknown":
        return "unknown"
    if detection.color not in {c for c, _ in named}:
        return "other colour"
    return "swap" if detection.shape in {s for _, s in named} else "other shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--path", default=None, help="tiny model directory (default: the shipped base)")
    parser.add_argument("--split", default="heldout", help="world prompt split: train or heldout")
    parser.add_argument("--every", type=int, default=1, help="use every k-th prompt of the split")
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    prompts = load_prompts(args.split)[::args.every]
    model = load_tiny(args.path)  # None: the shipped base
    images = generate(model, prompts, ode_plan(25, 3.0), args.images, args.seed, args.guidance).flatten(0, 1)
    scenes = [parse_prompt(p) for p in prompts for _ in range(args.images)]
    failed, total, kinds = collections.Counter(), collections.Counter(), collections.Counter()
    strict = 0
    for scene, detections in zip(scenes, detect(images)):
        met = requirements(scene, detections)
        strict += all(met.values())
        for name, ok in met.items():
            kind = name.split(":")[0]
            total[kind] += 1
            failed[kind] += not ok
        kinds.update(k for k in (extra_kind(scene, d) for d in detections) if k is not None)
    extras = sum(kinds.values())
    result = {
        "split": args.split, "prompts": len(prompts), "images": len(scenes), "guidance": args.guidance,
        "strict": strict / len(scenes),
        "fail_rate": {k: failed[k] / total[k] for k in total},
        "extras_per_image": extras / len(scenes),
        "extra_kinds": {k: v / max(extras, 1) for k, v in kinds.most_common()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
