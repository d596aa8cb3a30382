"""The embedded shapes world: prompt grammar and renderer (`scene`), programmatic verifier (`verifier`), and the
editing world on top of them: instruction grammar and (input, target) pairs (`edits`), edit verifier
(`edit_verifier`)."""

from mixgrpo.world.scene import (
    BACKGROUND,
    COLORS,
    RELATIONS,
    SHAPES,
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

__all__ = [
    "BACKGROUND", "COLORS", "RELATIONS", "SHAPES", "ObjectSpec", "PromptParseError", "Scene", "format_prompt",
    "is_heldout", "load_prompts", "parse_prompt", "random_scene", "render", "render_batch",
]
