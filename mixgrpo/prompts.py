"""Prompt sources: text files (txt, jsonl, csv), the embedded world's splits ("world:train") and the prompt sets of
the field by name ("pickscore:train", `mixgrpo.prompt_sets`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mixgrpo.errors import ConfigError


class PromptFileError(ConfigError):
    """A prompt file is missing, empty or malformed; the message names the fix."""


def is_builtin_source(source: str) -> bool:
    """Whether a prompt source names a set (world:SPLIT, NAME:SPLIT of `mixgrpo.prompt_sets`), not a user's file."""
    from mixgrpo.prompt_sets import is_named

    return source.startswith("world:") or is_named(source)


def prompt_file(source: str) -> Path | None:
    """The file a prompt source reads, or None for a generated set (world:SPLIT). A named set that is neither
    shipped nor fetched raises `mixgrpo.prompt_sets.PromptSetError` with the command that fetches it."""
    from mixgrpo.prompt_sets import is_named, locate

    if source.startswith("world:"):
        return None
    return locate(source) if is_named(source) else Path(source).expanduser()


def read_prompts(source: str) -> list[str]:
    """Prompts from `world:SPLIT`, NAME:SPLIT (a shipped or fetched set: `mixgrpo prompts`), a .txt file (one per
    line), .jsonl ({"prompt": ...}) or .csv ("prompt" column)."""
    if source.startswith("world:"):
        from mixgrpo.world.scene import load_prompts

        return load_prompts(source.split(":", 1)[1])
    path = prompt_file(source)
    if not path.is_file():
        raise PromptFileError(f"prompt file {source!r} does not exist: give a .txt/.jsonl/.csv path, world:train, or "
                              f"a prompt set (`mixgrpo prompts` lists them)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {source!r} is not UTF-8 (byte {e.start}): re-save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{source}:{n}: not valid JSON ({e.msg}): one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise PromptFileError(f'{source}:{n}: each line needs a string field "prompt"')
            prompts.append(record["prompt"].strip())
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{source}: the CSV header has no 'prompt' column (found {reader.fieldnames})")
        prompts = [(row.get("prompt") or "").strip() for row in reader]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PromptFileError(f"prompt file {source!r} holds no prompts: add at least one non-empty prompt")
    return prompts
