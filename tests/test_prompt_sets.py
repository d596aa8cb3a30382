"""The prompt sets the recipes name (mixgrpo.prompt_sets): every one resolves, the shipped files are the ones their
owners publish (git object id at the pinned commit, sha256, sizes and counts as documented), the others name the
command that fetches them, and the fetch checks what it downloads before keeping it."""

import hashlib
from pathlib import Path

import pytest

from mixgrpo import prompt_sets
from mixgrpo.cli import main
from mixgrpo.config import load_config, recipes, to_dict
from mixgrpo.prompt_sets import PromptSetError, git_blob, manifest
from mixgrpo.prompts import read_prompts
from mixgrpo.runfiles import path_fields, resolve_paths

ROOT = Path(__file__).resolve().parent.parent

SHIPPED = [(name, split, e) for name, s in manifest().items() for split, e in s["splits"].items() if e["shipped"]]


@pytest.mark.parametrize("name,split,entry", SHIPPED, ids=[f"{n}:{s}" for n, s, _ in SHIPPED])
def test_shipped_sets_are_the_published_files(name, split, entry):
    path = prompt_sets.ASSETS / entry["file"]
    data = path.read_bytes()
    assert git_blob(data) == entry["git_blob"]  # the owner's file at the pinned commit, byte for byte
    assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert len(read_prompts(f"{name}:{split}")) == entry["prompts"]
    assert entry["url"].startswith("https://") and manifest()[name]["licence"]


def test_train_and_test_splits_do_not_share_prompts():
    for name, s in manifest().items():
        if all(e["shipped"] for e in s["splits"].values()):
            train, test = (set(read_prompts(f"{name}:{split}")) for split in ("train", "test"))
            assert not train & test, name


EDIT_FILES = ("data/edits/train.jsonl", "data/edits/test.jsonl")
"""What the editing recipes read: the user's examples, since no editing set can be a named one (docs/prompts.md,
"Editing examples", which names each such recipe)."""


def test_every_prompt_source_of_a_shipped_recipe_is_a_known_set(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXGRPO_PROMPTS", str(tmp_path))  # an empty store: nothing fetched
    named = set()
    editing = (ROOT / "docs" / "prompts.md").read_text(encoding="utf-8").split("## Editing examples")[1]
    for recipe, path in recipes().items():
        cfg = load_config(path)
        if (cfg.rollout.prompts, cfg.eval.prompts) == EDIT_FILES:
            assert f"`{recipe}`" in editing, f"{recipe} reads the user's editing examples: name it in docs/prompts.md"
            continue
        for source in (cfg.rollout.prompts, cfg.eval.prompts):
            if source.startswith("world:"):
                continue
            assert prompt_sets.is_named(source), f"{recipe}: {source} is not a shipped or fetchable prompt set"
            named.add(source)
            _, _, entry = prompt_sets.entry(source)
            if entry["shipped"]:
                assert read_prompts(source)
            else:  # not shipped: the error names the fetch command and the licence
                with pytest.raises(PromptSetError, match=f"mixgrpo prompts fetch {source}.*licence"):
                    read_prompts(source)
        assert not {"rollout.prompts", "eval.prompts"} & set(path_fields(to_dict(cfg)))
    assert {"hpdv2:train", "pickscore:train", "ocr:train", "video:train"} <= named


def test_named_sets_are_not_paths():
    data = {"rollout": {"prompts": "pickscore:train"}, "eval": {"prompts": "ocr:test"}, "model": {"args": {}}}
    assert resolve_paths(data) == data


def _source(tmp_path, lines):
    src = tmp_path / "published.txt"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    return src, src.read_bytes()


def _patch_entry(monkeypatch, source, **fields):
    sets = {name: {**s, "splits": dict(s["splits"])} for name, s in prompt_sets.manifest().items()}
    name, split = source.split(":")
    sets[name]["splits"][split] = {**sets[name]["splits"][split], **fields}
    monkeypatch.setattr(prompt_sets, "manifest", lambda: sets)


def test_fetch_checks_then_keeps_the_split(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MIXGRPO_PROMPTS", str(tmp_path / "store"))
    src, data = _source(tmp_path, [b"prompt %d" % i for i in range(10)])
    kept = b"".join(b"prompt %d\n" % i for i in range(8, 10))
    _patch_entry(monkeypatch, "video:test", url=src.as_uri(), git_blob=git_blob(data), lines=[8, 10],
                 sha256=hashlib.sha256(kept).hexdigest())
    with pytest.raises(PromptSetError, match="not fetched yet"):
        read_prompts("video:test")
    assert main(["prompts", "fetch", "video:test"]) == 0
    assert "video:test: 2 prompts" in capsys.readouterr().out
    assert read_prompts("video:test") == ["prompt 8", "prompt 9"]
    assert main(["prompts"]) == 0
    assert "video:test  256 prompts, fetched" in capsys.readouterr().out


@pytest.mark.parametrize("field", ["git_blob", "sha256"])
def test_a_download_that_does_not_match_is_not_kept(field, monkeypatch, tmp_path):
    monkeypatch.setenv("MIXGRPO_PROMPTS", str(tmp_path / "store"))
    src, data = _source(tmp_path, [b"a", b"b"])
    _patch_entry(monkeypatch, "ocr:train", url=src.as_uri(), git_blob=git_blob(data), sha256=None)
    _patch_entry(monkeypatch, "ocr:train", **{field: "0" * (40 if field == "git_blob" else 64)})
    with pytest.raises(PromptSetError, match="nothing was kept"):
        prompt_sets.fetch("ocr:train")
    assert not (tmp_path / "store" / "ocr" / "train.txt").exists()


def test_a_json_source_keeps_its_distinct_prompts(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXGRPO_PROMPTS", str(tmp_path / "store"))
    src = tmp_path / "test.json"
    src.write_text('[{"prompt": "a cat ", "rank": [1, 2]}, {"prompt": "a dog"}, {"prompt": "a cat"}]')
    _patch_entry(monkeypatch, "hpdv2:test", url=src.as_uri())
    prompt_sets.fetch("hpdv2:test")
    assert read_prompts("hpdv2:test") == ["a cat", "a dog"]


def test_unknown_split_and_set(capsys):
    with pytest.raises(PromptSetError, match="pickscore:train or pickscore:test"):
        read_prompts("pickscore:validation")
    assert main(["prompts", "fetch", "nosuchset:train"]) == 2
    assert "not a prompt set" in capsys.readouterr().err


def test_the_documented_sizes_are_the_manifest_s():
    """docs/prompts.md's table gives each split's prompts and bytes as the manifest records them."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "prompts.md").read_text(encoding="utf-8")
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 4 and cells[0].startswith("`") and cells[1] in ("train", "test"):
            rows[f"{cells[0].strip('`')}:{cells[1]}"] = (cells[2].replace(",", ""), cells[3].replace(",", ""))
    assert set(rows) == set(prompt_sets.names())
    for source, (prompts, size) in rows.items():
        entry = prompt_sets.entry(source)[2]
        if entry["prompts"] is not None:
            assert (prompts, size) == (str(entry["prompts"]), str(entry["bytes"])), source
