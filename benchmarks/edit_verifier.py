"""Accuracy of the edit verifier (`mixgrpo.world.edit_verifier`) on rendered edits, true and failed.

    python benchmarks/edit_verifier.py --n 500

For each split, --n (input, target) pairs of random edits (the kinds in turn) are drawn by the world's renderer.
The verifier scores the true targets (clean; 3 x 3 binomial blur; blur plus gaussian noise of std 0.05, as a small
generative model draws them) and every failure of `FAILURES` built from the same pairs (`failed_layout`; a pair
without such a failure is skipped, so the counts differ). Prints a markdown table: cases, the mean made / kept /
success / dense, and the throughput of the verifier on the clean targets.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from mixgrpo.world.edit_verifier import FAILURES, failed_layout, verify_edit
from mixgrpo.world.edits import EDIT_KINDS, edit_layouts, random_edits
from mixgrpo.world.scene import draw


def blur(images: torch.Tensor) -> torch.Tensor:
    """3 x 3 binomial blur per channel. images: [B, 3, H, W]."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="edits per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    print("| split | case | n | made | kept | success | dense |\n|---|---|---|---|---|---|---|")
    for s, split in enumerate(("train", "heldout")):
        rng = np.random.default_rng([args.seed, s])
        pairs = random_edits(rng, args.n, split, kinds=[EDIT_KINDS[i % len(EDIT_KINDS)] for i in range(args.n)])
        drawn = []
        for scene, edit in pairs:
            while (layouts := edit_layouts(scene, edit, rng, args.size)) is None:
                pass
            drawn.append((*layouts, edit))
        inputs, targets = draw([a for a, _, _ in drawn], args.size), draw([b for _, b, _ in drawn], args.size)
        edits = [e for _, _, e in drawn]
        noisy = (blur(targets) + 0.05 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        cases = [("true target", targets, inputs, edits), ("true target, blurred", blur(targets), inputs, edits),
                 ("true target, blur + noise 0.05", noisy, inputs, edits)]
        for failure in FAILURES:
            wrong = [(i, failed_layout(a, b, e, failure, rng, args.size)) for i, (a, b, e) in enumerate(drawn)]
            idx = [i for i, w in wrong if w is not None]
            cases.append((failure, draw([w for _, w in wrong if w is not None], args.size), inputs[idx],
                          [edits[i] for i in idx]))
        for name, results, ins, eds in cases:
            start = time.process_time()
            r = verify_edit(results, ins, eds)
            cpu = time.process_time() - start
            print(f"| {split} | {name} | {len(eds)} | {r.made.mean():.3f} | {r.kept.mean():.3f} | "
                  f"{r.success.mean():.3f} | {r.dense.mean():.3f} |")
            if name == "true target":
                throughput = len(eds) / cpu
    print(f"\nverifier throughput: {throughput:.0f} edits/s per core ({args.size} x {args.size}, process CPU time)")


if __name__ == "__main__":
    main()
