"""The files a run reads: where they are, and what they are.

A run reads its base model, embedding cache, prompt files and reward checkpoints by path. When a run starts,
relative paths are made absolute (`resolve_paths`), so its config.yaml names them from any working directory.
Every checkpoint records each file's identity (`identities`): what a resume and a re-pointed `sample` or `eval`
compare, not the path, so that a run directory copied to another machine, mount or directory continues once told
where its files now are (`mixgrpo train --out RUN --resume model.args.path=NEW`, `mixgrpo sample --path RUN
--set model.args.path=NEW`; docs/reliability.md). The identity of

- a prompt source: the sha256 of its prompts, one per line (the same prompts in another file or format are the
  same prompts); for examples with input images, each line also holds the sha256 of each image file's bytes (the
  same images elsewhere are the same examples; an image edited in place is not);
- a file: its size and the sha256 of its bytes (of its first and last MiB when it is larger than 64 MiB: a
  reward checkpoint of GB is read in milliseconds);
- a directory (a diffusers pipeline, an embedding cache): its files' relative names and sizes and the sha256 of
  every .json file (model configs, tokenizers, the cache's index) and of every other file up to 1 MiB; hidden
  files and documentation (README.md, LICENSE, images) do not count, since copies made with a download filter
  may lack them.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

PATH_ARGS = ("path", "embedding_cache", "tokenizer", "clip")
"""The factory arguments (model.args, rewards[i].args) that name a file or directory: those of the shipped models
and rewards. A user factory's path arguments of other names are compared as plain values."""

PROMPT_FIELDS = ("rollout.prompts", "eval.prompts")
"""The config's prompt sources (a file or a named set), as dotted keys."""
_WHOLE_FILE = 64 << 20  # bytes: larger files are identified by their size, first and last MiB
_SMALL = 1 << 20  # bytes: directory members up to this size are hashed whole
_DOCS = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".pdf")


def path_fields(data: dict[str, Any]) -> dict[str, str]:
    """{field: path} of every path a run's config names (`mixgrpo.config.to_dict` of it, or a stored fingerprint),
    with fields written as overrides take them: model.args.path, rewards[0].args.tokenizer, rollout.prompts."""
    from mixgrpo.prompts import is_builtin_source

    fields = {key: value for key, value in prompt_sources(data).items() if not is_builtin_source(value)}
    for i, teacher in enumerate((data.get("distill") or {}).get("teachers") or []):
        for key in ("path", "prompts"):  # on-policy distillation's teachers: a model, a prompt source
            value = teacher.get(key) if isinstance(teacher, dict) else None
            if isinstance(value, str) and value and not (key == "prompts" and is_builtin_source(value)):
                fields[f"distill.teachers[{i}].{key}"] = value
    args_of = [("model.args", (data.get("model") or {}).get("args"))]
    args_of += [(f"rewards[{i}].args", r.get("args")) for i, r in enumerate(data.get("rewards") or [])
                if isinstance(r, dict)]
    for where, args in args_of:
        for key in PATH_ARGS:
            if isinstance(args, dict) and isinstance(args.get(key), str) and args[key]:
                fields[f"{where}.{key}"] = args[key]
    return fields


def prompt_sources(data: dict[str, Any]) -> dict[str, str]:
    """{field: source} of the prompt sources a config mapping names (PROMPT_FIELDS)."""
    sections = [(key, key.split(".")) for key in PROMPT_FIELDS]
    values = {key: (data.get(section) or {}).get(leaf) for key, (section, leaf) in sections}
    return {key: value for key, value in values.items() if isinstance(value, str)}


def without_paths(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping without its path fields: what a resume compares as values."""
    data = copy.deepcopy(data)
    for field in path_fields(data):
        *parents, leaf = _parts(field)
        node = data
        for part in parents:
            node = node[part]
        del node[leaf]
    return data


def resolve_paths(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping whose relative paths are absolute (against the working directory; ~ expanded)."""
    data = copy.deepcopy(data)
    for field, value in path_fields(data).items():
        *parents, leaf = _parts(field)
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = os.path.abspath(os.path.expanduser(value))
    return data


def _parts(field: str) -> list[str | int]:
    """'rewards[1].args.path' -> ['rewards', 1, 'args', 'path']."""
    parts: list[str | int] = []
    for part in field.split("."):
        name, _, index = part.partition("[")
        parts.append(name)
        if index:
            parts.append(int(index.rstrip("]")))
    return parts


def identities(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{field: identity} of every path field of a config mapping and of its prompt sources, named sets included
    (see the module docstring)."""
    fields = prompt_sources(data) | path_fields(data)
    return {field: identity(field, value) for field, value in fields.items()}


def identity(field: str, value: str) -> dict[str, Any]:
    """What the file or directory `value` of `field` is: {"path", "sha256", and "files", "bytes" for files on
    disk}; a missing path has no sha256."""
    if field in PROMPT_FIELDS:
        from mixgrpo.prompts import read_examples

        try:
            examples = read_examples(value)
        except ValueError:
            return {"path": value}
        digests = {p: _file_digest(Path(p), Path(p).stat().st_size, _WHOLE_FILE)
                   for p in dict.fromkeys(i for e in examples for i in e.images)}
        lines = ["\0".join([e.prompt, *(digests[i] for i in e.images)]) for e in examples]
        return {"path": value, "prompts": len(examples), **({"images": len(digests)} if digests else {}),
                "sha256": hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()}
    path = Path(value).expanduser()
    if path.is_file():
        size = path.stat().st_size
        return {"path": value, "files": 1, "bytes": size, "sha256": _file_digest(path, size, _WHOLE_FILE)}
    if not path.is_dir():
        return {"path": value}
    listing, total = hashlib.sha256(), 0
    members = sorted(p for p in path.rglob("*") if p.is_file() and _counts(p.relative_to(path)))
    for p in members:
        size = p.stat().st_size
        total += size
        digest = _file_digest(p, size, _SMALL) if p.suffix == ".json" or size <= _SMALL else ""
        listing.update(f"{p.relative_to(path).as_posix()}\0{size}\0{digest}\n".encode())
    return {"path": value, "files": len(members), "bytes": total, "sha256": listing.hexdigest()}


def _counts(relative: Path) -> bool:
    """Whether a directory member is part of its identity: not hidden, not documentation."""
    return (not any(part.startswith(".") for part in relative.parts) and relative.suffix.lower() not in _DOCS
            and not relative.name.upper().startswith(("LICENSE", "README")))


def _file_digest(path: Path, size: int, whole: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= whole or path.suffix == ".json":
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def describe(ident: dict[str, Any]) -> str:
    """'/ckpt/FLUX.1-dev (24 files, 33.7 GB)', '/data/p.txt (400 prompts)', '/x (missing)'."""
    if "sha256" not in ident:
        return f"{ident['path']} (missing)"
    if "prompts" in ident:
        return f"{ident['path']} ({ident['prompts']} prompts)"
    n, size = ident["files"], ident["bytes"]
    unit = next((u for u, b in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if size >= b), "B")
    amount = f"{size / dict(GB=1e9, MB=1e6, kB=1e3, B=1)[unit]:.1f} {unit}" if unit != "B" else f"{size} B"
    return f"{ident['path']} ({n} file{'s' * (n != 1)}, {amount})"


def mismatches(recorded: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """'FIELD: NOW is not RECORDED' for every field both record whose files differ (a missing path included);
    fields only one side has are not compared (a field added or removed between versions)."""
    return [f"{field}: {describe(current[field])} is not {describe(recorded[field])}"
            for field in sorted(set(recorded) & set(current))
            if current[field].get("sha256") is None or current[field].get("sha256") != recorded[field].get("sha256")]


def missing(data: dict[str, Any], fields: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """[(field, path)] of the path fields (all, or those starting with one of `fields`) that do not exist here."""
    from mixgrpo.prompts import prompt_file

    found = []
    for field, value in path_fields(data).items():
        if fields is not None and not field.startswith(fields):
            continue
        path = prompt_file(value) if field in PROMPT_FIELDS else Path(value).expanduser()
        if path is not None and not path.exists():
            found.append((field, value))
    return found
