"""The prompt sets of the field by name: `NAME:SPLIT` (pickscore:train, hpdv2:test, ...) wherever a prompt file goes.

    mixgrpo prompts                      # every set: split, prompts, shipped or to fetch, source, licence
    mixgrpo prompts fetch hpdv2:train    # download a set that is not shipped, check it, keep it in the prompt store

The sets are described in assets/prompts/manifest.json: source, licence, and per split the file, its size, its
sha256 and the git object id of the file at the pinned commit of its owner's repository. Sets whose licence
allows it and that could be read when the package was built ship in assets/prompts/ (Flow-GRPO's PickScore, OCR
test and GenEval test sets: MIT); the rest are fetched from where their owners publish them into the prompt store,
$MIXGRPO_PROMPTS or ~/.cache/mixgrpo/prompts (HPDv2; Flow-GRPO's OCR and GenEval training sets; DanceGRPO's video
prompts, CC BY-NC 4.0, which mixgrpo does not ship). docs/prompts.md has the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

from mixgrpo.errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets" / "prompts"
STORE_ENV = "MIXGRPO_PROMPTS"


class PromptSetError(ConfigError):
    """A named prompt set is unknown, not fetched yet, or its download does not match its checksum."""


@cache
def manifest() -> dict[str, Any]:
    """{set name: {description, source, licence, splits: {split: entry}}} (assets/prompts/manifest.json)."""
    return json.loads((ASSETS / "manifest.json").read_text(encoding="utf-8"))["sets"]


def store() -> Path:
    """Where fetched sets are kept: $MIXGRPO_PROMPTS, else ~/.cache/mixgrpo/prompts."""
    return Path(os.environ.get(STORE_ENV) or Path.home() / ".cache" / "mixgrpo" / "prompts").expanduser()


def is_named(source: str) -> bool:
    """Whether `source` is NAME:SPLIT of a known set (a prompt file's path is never one)."""
    name, sep, _ = source.partition(":")
    return bool(sep) and name in manifest()


def entry(source: str) -> tuple[str, str, dict[str, Any]]:
    """(name, split, manifest entry) of NAME:SPLIT; PromptSetError naming the known splits otherwise."""
    name, _, split = source.partition(":")
    splits = manifest()[name]["splits"]
    if split not in splits:
        raise PromptSetError(f"prompt set {name!r} has no split {split!r}: use "
                             f"{' or '.join(f'{name}:{s}' for s in splits)}")
    return name, split, splits[split]


def locate(source: str) -> Path:
    """The file of NAME:SPLIT: shipped, or fetched into the store. PromptSetError with the fetch command (and
    the licence) when it is neither."""
    name, split, e = entry(source)
    if e["shipped"]:
        return ASSETS / e["file"]
    path = store() / e["file"]
    if not path.is_file():
        raise PromptSetError(f"prompt set {source} is not shipped with mixgrpo ({e['why_not_shipped']}) and not "
                             f"fetched yet: run `mixgrpo prompts fetch {source}` (downloads {e['url']}; licence: "
                             f"{manifest()[name]['licence']}), or give a prompt file")
    return path


def git_blob(data: bytes) -> str:
    """The git object id of a file with contents `data` (`git hash-object`): sha1 of 'blob SIZE\\0' + data."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fetch(source: str) -> Path:
    """Download NAME:SPLIT from its owner's URL, check it, keep the split (a line range, or the distinct prompts of
    a JSON list) in the store, atomically; returns the file. PromptSetError on a checksum mismatch."""
    from mixgrpo.fileio import atomic_file

    name, split, e = entry(source)
    if e["shipped"]:
        return ASSETS / e["file"]
    try:
        with urllib.request.urlopen(e["url"], timeout=60) as response:
            data = response.read()
    except OSError as err:
        raise PromptSetError(f"cannot download {e['url']} ({err}): check the network, or download it by hand and "
                             f"give the file as the prompts") from None
    if e.get("git_blob") and git_blob(data) != e["git_blob"]:
        raise PromptSetError(f"{e['url']} is not the file of {source} (git object {git_blob(data)}, expected "
                             f"{e['git_blob']}): nothing was kept")
    kept = _split(data, e, source)
    digest = hashlib.sha256(kept).hexdigest()
    if e.get("sha256") and digest != e["sha256"]:
        raise PromptSetError(f"{source} from {e['url']} has sha256 {digest}, expected {e['sha256']}: nothing was kept")
    path = store() / e["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_bytes(kept)
    return path


def _split(data: bytes, e: dict[str, Any], source: str) -> bytes:
    """The bytes kept of a download: all of it, lines [start, stop), or the distinct prompts of a JSON list."""
    if "lines" in e:
        start, stop = e["lines"]
        return b"".join(data.splitlines(keepends=True)[start:stop])
    if e.get("from") == "json":
        try:
            records = json.loads(data)
            prompts = list(dict.fromkeys(r["prompt"].strip() for r in records))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise PromptSetError(f"{e['url']} is not a JSON list of records with a 'prompt' (the format of "
                                 f"{source}'s source changed?): nothing was kept") from None
        return ("\n".join(prompts) + "\n").encode("utf-8")
    return data


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mixgrpo prompts", description="The prompt sets the recipes name "
                                     "(NAME:SPLIT): list them, or fetch one that is not shipped.")
    sub = parser.add_subparsers(dest="action")
    sub.add_parser("list", help="every set and split: prompts, shipped or to fetch, licence (the default)")
    p = sub.add_parser("fetch", help="download sets that are not shipped into the prompt store")
    p.add_argument("sets", nargs="+", metavar="NAME:SPLIT")
    args = parser.parse_args(argv)
    if args.action == "fetch":
        for source in args.sets:
            if not is_named(source):
                raise PromptSetError(f"{source!r} is not a prompt set: use one of {', '.join(names())}")
            path = fetch(source)
            data = path.read_bytes()
            count = sum(1 for line in data.splitlines() if line.strip())  # one prompt (or JSON record) per line
            print(f"{source}: {count} prompts in {path} (sha256 {hashlib.sha256(data).hexdigest()})")
        return 0
    for name, s in manifest().items():
        print(f"{name}: {s['description']}\n  source: {s['source']}\n  licence: {s['licence']}")
        for split, e in s["splits"].items():
            here = ASSETS / e["file"] if e["shipped"] else store() / e["file"]
            state = ("shipped" if e["shipped"] else "fetched" if here.is_file()
                     else f"to fetch: mixgrpo prompts fetch {name}:{split}")
            count = f"{e['prompts']} prompts" if e["prompts"] else "prompts: known once fetched"
            print(f"  {name}:{split}  {count}, {state}")
    print(f"prompt store (fetched sets): {store()} (set {STORE_ENV} to move it)")
    return 0


def names() -> list[str]:
    """Every NAME:SPLIT."""
    return [f"{name}:{split}" for name, s in manifest().items() for split in s["splits"]]
