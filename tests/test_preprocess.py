"""Embedding cache: preprocess once, then train without loading the text encoders."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixgrpo.models.flux_pipeline import load_flux, load_flux_text_encoder
from mixgrpo.models.sd3 import load_sd3
from mixgrpo import fileio
from mixgrpo.models.text import EmbeddingCache, MissingPromptError
from mixgrpo.preprocess import main, preprocess

from tiny_pipelines import save_tiny_flux, save_tiny_sd3

SIZE, MAX_SEQ = 32, 24
PROMPTS = ["a red cube", "two blue spheres", "a green cone", "a red cube", "a cat, sitting"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("pre") / "flux")


@pytest.fixture(scope="module")
def encoder(flux_dir):
    return load_flux_text_encoder(flux_dir, dtype="float32", max_sequence_length=MAX_SEQ)


def write_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS)), encoding="utf-8")
    csv = tmp_path / "p.csv"
    csv.write_text("id,prompt\n" + "\n".join(f'{i},"{p}"' for i, p in enumerate(PROMPTS)), encoding="utf-8")
    return txt, jsonl, csv


def test_cache_equals_encoder_for_every_file_format(encoder, tmp_path):
    expected = encoder.encode(["", *PROMPTS])
    for i, prompt_file in enumerate(write_prompt_files(tmp_path)):
        cache = EmbeddingCache(preprocess(prompt_file, encoder, tmp_path / f"cache{i}", shard_size=2, batch_size=3))
        # "" for CFG plus the 4 distinct prompts, 2 per shard.
        assert len(cache) == 5 and "" in cache and "a cat, sitting" in cache
        assert len(list((tmp_path / f"cache{i}").glob("shard-*.safetensors"))) == 3
        assert cache.shapes == {"prompt_embeds": (MAX_SEQ, 32), "pooled": (16,)}
        got = cache.encode(["", *PROMPTS])  # repeated prompts and any order
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)


def test_missing_prompt_names_it_and_the_fix(encoder, tmp_path):
    txt, _, _ = write_prompt_files(tmp_path)
    cache = EmbeddingCache(preprocess(txt, encoder, tmp_path / "cache"))
    with pytest.raises(MissingPromptError, match=r"'a purple torus'.*mixgrpo preprocess"):
        cache.encode(["a red cube", "a purple torus"])
    with pytest.raises(FileNotFoundError, match="mixgrpo preprocess"):
        EmbeddingCache(tmp_path / "nowhere")


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"\n  \n", "no prompts"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "not UTF-8"),
    ("nocol.csv", b"id,text\n1,a cube\n", "'prompt' column"),
    ("bad.jsonl", b'{"prompt": "ok"}\n{"text": "no prompt"}\n', '"prompt"'),
])
def test_bad_prompt_files_are_value_errors(encoder, tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        preprocess(path, encoder, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_flux_trains_from_cache_without_text_encoders(flux_dir, encoder, tmp_path):
    txt, _, _ = write_prompt_files(tmp_path)
    cache_dir = preprocess(txt, encoder, tmp_path / "cache")
    # A copy of the checkpoint without its text encoders: loading must not need them.
    stripped = tmp_path / "flux-no-text"
    shutil.copytree(flux_dir, stripped)
    for folder in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(stripped / folder)
    full = load_flux(str(flux_dir), dtype="float32", height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    cached = load_flux(str(stripped), dtype="float32", height=SIZE, width=SIZE, embedding_cache=str(cache_dir))
    assert isinstance(cached.text_encoder, EmbeddingCache)
    x = torch.randn(2, *full.latent_shape)
    sigma = torch.tensor([0.9, 0.2])
    with torch.no_grad():
        v_full = full(x, sigma, full.encode_prompts(PROMPTS[:2]))
        v_cached = cached(x, sigma, cached.encode_prompts(PROMPTS[:2]))
    torch.testing.assert_close(v_cached, v_full, rtol=1e-5, atol=1e-5)


def test_cli_main_sd3_and_wrong_model_cache(flux_dir, tmp_path, capsys):
    sd3_dir = save_tiny_sd3(tmp_path / "sd3")
    txt, _, _ = write_prompt_files(tmp_path)
    assert main(["--model", "sd3", "--path", str(sd3_dir), "--prompts", str(txt), "--out", str(tmp_path / "c"),
                 "--dtype", "float32", "--device", "cpu", "--max-sequence-length", str(MAX_SEQ),
                 "--shard-size", "2"]) == 0
    assert "wrote 5 prompt embeddings" in capsys.readouterr().out
    model = load_sd3(str(sd3_dir), dtype="float32", height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    cache = EmbeddingCache(tmp_path / "c")
    assert cache.source["model"] == "sd3" and cache.source["max_sequence_length"] == MAX_SEQ
    expected = model.encode_prompts(["", "a green cone"])
    got = cache.encode(["", "a green cone"])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)

    flux_cache = preprocess(txt, load_flux_text_encoder(flux_dir, dtype="float32", max_sequence_length=MAX_SEQ),
                            tmp_path / "flux-cache")
    with pytest.raises(ValueError, match="pooled.*Re-run mixgrpo preprocess"):
        load_sd3(str(sd3_dir), dtype="float32", height=SIZE, width=SIZE, embedding_cache=str(flux_cache))


def test_rerun_replaces_cache_and_keeps_dtype(flux_dir, tmp_path):
    bf16 = load_flux_text_encoder(flux_dir, dtype="bfloat16", max_sequence_length=MAX_SEQ)
    first = tmp_path / "a.txt"
    first.write_text("a red cube\n", encoding="utf-8")
    second = tmp_path / "b.txt"
    second.write_text("a blue cube\n", encoding="utf-8")
    preprocess(first, bf16, tmp_path / "cache")
    cache = EmbeddingCache(preprocess(second, bf16, tmp_path / "cache"))
    assert "a blue cube" in cache and "a red cube" not in cache
    assert cache.encode(["a blue cube"])["prompt_embeds"].dtype == torch.bfloat16


def test_several_prompt_files_go_into_one_cache(encoder, flux_dir, tmp_path):
    """A run's train and eval prompts in one cache: `mixgrpo preprocess --prompts TRAIN EVAL`."""
    (tmp_path / "train.txt").write_text("a red cube\ntwo blue spheres\n")
    (tmp_path / "eval.txt").write_text("a cat\na red cube\n")
    assert main(["--model", "flux", "--path", str(flux_dir), "--prompts", str(tmp_path / "train.txt"),
                 str(tmp_path / "eval.txt"), "--out", str(tmp_path / "cache"), "--dtype", "float32",
                 "--max-sequence-length", str(MAX_SEQ), "--device", "cpu"]) == 0
    cache = EmbeddingCache(tmp_path / "cache")
    assert len(cache) == 4 and all(p in cache for p in ("", "a red cube", "two blue spheres", "a cat"))
    torch.testing.assert_close(cache.encode(["a cat"])["prompt_embeds"], encoder.encode(["a cat"])["prompt_embeds"])


class FakeEncoder:
    """A text encoder without weights: each prompt's embedding is a function of its text; `calls` counts
    encode calls, and the call numbered `die_at` kills the process (SIGKILL: no clean-up runs)."""

    def __init__(self, die_at: int | None = None):
        self.calls, self.die_at = 0, die_at

    def encode(self, prompts):
        self.calls += 1
        if self.calls == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        rows = [[len(p), sum(map(ord, p)) % 97, i] for i, p in enumerate(prompts)]
        return {"prompt_embeds": torch.tensor(rows, dtype=torch.float32)[:, None, :].expand(-1, 2, -1)}


MANY = [f"prompt number {i}" for i in range(7)]  # with "": 8 prompts, 4 shards of 2


def kill_a_preprocess(prompt_file, out, die_at):
    """Run `preprocess` in another process that SIGKILLs itself in its `die_at`-th encoder call (batches of 1)."""
    code = (f"from test_preprocess import FakeEncoder; from mixgrpo.preprocess import preprocess; "
            f"preprocess({str(prompt_file)!r}, FakeEncoder(die_at={die_at}), {str(out)!r}, shard_size=2, batch_size=1)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_a_killed_preprocess_resumes_from_its_finished_shards(tmp_path, capsys):
    """kill -9 in the third shard leaves .cache.tmp-HOST-PID-* with two finished shards; running the same
    preprocess again encodes only the prompts of the other two, and leaves no temporary behind."""
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("\n".join(MANY), encoding="utf-8")
    kill_a_preprocess(prompt_file, tmp_path / "cache", die_at=5)
    assert len(list(tmp_path.glob(".cache.tmp-*"))) == 1 and not (tmp_path / "cache").exists()

    resumed = FakeEncoder()
    cache = EmbeddingCache(preprocess(prompt_file, resumed, tmp_path / "cache", shard_size=2, batch_size=1))
    assert resumed.calls == 4  # shards 2 and 3; shards 0 and 1 were taken over
    assert "resumed from 2 finished shards (4 prompts)" in capsys.readouterr().out
    assert not list(tmp_path.glob(".cache.*")) and not (tmp_path / "cache" / ".partial.json").exists()
    fresh = EmbeddingCache(preprocess(prompt_file, FakeEncoder(), tmp_path / "fresh", shard_size=2, batch_size=1))
    assert len(cache) == len(fresh) == 8
    torch.testing.assert_close(cache.encode(["", *MANY]), fresh.encode(["", *MANY]), rtol=0, atol=0)


def test_dead_temporaries_of_other_prompts_are_swept_and_a_live_writers_kept(tmp_path, capsys):
    """A killed preprocess of other prompts cannot be resumed: its temporary (tens of GB for a real prompt set)
    is deleted; one of a process that still runs is left alone."""
    other = tmp_path / "other.txt"
    other.write_text("something else\nentirely\nand more\nand more still\n", encoding="utf-8")
    kill_a_preprocess(other, tmp_path / "cache", die_at=3)
    dead = list(tmp_path.glob(".cache.tmp-*"))
    live = tmp_path / f".cache.tmp-{fileio._OWNER.rpartition('-')[0]}-{os.getppid()}-abc"
    live.mkdir()
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("\n".join(MANY), encoding="utf-8")
    encoder = FakeEncoder()
    preprocess(prompt_file, encoder, tmp_path / "cache", shard_size=2, batch_size=1)
    assert encoder.calls == 8 and len(dead) == 1 and not dead[0].exists() and live.is_dir()
    assert f"removed what an interrupted preprocess left: {dead[0].name}" in capsys.readouterr().out


LONG = [f"a photograph of {n} red cubes stacked on a wooden table beside a window, soft light, film grain, "
        f"highly detailed" for n in range(6)]  # over 77 CLIP tokens (one per byte here) and over 24 T5 tokens


def test_truncations_are_one_warning_and_one_summary_line_per_text_encoder(flux_dir, tmp_path, capsys):
    """Six long prompts in three batches: one warning per tokenizer (not one per prompt or batch), then one line
    per text encoder with the count and the file that lists them."""
    prompt_file = tmp_path / "long.txt"
    prompt_file.write_text("\n".join([*LONG, "a cat"]), encoding="utf-8")
    encoder = load_flux_text_encoder(flux_dir, dtype="float32", max_sequence_length=MAX_SEQ)
    with pytest.warns(UserWarning, match="was truncated to") as caught:
        preprocess(prompt_file, encoder, tmp_path / "cache", batch_size=2)
    assert len([w for w in caught if "truncated" in str(w.message)]) == 2, [str(w.message) for w in caught]
    listed = tmp_path / "cache" / "truncated.txt"
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "truncated" in line] == [
        f"note: CLIPTokenizer truncated 6 prompts to 77 tokens, as the diffusers pipelines do (listed "
        f"in {listed})",
        f"note: T5Tokenizer truncated 6 prompts to {MAX_SEQ} tokens, as the diffusers pipelines "
        f"do (listed in {listed})"]
    rows = listed.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + 12 and rows[1].split("\t")[2] == LONG[0] and "a cat" not in listed.read_text()
    assert EmbeddingCache(tmp_path / "cache").shapes["prompt_embeds"] == (MAX_SEQ, 32)


def test_encoding_without_a_cache_warns_once_and_is_summarised(flux_dir, recwarn):
    """Training without a cache encodes batch after batch: the first truncation per tokenizer warns, the rest are
    counted for the one summary line per text encoder that the end of a run prints."""
    from mixgrpo.models.text import take_truncations, truncation_lines

    encoder = load_flux_text_encoder(flux_dir, dtype="float32", max_sequence_length=MAX_SEQ)
    for i in range(0, 6, 2):
        encoder.encode(LONG[i:i + 2])
    assert len([w for w in recwarn if "was truncated to" in str(w.message)]) == 2
    lines = truncation_lines(take_truncations())
    assert len(lines) == 2 and "CLIPTokenizer truncated 6 prompts to 77 tokens" in lines[0]
    assert "e.g. 'a photograph of 0 red cubes" in lines[0]
    encoder.encode(LONG[:1])
    assert len([w for w in recwarn if "was truncated to" in str(w.message)]) == 2 and take_truncations()


@pytest.mark.parametrize("bf16,encoded", [(False, "float32"), (True, "bfloat16")])
def test_a_cpu_without_bf16_units_encodes_in_float32_and_stores_the_runs_dtype(flux_dir, tmp_path, capsys,
                                                                                monkeypatch, bf16, encoded):
    """The default --dtype bfloat16 on a CPU: the encoders run in float32 unless the CPU has bf16 instructions
    (emulated bf16 is several times slower), and the cache holds bfloat16 either way (what a bf16 run reads,
    wherever the cache was made)."""
    import mixgrpo.preprocess as pre

    found = "CPU with AVX512-BF16" if bf16 else "CPU without bf16 instructions"
    monkeypatch.setattr(pre, "cpu_bf16_instructions", lambda: (bf16, found))
    (tmp_path / "p.txt").write_text("a red cube\na cat\n", encoding="utf-8")
    assert main(["--model", "flux", "--path", str(flux_dir), "--prompts", str(tmp_path / "p.txt"), "--out",
                 str(tmp_path / "cache"), "--max-sequence-length", str(MAX_SEQ), "--device", "cpu"]) == 0
    assert (f"text encoders run in {encoded} on cpu (auto: {found}); embeddings stored as bfloat16 (--dtype)"
            in capsys.readouterr().out)
    cache = EmbeddingCache(tmp_path / "cache")
    assert cache.source["encode_dtype"] == encoded and cache.source["dtype"] == "bfloat16"
    got = cache.encode(["a cat"])
    assert got["prompt_embeds"].dtype == got["pooled"].dtype == torch.bfloat16
    if not bf16:
        exact = load_flux_text_encoder(flux_dir, dtype="float32", max_sequence_length=MAX_SEQ).encode(["a cat"])
        torch.testing.assert_close(got["prompt_embeds"], exact["prompt_embeds"].bfloat16(), rtol=0, atol=0)


def test_a_bad_encode_dtype_is_named_before_any_encoder_loads(tmp_path):
    from mixgrpo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--encode-dtype = 'float8' is invalid: use auto or one of"):
        main(["--model", "flux", "--path", str(tmp_path / "nowhere"), "--prompts", "p.txt", "--out",
              str(tmp_path / "cache"), "--encode-dtype", "float8", "--device", "cpu"])
