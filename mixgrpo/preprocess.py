"""`mixgrpo preprocess`: encode a prompt file once into a sharded embedding cache that training reads.

Real text encoders are large (FLUX.1's T5-XXL is ~9.5 GB in bf16, SD3's three encoders ~11 GB) and their
output for a fixed prompt set never changes. Encoding the prompts once, offline, lets training run without
loading them: `load_flux(..., embedding_cache=DIR)` / `load_sd3(..., embedding_cache=DIR)` read the cache.

The cache's format, its writer and its reader (`EmbeddingCache`) live beside the text encoders, in
`mixgrpo.models.text`.

Usage:
  mixgrpo preprocess --model flux --path /ckpt/FLUX.1-dev --prompts train.txt test.txt --out cache/flux \
      [--dtype bfloat16] [--encode-dtype auto] [--device cuda] [--max-sequence-length 512] [--shard-size 256]

--dtype is the dtype the embeddings are stored in: the run's model.args.dtype, which the models cast them to
anyway, so a cache written on one machine serves a run on another. --encode-dtype auto runs the text encoders
in it too, except on a CPU without bf16 instructions (neither AMX nor AVX512-BF16), where they run in float32:
bf16 is emulated there, several times slower (`mixgrpo.dtypes.cpu_bf16_instructions`). A preprocess that is killed leaves its finished shards; run it
again and it resumes from them (`mixgrpo.models.text.write_cache`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mixgrpo.dtypes import cpu_bf16_instructions, parse_dtype
from mixgrpo.errors import ConfigError
from mixgrpo.keyvalue import parse_pair
from mixgrpo.models.base import Cond
from mixgrpo.models.text import EmbeddingCache, example_key, write_cache
from mixgrpo.progress import bar
from mixgrpo.prompts import Example, read_examples

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
               shard_size: int = 256, batch_size: int = 16, source: dict | None = None,
               dtype: str | torch.dtype | None = None) -> Path:
    """Encode every prompt of `prompt_files` (one or several .txt / .jsonl / .csv files or world:SPLIT sources,
    e.g. a run's train and eval prompts) with `model` into a cache at `out_dir`.

    model: a FlowModel (its encode_prompts) or a text encoder (its encode); Cond values must be [B, ...].
    shard_size: prompts per safetensors file. batch_size: prompts per encoder call.
    source: free-form description stored in the index (model name, path, ...). dtype: what floating-point
    embeddings are stored as (None: as encoded). Prints what `write_cache` reports (a resume, the prompts the
    text encoders truncated). Returns `out_dir`.
    Examples with input images (an image-conditioned model) are cached by example (`example_key`): each (prompt,
    images) and CFG's ("", images), the images read at the model's `image_size()`; given a text encoder alone (a
    pipeline model whose text encoders see no image: FLUX.1-Kontext, Wan I2V), by prompt, the adapter encoding the
    images itself.
    Raises ValueError for a missing, empty, non-UTF-8 or malformed prompt file.
    """
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"preprocess: shard_size ({shard_size}) and batch_size ({batch_size}) must be >= 1")
    files = [str(prompt_files)] if isinstance(prompt_files, (str, Path)) else [str(f) for f in prompt_files]
    examples = [e for f in files for e in read_examples(f)]
    encode = _encode_fn(model)
    keyed_by = "prompt"
    if any(e.images for e in examples) and callable(getattr(model, "image_size", None)):
        prompts, encode = _example_rows(examples, model, encode)
        keyed_by = "example"
    else:
        prompts = unique_prompts([e.prompt for e in examples])
    if dtype is not None:
        encode_as = encode
        store = parse_dtype(dtype)

        def encode(batch: list[str]) -> Cond:
            return {k: v.to(store) if v.is_floating_point() else v for k, v in encode_as(batch).items()}

    with bar(total=len(prompts), desc="encoding prompts", unit="prompt") as progress:
        notes = write_cache(prompts, encode, out_dir, {"prompt_file": " ".join(files), **(source or {})}, shard_size,
                            batch_size, progress, keyed_by)
    for line in notes:
        print(line, flush=True)
    return Path(out_dir)


def _example_rows(examples: list[Example], model: Any,
                  encode: Callable) -> tuple[list[str], Callable[[list[str]], Cond]]:
    """(the distinct `example_key`s of `examples` and of their CFG rows ("" with the same images), an encoder of a
    batch of them): the images are read again for each batch, so that they are never all in memory."""
    from mixgrpo.images import load_inputs

    size = model.image_size()
    rows: dict[str, tuple[str, Example]] = {}
    for e in examples:
        images = load_inputs([e], size)[0]
        for prompt in (e.prompt, ""):
            rows.setdefault(example_key(prompt, images), (prompt, e))

    def encode_rows(keys: list[str]) -> Cond:
        prompts, chosen = zip(*(rows[k] for k in keys))
        return encode(list(prompts), load_inputs(chosen, size))

    return list(rows), encode_rows


def encode_dtype(requested: str, dtype: str, device: str) -> tuple[str, str]:
    """(the dtype the text encoders run in, why) for --encode-dtype `requested` ("auto" or a dtype), the stored
    `dtype` and `device`: "auto" is `dtype`, except float32 on a CPU without bf16 instructions
    (`cpu_bf16_instructions`), where bf16 or fp16 is emulated and several times slower."""
    if requested != "auto":
        return requested, "--encode-dtype"
    if torch.device(device).type != "cpu" or parse_dtype(dtype) == torch.float32:
        return dtype, "auto: the stored dtype"
    fast, found = cpu_bf16_instructions()
    return (dtype, f"auto: {found}") if fast else ("float32", f"auto: {found}")


def _load_text_encoder(model: str, path: str | None, dtype: str, device: str, max_sequence_length: int | None,
                       args: dict[str, Any]) -> Any:
    """The model's text encoder alone when its description has a loader (`ModelSpec.text_encoder`: the pipeline
    models), else the whole registered model (its encode_prompts)."""
    from mixgrpo.models import MODELS

    spec = MODELS.spec(model)
    if spec.text_encoder is not None:
        if not path:
            raise ConfigError(f"preprocess: --model {model} needs --path (the local pipeline directory)")
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        return spec.text_encoder(path, dtype=dtype, device=device, **kw, **args)
    kw = dict(args) | ({"path": path} if path else {})
    return spec.factory(**kw)


def _check_args(args) -> None:
    """The values of a preprocess command, before any encoder loads (`mixgrpo.errors.check_values`)."""
    from mixgrpo.dtypes import DTYPES
    from mixgrpo.errors import check_values
    from mixgrpo.preflight import device_problems

    check_values([
        (args.shard_size >= 1, "--shard-size", args.shard_size, "an integer >= 1"),
        (args.batch_size >= 1, "--batch-size", args.batch_size, "an integer >= 1"),
        (args.max_sequence_length is None or args.max_sequence_length >= 1, "--max-sequence-length",
         args.max_sequence_length, "an integer >= 1"),
        (args.dtype in DTYPES, "--dtype", args.dtype, f"one of {sorted(DTYPES)}"),
        (args.encode_dtype in ("auto", *DTYPES), "--encode-dtype", args.encode_dtype,
         f"auto or one of {sorted(DTYPES)}"),
        (bool(args.out.strip()), "--out", args.out, "the cache directory to write (empty: an unset shell variable?)")])
    for problem in device_problems("--device", args.device):
        raise ConfigError(problem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixgrpo preprocess", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="base-model name: flux, sd3, qwen_image, flux2, wan (text "
                                                       "encoders only), or any registered model (loaded whole)")
    parser.add_argument("--path", help="local diffusers pipeline directory of the model")
    parser.add_argument("--prompts", required=True, nargs="+", action="extend",
                        help="prompt files: .txt (one per line), .jsonl ({\"prompt\": ...}) or .csv (a \"prompt\" "
                             "column), or world:SPLIT; several files (a run's train and eval prompts) go in one cache")
    parser.add_argument("--out", required=True, help="cache directory to write (replaced atomically)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype the embeddings are stored in: the run's "
                                                            "model.args.dtype (default bfloat16)")
    parser.add_argument("--encode-dtype", default="auto",
                        help="dtype the text encoders run in (default auto: --dtype, but float32 on a CPU without "
                             "bf16 instructions)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens per prompt (default: the model's)")
    parser.add_argument("--shard-size", type=int, default=256, help="prompts per shard file (default 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call (default 16)")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra keyword argument of the loader (YAML value), e.g. --arg use_t5=false")
    args = parser.parse_args(argv)
    extra = dict(parse_pair(item, "--arg", example="--arg use_t5=false") for item in args.arg)
    _check_args(args)

    start = time.perf_counter()
    run_in, why = encode_dtype(args.encode_dtype, args.dtype, args.device)
    print(f"text encoders run in {run_in} on {args.device} ({why}); embeddings stored as {args.dtype} (--dtype)",
          flush=True)
    encoder = _load_text_encoder(args.model, args.path, run_in, args.device, args.max_sequence_length, extra)
    source = {"model": args.model, "path": args.path, "dtype": args.dtype, "encode_dtype": run_in,
              "max_sequence_length": args.max_sequence_length, **extra}
    out = preprocess(args.prompts, encoder, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                     source=source, dtype=args.dtype)
    cache = EmbeddingCache(out)
    shapes = ", ".join(f"{k} {list(v)}" for k, v in cache.shapes.items())
    print(f"wrote {len(cache)} prompt embeddings ({shapes}) to {out} in {time.perf_counter() - start:.1f} s")
    return 0
