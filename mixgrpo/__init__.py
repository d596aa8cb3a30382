"""mixgrpo: GRPO fine-tuning of flow-matching text-to-image models with mixed ODE-SDE rollouts.

Data flows one way through the package:

    sampling (step math) -> plan (which step is ODE / SDE / DPM, which is trained)
    -> rollout -> rewards -> grpo (advantages, loss) -> train (the Trainer) -> cli

and imports point the other way (docs/design.md has the module map; tests/test_imports.py checks it): the math
modules (`sampling`, `plan`, `grpo`, `flow_matching`, `seeding`) import nothing from the rest of the package.
"""

__version__ = "0.1.0"
