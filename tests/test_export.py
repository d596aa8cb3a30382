"""The result of a run, through the real CLI on tiny random FLUX.1 and SD3 pipelines (official layout, CPU, gloo).

`torchrun --nproc_per_node 2 -m mixgrpo train ... parallel.strategy=fsdp` runs end with a final/ that the stock
FluxPipeline / StableDiffusion3Pipeline load with no mixgrpo code and that reproduces `mixgrpo sample --path
RUN`; `mixgrpo export` writes the same files from a checkpoint (sharded or full); `mixgrpo eval` scores the run,
its real base and the hybrid of the two; the run's configuration problems stop it before any model loads.
Two of the four (model x format) runs are in the default suite, the other two are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mixgrpo import cli

from tiny_pipelines import save_tiny_flux, save_tiny_sd3

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["a red cube on a table", "two blue spheres", "a green cone"]
EVAL = ["a cat", "a yellow dog"]
STEPS, SIZE, MAX_SEQ = 4, 32, 24
GUIDANCE = {"flux": 1.0, "sd3": 4.5}  # SD3 needs real CFG; FLUX.1-dev uses its distilled guidance (3.5) instead


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pipelines")
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL) + "\n")
    return {"flux": save_tiny_flux(root / "flux"), "sd3": save_tiny_sd3(root / "sd3"), "root": root}


def _config(base: dict, name: str, lora: int, out: Path, **over) -> dict:
    return {"algorithm": "mixgrpo", "sampler": {"num_steps": STEPS, "window": {"size": 1}}, "model": {"name": name, "args": {"path": str(base[name]), "dtype": "float32", "height": SIZE,
                                         "width": SIZE, "max_sequence_length": MAX_SEQ}}, "rewards": [{"name": "jpeg_compressibility"}], "rollout": {"guidance_scale": GUIDANCE[name], "prompts": str(base["root"] / "train.txt"), "prompts_per_iteration": 1, "group_size": 2}, "eval": {"prompts": str(base["root"] / "eval.txt"), "num_prompts": 2}, "run": {"iterations": 2, "checkpoint_every": 1, "out_dir": str(out)}, "update": {"steps_per_epoch": 1, "micro_batch_size": 2}, "optim": {"lr": 1.0e-2}, "loss": {"clip_range": 0.2}, "lora": {"rank": lora, "alpha": 2 * lora}, **over}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUNS = {  # name -> (model, LoRA rank, checkpoint format)
    "flux_full": ("flux", 0, "sharded"),
    "sd3_lora": ("sd3", 4, "full"),
    "flux_lora": ("flux", 4, "sharded"),
    "sd3_full": ("sd3", 0, "full"),
}
DEFAULT = ["flux_full", "sd3_lora"]
ALL = [*DEFAULT, *(pytest.param(n, marks=pytest.mark.slow) for n in RUNS if n not in DEFAULT)]


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """name -> run directory of a 2-rank FSDP run launched with torchrun through the CLI (trained on first use)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            model, lora, fmt = RUNS[name]
            out = tmp_path_factory.mktemp("runs") / name
            config = out.parent / f"{name}.yaml"
            config.write_text(yaml.safe_dump(_config(base, model, lora, out)))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), "-m", "mixgrpo", "train", "--config", str(config),
                   "--quiet", "parallel.strategy=fsdp", f"parallel.checkpoint_format={fmt}"]
            proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert "returned a view tensor" not in proc.stderr  # FSDP2's warnings about diffusers' blocks: silenced
            done[name] = out
        return done[name]

    return get


def _pipeline(base: dict, name: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if name == "flux" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(base[name], local_files_only=True)  # its own scheduler: mixgrpo samples on its grid
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_images(pipe, name: str, prompts: list[str], seed: int = 1) -> torch.Tensor:
    """What the stock pipeline makes with its own defaults (its scheduler, its number of steps, its resolution-
    dependent shift) from mixgrpo's noise of image 0 of each prompt, as `mixgrpo sample` samples a real model by
    default (seed: its default for a run, the run's evaluation seed held_out_seed(0) = 1): [N, H, W, 3] in
    [0, 255] (float, to be rounded as a PNG is)."""
    from mixgrpo.seeding import derive_seed
    from mixgrpo.models.flux import pack

    shape = (16, SIZE // 2, SIZE // 2)  # latents of the tiny VAE (factor 2)
    noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(derive_seed(seed, i, 0)))
                       for i in range(len(prompts))])
    kw = {"guidance_scale": 3.5} if name == "flux" else {"guidance_scale": GUIDANCE["sd3"]}
    with torch.no_grad():
        images = pipe(prompts, height=SIZE, width=SIZE, latents=pack(noise, 2) if name == "flux" else noise,
                      max_sequence_length=MAX_SEQ, output_type="pt", **kw).images
    return (images.clamp(0, 1) * 255).permute(0, 2, 3, 1)


def _png(images: torch.Tensor) -> np.ndarray:
    return images.round().to(torch.uint8).numpy().astype(int)


def _pngs(directory: Path, pattern: str = "*_00.png") -> np.ndarray:
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(directory.glob(pattern))])


def _load_into(pipe, name: str, export: Path) -> None:
    """The export into a stock pipeline, with diffusers' own loaders only."""
    if (export / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(export)
    else:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        cls = FluxTransformer2DModel if name == "flux" else SD3Transformer2DModel
        pipe.transformer = cls.from_pretrained(export)


def _cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


@pytest.mark.parametrize("run_name", ALL)
def test_fsdp_run_exports_what_stock_pipelines_load_and_reproduce(runs, base, tmp_path, run_name):
    name, lora, fmt = RUNS[run_name]
    run = runs(run_name)
    final = run / "final"
    assert (final / ("pytorch_lora_weights.safetensors" if lora else "config.json")).is_file()
    assert (run / "summary.md").is_file() and (run / "samples_after.png").is_file()

    # the stock pipeline with the export, at its own defaults, reproduces `mixgrpo sample --path RUN` (the
    # pipeline's own grid, the run's guidance)
    assert _cli("sample", "--path", run, "--prompts", base["root"] / "eval.txt", "--out", tmp_path / "s") == 0
    ours = _pngs(tmp_path / "s")
    pipe = _pipeline(base, name)
    before = _stock_images(pipe, name, EVAL)
    _load_into(pipe, name, final)
    stock = _stock_images(pipe, name, EVAL)
    assert np.abs(ours.astype(int) - _png(stock)).max() <= 1  # the same images, up to 8-bit rounding
    assert (stock - before).abs().max() > 0.05  # and the trained weights changed them

    # the same files from the checkpoint of the last iteration, written by 2 ranks (DCP shards or gathered)
    checkpoint = run / "checkpoints" / "iter_000002"
    assert (checkpoint / "dcp").is_dir() == (fmt == "sharded")
    assert _cli("export", "--run", run, "--checkpoint", "iter_000002", "--out", tmp_path / "exported") == 0
    for f in final.glob("*.safetensors"):
        a, b = load_file(str(f)), load_file(str(tmp_path / "exported" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _cli("export", "--run", run, "--out", tmp_path / "exported") == 2  # never replaces an export silently


@pytest.mark.parametrize("run_name", ALL)
def test_eval_scores_the_run_its_real_base_and_the_hybrid(runs, base, tmp_path, run_name):
    name = RUNS[run_name][0]
    run = runs(run_name)
    out = tmp_path / "eval"
    assert _cli("eval", "base=base", f"tuned={run}", "--hybrid", run, "--p-mix", "0.5", "--prompts",
                base["root"] / "eval.txt", "--reward", "jpeg_compressibility", "--save-images", "--out", out) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert sorted({r["model"] for r in rows}) == ["base", "hybrid p_mix=0.5", "tuned"]
    images = {label: _pngs(d) for label, d in ((d.name.split("_", 1)[1], d) for d in (out / "images").iterdir())}
    assert (out / "images" / "00_base" / "grid.png").is_file()
    # "base" is the run's real base model: the stock pipeline of the base directory makes the same images
    stock_base = _stock_images(_pipeline(base, name), name, EVAL)
    assert np.abs(images["base"].astype(int) - _png(stock_base)).max() <= 1
    hybrid = images["hybrid_p_mix_0.5"]
    assert (hybrid != images["tuned"]).any()  # the base ran the last 2 of the 4 steps ...
    assert (hybrid != images["base"]).any()  # ... after the fine-tuned model ran the first 2


def test_sample_and_eval_take_device_dtype_resolution_and_steps(runs, base, tmp_path):
    run = runs("flux_full")
    assert _cli("sample", "--path", run, "--prompt", "a cat", "--resolution", "48x64", "--steps", "3",
                "--dtype", "bfloat16", "--device", "cpu", "--out", tmp_path / "s") == 0
    assert Image.open(tmp_path / "s" / "0000_00.png").size == (64, 48)  # width x height
    # a checkpoint of the run is a model too, and the base alone takes the same options
    assert _cli("sample", "--path", run / "checkpoints" / "iter_000001", "--base-path", "base", "--prompt", "a cat",
                "--resolution", "32", "--out", tmp_path / "c") == 0
    assert _cli("sample", "--model", "tiny", "--path", run, "--prompt", "a cat", "--resolution", "abc",
                "--out", tmp_path / "x") == 2


def test_resuming_a_two_rank_run_on_one_process_names_the_prompts_per_iteration(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs("flux_full"), run, ignore=shutil.ignore_patterns("final"))
    capsys.readouterr()
    assert _cli("train", "--out", run, "--resume", "run.iterations=3") == 2
    err = capsys.readouterr().err
    assert "rollout.prompts_per_iteration=2" in err and len(err.strip().splitlines()) == 1


def test_missing_cache_entries_stop_the_run_before_any_model_loads(base, tmp_path, capsys):
    """The docs' sequence (preprocess the train prompts, train with other eval prompts) used to load the model and
    then crash; a train prompt missing from the cache crashed mid-run. Both now stop at once, naming the fix."""
    cache = tmp_path / "cache"
    assert _cli("preprocess", "--model", "flux", "--path", base["flux"], "--prompts", base["root"] / "train.txt",
                "--out", cache, "--dtype", "float32", "--max-sequence-length", MAX_SEQ, "--device", "cpu") == 0
    (tmp_path / "more.txt").write_text("\n".join([*TRAIN, "a prompt nobody encoded"]) + "\n")
    data = _config(base, "flux", 0, tmp_path / "run", rollout={"prompts": str(tmp_path / "more.txt")})
    data["model"]["args"]["embedding_cache"] = str(cache)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert _cli("train", "--config", tmp_path / "c.yaml", "--quiet") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "lacks 1 of the 4 train prompts" in lines[0] and "2 of the 2 eval prompts" in lines[0]
    assert f"mixgrpo preprocess --model flux --path {base['flux']} --prompts {tmp_path / 'more.txt'}" in lines[0]
    assert not (tmp_path / "run").exists()  # stopped before anything was written or loaded
    # the fix it names: one cache for both prompt files (preprocess takes several)
    assert _cli("preprocess", "--model", "flux", "--path", base["flux"], "--prompts", tmp_path / "more.txt",
                base["root"] / "eval.txt", "--out", cache, "--dtype", "float32", "--max-sequence-length", MAX_SEQ,
                "--device", "cpu") == 0
    from mixgrpo.preflight import problems_of
    from mixgrpo.config import build_config

    assert problems_of(build_config(data)) == []
    data["model"]["args"]["max_sequence_length"] = 512  # the model would read 24-token embeddings as 512
    assert any("holds 24 text tokens per prompt" in p for p in problems_of(build_config(data)))


def test_a_tiny_lora_run_is_sampled_from_its_run_directory(tmp_path):
    """Issue 19 item 8: a LoRA run on the tiny model exported a final/ that `mixgrpo sample --path RUN` could not
    load (the final LoRA needs the run's base)."""
    over = ["run.iterations=1", "rollout.prompts_per_iteration=1", "rollout.group_size=2", "update.steps_per_epoch=1", "lora.rank=4",
            "eval.num_prompts=0", "sampler.num_steps=4", "sampler.window.size=1",
            "rewards=[{name: jpeg_compressibility}]"]  # every image its own score: a learning signal
    assert _cli("train", "--out", tmp_path / "run", "--quiet", *over) == 0
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert _cli("sample", "--path", tmp_path / "run", "--prompt", "a red circle", "--out", tmp_path / "s") == 0
    assert Image.open(tmp_path / "s" / "0000_00.png").size == (32, 32)
