"""Training: the `Trainer` recipe and the components it is built from (see docs/design.md).

    trainer.py     Trainer: the iteration (plan, rollout, rewards, advantages, update, log) and the run loop
                   (the objectives it trains, GRPO, DiffusionNFT, AWM and V-GRPO, are `mixgrpo.objectives`)
    update.py      the update loop shared by the objectives (optimizer steps over shares of the samples)
    weights.py     trainable parameters, EMA and sampling copies, the frozen reference, weight swapping
    state.py       the checkpoint state: what is saved and restored, the config fingerprint a resume checks
    control.py     what stops a run: errors and guards, signals, the time limit; the model clock
    report.py      the progress line and summary.md
"""

from mixgrpo.train.control import TrainingError, TrainingStopped
from mixgrpo.train.trainer import Trainer, train

__all__ = ["Trainer", "TrainingError", "TrainingStopped", "train"]
