"""Embedding cache: preprocess once, then train without loading the text encoders."""

import json
import shutil

import pytest
import torch

from mixgrpo.models.flux_pipeline import load_flux, load_flux_text_encoder
from mixgrpo.models.sd3 import load_sd3
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
