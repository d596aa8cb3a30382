"""What `input_consistency` gives real edits, failed edits and redraws, on the editing world; and its cost.

    python benchmarks/input_consistency.py --n 300

--n (input, target) pairs of random training edits (the kinds in turn) are drawn by the world's renderer at --size
pixels. Scored against their inputs with grid --grid and tolerance --tolerance: the true targets (clean, and blurred
plus gaussian noise of std 0.05, as a small generative model draws them), each failure of the edit verifier's
`FAILURES` built from the same pairs, and a redraw (the target of another pair: another scene). Prints a markdown
table of the mean score per case and edit kind, then the time per image at 512 and 1024 pixels (batches of 16,
process CPU time).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mixgrpo.rewards import build_reward
from mixgrpo.world.edit_verifier import FAILURES, failed_layout
from mixgrpo.world.edits import EDIT_KINDS, edit_layouts, random_edits
from mixgrpo.world.scene import draw

from edit_verifier import blur  # benchmarks/edit_verifier.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="edits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.1)
    args = parser.parse_args()
    reward = build_reward("input_consistency", {"grid": args.grid, "tolerance": args.tolerance})
    rng = np.random.default_rng(args.seed)
    pairs = random_edits(rng, args.n, "train", kinds=[EDIT_KINDS[i % len(EDIT_KINDS)] for i in range(args.n)])
    drawn = []
    for scene, edit in pairs:
        while (layouts := edit_layouts(scene, edit, rng, args.size)) is None:
            pass
        drawn.append((*layouts, edit))
    inputs, targets = draw([a for a, _, _ in drawn], args.size), draw([b for _, b, _ in drawn], args.size)
    kinds = np.array([e.kind for _, _, e in drawn])
    noise = 0.05 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(args.seed))
    cases = [("true target", targets, np.arange(args.n)),
             ("true target, blur + noise 0.05", (blur(targets) + noise).clamp(0, 1), np.arange(args.n)),
             ("redrawn (another pair's target)", targets.roll(1, 0), np.arange(args.n))]
    for failure in FAILURES:
        wrong = [(i, failed_layout(a, b, e, failure, rng, args.size)) for i, (a, b, e) in enumerate(drawn)]
        idx = np.array([i for i, w in wrong if w is not None])
        cases.append((failure, draw([w for _, w in wrong if w is not None], args.size), idx))
    print(f"| case | n | {' | '.join(EDIT_KINDS)} | all |\n|---|---|{'---|' * (len(EDIT_KINDS) + 1)}")
    for name, results, idx in cases:
        scores = reward(results, [""] * len(idx), inputs=inputs[idx]).numpy()
        by_kind = [f"{scores[kinds[idx] == k].mean():.3f}" if (kinds[idx] == k).any() else "-" for k in EDIT_KINDS]
        print(f"| {name} | {len(idx)} | {' | '.join(by_kind)} | {scores.mean():.3f} |")
    print()
    big = build_reward("input_consistency")  # the default grid 16
    for size in (512, 1024):
        x, y = torch.rand(16, 3, size, size), torch.rand(16, 3, size, size)
        big(x, [""] * 16, inputs=y)
        start = time.process_time()
        for _ in range(5):
            big(x, [""] * 16, inputs=y)
        print(f"input_consistency at {size} x {size}: {(time.process_time() - start) / 80 * 1e3:.1f} ms per image")


if __name__ == "__main__":
    main()
