"""`mixgrpo preprocess`: encode a prompt file once into a sharded embedding cache that training reads.

Real text encoders are large (FLUX.1's T5-XXL is ~9.5 GB in bf16, SD3's three encoders ~11 GB) and their
output for a fixed prompt set never changes. Encoding the prompts once, offline, lets training run without
loading them: `load_flux(..., embedding_cache=DIR)` / `load_sd3(..., embedding_cache=DIR)` read the cache.

Layout of a cache directory (written atomically):
  index.json            {"format", "version", "keys": {name: {"shape": per-prompt shape, "dtype"}},
                         "shards": [file names], "prompts": {prompt: [shard, row]}, "source": {...}}
  shard-00000.safetensors  one tensor per conditioning key, [rows, *shape]; rows are prompts
The empty prompt "" is always included: it is the unconditional input of classifier-free guidance.
Rows are read lazily (safetensors slices), so a cache larger than memory is fine.

Usage:
  mixgrpo preprocess --model flux --path /ckpt/FLUX.1-dev --prompts train.txt test.txt --out cache/flux \
      [--dtype bfloat16] [--device cuda] [--max-sequence-length 512] [--shard-size 256]
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mixgrpo.fileio import atomic_directory
from mixgrpo.models.base import Cond, PromptSets
from mixgrpo.progress import bar
from mixgrpo.prompts import read_prompts

INDEX = "index.json"
FORMAT = "mixgrpo-embedding-cache"
VERSION = 1
# Base models whose text encoder loads without the transformer: name -> "module:function(path, dtype, device,
# max_sequence_length)". Any other registered model is loaded whole and its encode_prompts is used.
TEXT_ENCODERS = {"flux": "mixgrpo.models.flux_pipeline:load_flux_text_encoder",
                 "sd3": "mixgrpo.models.sd3:load_sd3_text_encoder"}


class MissingPromptError(LookupError):
    """A prompt asked of an EmbeddingCache is not in it; the message names it and the fix."""


def _encode_fn(model: Any) -> Callable[[list[str]], Cond]:
    """`encode_prompts` of a FlowModel, or `encode` of a text encoder (or of an EmbeddingCache)."""
    for name in ("encode_prompts", "encode"):
        if callable(getattr(model, name, None)):
            return getattr(model, name)
    raise TypeError(f"preprocess: {type(model).__name__} has neither encode_prompts (a FlowModel) nor encode "
                    f"(a text encoder)")


def unique_prompts(prompts: Sequence[str]) -> list[str]:
    """"" (the unconditional prompt) first, then each distinct prompt once, in order of first appearance."""
    return list(dict.fromkeys(["", *prompts]))


def preprocess(prompt_files: str | Path | Sequence[str | Path], model: Any, out_dir: str | Path,
               shard_size: int = 256, batch_size: int = 16, source: dict | None = None) -> Path:
    """Encode every prompt of `prompt_files` (one or several .txt / .jsonl / .csv files or world:SPLIT sources,
    e.g. a run's train and eval prompts) with `model` into a cache at `out_dir`.

    model: a FlowModel (its encode_prompts) or a text encoder (its encode); Cond values must be [B, ...].
    shard_size: prompts per safetensors file. batch_size: prompts per encoder call.
    source: free-form description stored in the index (model name, path, ...). Returns `out_dir`.
    Raises ValueError for a missing, empty, non-UTF-8 or malformed prompt file.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"preprocess: shard_size ({shard_size}) and batch_size ({batch_size}) must be >= 1")
    files = [str(prompt_files)] if isinstance(prompt_files, (str, Path)) else [str(f) for f in prompt_files]
    prompts = unique_prompts([p for f in files for p in read_prompts(f)])
    encode = _encode_fn(model)
    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "keys": {}, "shards": [], "prompts": {},
                             "source": {"prompt_file": " ".join(files), **(source or {})}}
    with bar(total=len(prompts), desc="encoding prompts", unit="prompt") as progress:
        _write_cache(prompts, encode, out_dir, index, shard_size, batch_size, progress)
    return Path(out_dir)


def _write_cache(prompts: list[str], encode: Callable, out_dir: str | Path, index: dict[str, Any], shard_size: int,
                 batch_size: int, progress) -> None:
    from safetensors.torch import save_file

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
            raise FileNotFoundError(f"embedding cache {self.directory}: no {INDEX}; create it with "
                                    f"`mixgrpo preprocess --prompts FILE --out {self.directory} ...`")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"embedding cache {index_file} is not valid JSON ({e}); re-run mixgrpo preprocess")
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"embedding cache {index_file}: format {index.get('format')!r} version "
                             f"{index.get('version')!r}, expected {FORMAT!r} version {VERSION}; "
                             f"re-run mixgrpo preprocess")
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
                           f"from {self.source.get('prompt_file', '?')}); run `mixgrpo preprocess` on a prompt "
                           f"file that contains it, or train without the cache")
        rows = [self.rows[p] for p in prompts]
        return {key: torch.stack([self._shard(s).get_slice(key)[r] for s, r in rows]).to(self.device)
                for key in self.shapes}

    def check_widths(self, model: str, **expected: int) -> None:
        """Raise if the last dimension of a key differs from what the transformer expects (wrong model's cache)."""
        for key, width in expected.items():
            if self.shapes.get(key, (None,))[-1] != width:
                raise ValueError(f"{model}: the embedding cache {self.directory} has {key} of shape "
                                 f"{self.shapes.get(key)}, but the transformer expects width {width}; was it "
                                 f"built with this model ({self.source.get('path', '?')})? Re-run mixgrpo preprocess")


def coverage_problems(directory: str | Path, prompts: PromptSets, fix: str) -> list[str]:
    """One line naming the prompts of each set that the cache at `directory` lacks (and `fix`), or the reason
    the cache cannot be read; [] when it holds them all."""
    try:
        cache = EmbeddingCache(directory)
    except (OSError, ValueError) as e:
        return [str(e)]
    gaps = []
    for split, (source, texts) in prompts.items():
        distinct = list(dict.fromkeys(texts))
        missing = [p for p in distinct if p not in cache]
        if missing:
            gaps.append(f"{len(missing)} of the {len(distinct)} {split} prompts ({source}; e.g. {missing[0]!r})")
    return [f"the embedding cache {directory} lacks {' and '.join(gaps)}: {fix}"] if gaps else []


def _load_text_encoder(model: str, path: str | None, dtype: str, device: str, max_sequence_length: int | None,
                       args: dict[str, Any]) -> Any:
    if model in TEXT_ENCODERS:
        if not path:
            raise ValueError(f"preprocess: --model {model} needs --path (the local pipeline directory)")
        module, _, fn = TEXT_ENCODERS[model].partition(":")
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        return getattr(importlib.import_module(module), fn)(path, dtype=dtype, device=device, **kw, **args)
    import mixgrpo.models.sd3  # noqa: F401  (registers "flux" and "sd3" among the built-in models)
    import mixgrpo.models.tiny  # noqa: F401  (registers "tiny")
    from mixgrpo.models import MODELS

    kw = dict(args) | ({"path": path} if path else {})
    return MODELS.get(model)(**kw)


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="mixgrpo preprocess", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="base-model name: flux, sd3 (text encoders only), or any "
                                                       "registered model (loaded whole)")
    parser.add_argument("--path", help="local diffusers pipeline directory of the model")
    parser.add_argument("--prompts", required=True, nargs="+", action="extend",
                        help="prompt files: .txt (one per line), .jsonl ({\"prompt\": ...}) or .csv (a \"prompt\" "
                             "column), or world:SPLIT; several files (a run's train and eval prompts) go in one cache")
    parser.add_argument("--out", required=True, help="cache directory to write (replaced atomically)")
    parser.add_argument("--dtype", default="bfloat16", help="text-encoder dtype (default bfloat16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens per prompt (default: the model's)")
    parser.add_argument("--shard-size", type=int, default=256, help="prompts per shard file (default 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call (default 16)")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra keyword argument of the loader (YAML value), e.g. --arg use_t5=false")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--arg {item!r}: expected KEY=VALUE")
        extra[key.strip()] = yaml.safe_load(value)

    start = time.perf_counter()
    encoder = _load_text_encoder(args.model, args.path, args.dtype, args.device, args.max_sequence_length, extra)
    source = {"model": args.model, "path": args.path, "dtype": args.dtype,
              "max_sequence_length": args.max_sequence_length, **extra}
    out = preprocess(args.prompts, encoder, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                     source=source)
    cache = EmbeddingCache(out)
    shapes = ", ".join(f"{k} {list(v)}" for k, v in cache.shapes.items())
    print(f"wrote {len(cache)} prompt embeddings ({shapes}) to {out} in {time.perf_counter() - start:.1f} s")
    return 0
