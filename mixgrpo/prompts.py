"""Prompt sources: text files (txt, jsonl, csv), the embedded world's splits ("world:train") and the prompt sets of
the field by name ("pickscore:train", `mixgrpo.prompt_sets`).

An example of an image-conditioned model (editing, image-to-video) is an instruction and its input images
(`Example`); a prompt file names the images beside each prompt (docs/prompts.md):

    {"prompt": "make the red circle blue", "images": ["inputs/0001.png"]}        (.jsonl)
    prompt,images                                                                  (.csv: ';' between paths)
    make the red circle blue,inputs/0001.png

Image paths are relative to the prompt file's directory (or absolute). A file gives either text-to-image prompts
or examples with images, never a mix. `read_examples` reads both kinds; `read_prompts` gives the prompts alone.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: a prompt (an edit instruction) and the absolute paths of its input images
    (empty for a text-to-image model)."""

    prompt: str
    images: tuple[str, ...] = ()


def read_prompts(source: str) -> list[str]:
    """Prompts from `world:SPLIT`, NAME:SPLIT (a shipped or fetched set: `mixgrpo prompts`), a .txt file (one per
    line), .jsonl ({"prompt": ...}) or .csv ("prompt" column); the prompts of an example file with images too."""
    return [e.prompt for e in read_examples(source)]


def read_examples(source: str) -> list[Example]:
    """The examples of a prompt source (`read_prompts`'s sources): each prompt with its input images, whose paths are
    checked to exist (not read: `mixgrpo.images.load_inputs` does). Raises PromptFileError for a file that mixes
    prompts with and without images, or names a missing image."""
    if source.startswith("world:"):
        split = source.split(":", 1)[1]
        if split.startswith("edit_"):  # the editing world's examples: instructions with their input images
            from mixgrpo.world.edits import example_file

            path = example_file(split.removeprefix("edit_"))
            return _read_file(str(path), path)
        from mixgrpo.world.scene import load_prompts

        return [Example(p) for p in load_prompts(split)]
    return _read_file(source, prompt_file(source))


def _images_field(value, source: str, where: str) -> tuple[str, ...]:
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PromptFileError(f'{where}: "images" must be a list of image paths (relative to the prompt file)')
    return tuple(v.strip() for v in value)


def _read_file(source: str, path: Path) -> list[Example]:
    if not path.is_file():
        raise PromptFileError(f"prompt file {source!r} does not exist: give a .txt/.jsonl/.csv path, world:train, or "
                              f"a prompt set (`mixgrpo prompts` lists them)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {source!r} is not UTF-8 (byte {e.start}): re-save it as UTF-8") from None
    suffix = path.suffix.lower()
    rows: list[tuple[str, tuple[str, ...], str]] = []  # (prompt, image paths as written, where)
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{source}:{n}: not valid JSON ({e.msg}): one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise PromptFileError(f'{source}:{n}: each line needs a string field "prompt"')
            rows.append((record["prompt"].strip(), _images_field(record.get("images"), source, f"{source}:{n}"),
                         f"{source}:{n}"))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{source}: the CSV header has no 'prompt' column (found {reader.fieldnames})")
        for n, row in enumerate(reader, 2):
            images = tuple(p.strip() for p in (row.get("images") or "").split(";") if p.strip())
            rows.append(((row.get("prompt") or "").strip(), images, f"{source}:{n}"))
    else:
        rows = [(line.strip(), (), "") for line in text.splitlines()]
    rows = [r for r in rows if r[0]]
    if not rows:
        raise PromptFileError(f"prompt file {source!r} holds no prompts: add at least one non-empty prompt")
    with_images = [r for r in rows if r[1]]
    if with_images and len(with_images) != len(rows):
        bare = next(r for r in rows if not r[1])
        raise PromptFileError(f"prompt file {source!r} mixes {len(with_images)} prompts with input images and "
                              f"{len(rows) - len(with_images)} without (e.g. {bare[2]}): give every prompt its images "
                              f"(an editing model), or none (a text-to-image model), in separate files")
    examples = []
    for prompt, images, where in rows:
        resolved = tuple(str((path.parent / Path(i).expanduser()).resolve()) for i in images)
        for written, full in zip(images, resolved):
            if not Path(full).is_file():
                raise PromptFileError(f"{where}: input image {written!r} not found ({full}): image paths are relative "
                                      f"to the prompt file's directory")
        examples.append(Example(prompt, resolved))
    return examples
