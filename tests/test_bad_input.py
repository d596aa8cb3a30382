"""The bad-input catalogue: every case goes through the real CLI (`mixgrpo.cli.main`, a few as subprocesses) and
must end with exit status 2 and one line on stderr, `error: ...`, that names the problem and the fix; no
traceback unless `--debug`. docs/reliability.md lists the same cases."""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixgrpo.cli import main
from mixgrpo.config import load_config
from mixgrpo.rundir import RunLock
from mixgrpo.train import train

from gaussian_run import gaussian_run_yaml

ROOT = Path(__file__).resolve().parent.parent

BASE_YAML = gaussian_run_yaml(run={"iterations": 2, "checkpoint_every": 1}, loss={"clip_range": 0.2}, eval={"num_prompts": 0})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Input files of the catalogue, and a finished 2-iteration run (plus a corrupted copy of it)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "base.yaml").write_text(BASE_YAML)
    (d / "bad.yaml").write_text("sampler: {num_steps: 8\nlr: 0.1\n")
    (d / "list.yaml").write_text("- iterations: 3\n")
    (d / "latin1.yaml").write_bytes("# caf\xe9\niterations: 3\n".encode("latin-1"))
    (d / "empty.txt").write_text("\n  \n")
    (d / "latin1.txt").write_bytes("a red circle\ncaf\xe9\n".encode("latin-1"))
    (d / "hexagon.txt").write_text("a purple hexagon\n")
    (d / "sign.txt").write_text('a sign that says "hello"\n')
    (d / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{prompt: oops}\n')
    (d / "bad.csv").write_text("text\na red circle\n")
    (d / "a_file").write_text("not a directory\n")
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(d / "input.png")  # an editing example's input image
    Image.new("RGB", (64, 32), (255, 0, 0)).save(d / "wide.png")
    (d / "mixed.jsonl").write_text('{"prompt": "make the red square blue", "images": ["input.png"]}\n'
                                   '{"prompt": "a red circle"}\n')
    cfg = load_config(d / "base.yaml", [f"run.out_dir={d / 'run'}"])
    train(cfg, progress=False)
    shutil.copytree(d / "run", d / "corrupt")
    shutil.copytree(d / "run" / "final", d / "size4")  # a model directory outside its run: nothing says its size
    for f in (d / "corrupt" / "checkpoints" / "iter_000002" / "model.safetensors",
              d / "corrupt" / "final" / "model.safetensors"):
        f.write_bytes(f.read_bytes()[:40])  # truncated: what a full disk or a killed copy leaves
    shutil.copytree(d / "run", d / "finished", ignore=shutil.ignore_patterns("checkpoints"))  # cleaned up
    (d / "nomodel").mkdir()  # a run that has not reached its first checkpoint
    shutil.copy(d / "run" / "config.yaml", d / "nomodel" / "config.yaml")
    shutil.copytree(d / "run", d / "diverged", ignore=shutil.ignore_patterns("final", "iter_000001"))
    ckpt = d / "diverged" / "checkpoints" / "iter_000002" / "model.safetensors"
    # weights that overflowed (the analytic model stays finite for any finite mean; the tiny transformer with weights
    # of 1e10, the repro, gives NaN)
    save_file({k: torch.full_like(v, float("inf")) for k, v in load_file(ckpt).items()}, ckpt)
    shutil.copytree(d / "run", d / "incomplete")
    (d / "incomplete" / "checkpoints" / "iter_000002" / "COMPLETE").unlink()  # a save cut short by kill -9
    shutil.copytree(d / "run", d / "finished_incomplete")  # a finished run whose only checkpoints are incomplete
    shutil.rmtree(d / "finished_incomplete" / "checkpoints" / "iter_000001")
    (d / "finished_incomplete" / "checkpoints" / "iter_000002" / "COMPLETE").unlink()
    busy = RunLock(d / "busy")  # a run directory in use by a live run (this process)
    (d / "busy").mkdir()
    busy.acquire()
    yield d
    busy.release()


@dataclass
class Case:
    name: str
    argv: list[str]  # {d} = the input directory, {out} = a fresh output path
    expect: list[str]  # substrings of the message (case-insensitive): the problem and the fix


def train_args(*overrides: str) -> list[str]:
    return ["train", "--config", "{d}/base.yaml", "--out", "{out}", "--quiet", *overrides]


def sample_args(*extra: str) -> list[str]:
    return ["sample", "--model", "gaussian", "--prompt", "a red circle", "--steps", "4", "--out", "{out}", *extra]


CASES = [
    # configuration files and overrides
    Case("malformed YAML", ["train", "--config", "{d}/bad.yaml"], ["not valid YAML", "line 2"]),
    Case("missing config file", ["train", "--config", "{d}/nope.yaml"], ["does not exist", "check the path"]),
    Case("config is not a mapping", ["train", "--config", "{d}/list.yaml"], ["must hold a mapping", "got list"]),
    Case("non-UTF-8 config", ["train", "--config", "{d}/latin1.yaml"], ["not UTF-8", "save it as UTF-8"]),
    Case("unknown config key", train_args("iteratons=3"),
         ["unknown config key 'iteratons'", "did you mean 'run.iterations'"]),
    Case("unknown nested key", train_args("sampler.windw.size=3"), ["'sampler.windw'", "did you mean 'window'"]),
    Case("wrong type (int)", train_args("run.iterations=abc"), ["iterations must be an integer", "'abc'"]),
    Case("wrong type (bool)", train_args("rollout.shared_noise=maybe"), ["shared_noise must be true or false"]),
    Case("wrong type (section)", train_args("rewards=verifier"), ["rewards must be a list"]),
    Case("tuple of wrong length", train_args("optim.betas=[0.9]"), ["betas must be a list of 2 values"]),
    Case("bad override syntax", train_args("iterations"), ["'iterations' is not of the form key.sub=value"]),
    Case("override into a value", train_args("optim.lr.x=3"), ["'lr' is not a section"]),
    # values out of range
    Case("window larger than the steps", train_args("sampler.window.size=20"),
         ["window.size = 20 exceeds the 8 steps", "lower window.size or raise num_steps"]),
    Case("group size below 2", train_args("rollout.group_size=1", "update.steps_per_epoch=1"),
         ["rollout.group_size = 1 is invalid", "integer >= 2"]),
    Case("group not divisible by updates", train_args("update.steps_per_epoch=3"),
         ["not a multiple of update.steps_per_epoch", "choose update.steps_per_epoch among [1, 2, 4]"]),
    Case("negative lr", train_args("optim.lr=-1"), ["optim.lr = -1.0 is invalid", "positive finite number"]),
    Case("infinite lr", train_args("optim.lr=.inf", "update.steps_per_epoch=1"), ["lr must be a finite number", "got inf"]),
    Case("betas out of range", train_args("optim.betas=[1.5, 0.999]"), ["optim.betas = (1.5, 0.999) is invalid", "[0, 1)"]),
    Case("negative weight_decay", train_args("optim.weight_decay=-1"), ["optim.weight_decay = -1.0 is invalid", ">= 0"]),
    Case("negative eval_num_prompts", train_args("eval.num_prompts=-1"),
         ["eval.num_prompts = -1 is invalid", "0 = no evaluation"]),
    Case("zero eval images per prompt", train_args("eval.images_per_prompt=0"),
         ["eval.images_per_prompt = 0 is invalid", "integer >= 1"]),
    Case("NaN reward weight", train_args("rewards=[{name: 'toy_rewards:brightness', weight: .nan}]"),
         ["rewards[0].weight must be a finite number", "got nan"]),
    Case("infinite reward weight", train_args("rewards=[{name: 'toy_rewards:brightness', weight: .inf}]"),
         ["rewards[0].weight must be a finite number", "got inf"]),
    Case("negative advantage_clip", train_args("advantage.clip=-1"),
         ["advantage.clip = -1.0 is invalid", "positive finite number"]),
    Case("zero advantage_clip", train_args("advantage.clip=0"), ["advantage.clip = 0.0 is invalid"]),
    Case("eval guidance below 1", train_args("eval.guidance_scale=0.5"),
         ["eval.guidance_scale = 0.5 is invalid", "-1 (the same as rollout.guidance_scale)", ">= 1"]),
    Case("infinite sigma_std", train_args("objective=diffusion_nft", "matching.sigma_std=.inf"),
         ["matching.sigma_std must be a finite number", "got inf"]),
    Case("infinite NFT beta", train_args("objective=diffusion_nft", "matching.beta=.inf"),
         ["matching.beta must be a finite number", "got inf"]),
    Case("negative reward retries", train_args("scoring.retries=-1"),
         ["scoring.retries = -1 is invalid", "integer >= 0"]),
    Case("negative max_failed_groups", train_args("scoring.max_failed_groups=-1"),
         ["scoring.max_failed_groups = -1.0 is invalid", "fraction in [0, 1]"]),
    Case("frames on a whole-video reward", train_args("rewards=[{name: temporal_consistency, frames: min}]"),
         ["frames = 'min' does not apply to reward 'temporal_consistency'", "drop frames"]),
    Case("empty --out", ["train", "--config", "{d}/base.yaml", "--out", "", "--resume"],
         ["--out is empty", "unset shell variable"]),
    Case("zero steps", train_args("sampler.num_steps=0"), ["num_steps = 0", "at least one step"]),
    Case("unknown precision", train_args("run.precision=fp16"), ["run.precision = 'fp16' is invalid", "'auto', 'fp32' or 'bf16'"]),
    Case("every reward weight 0", train_args("rewards=[{name: 'toy_rewards:brightness', weight: 0}]"),
         ["every reward has weight 0", "non-zero weight"]),
    # names
    Case("unknown algorithm", train_args("algorithm=mixgrp"),
         ["algorithm 'mixgrp' is unknown", "did you mean 'mixgrpo'"]),
    Case("unknown reward name", train_args("rewards=[{name: verifer}]"),
         ["unknown reward 'verifer'", "did you mean 'verifier'"]),
    Case("unknown model name", train_args("model.name=gausian"),
         ["unknown base model 'gausian'", "did you mean 'gaussian'"]),
    Case("model args that do not fit", train_args("model.args={sizee: 3}"), ["model.args do not fit", "'sizee'"]),
    Case("reward args that do not fit", train_args("rewards=[{name: verifier, args: {scor: strict}}]"),
         ["arguments {'scor': 'strict'} do not fit", "unexpected keyword argument 'scor'"]),
    Case("user reward module missing", train_args("rewards=[{name: 'nomod:score'}]"),
         ["cannot import module 'nomod'", "PYTHONPATH"]),
    Case("user reward function missing", train_args("rewards=[{name: 'toy_rewards:nope'}]"),
         ["module 'toy_rewards' has no attribute 'nope'"]),
    Case("user reward is not a function", train_args("rewards=[{name: 'toy_rewards:NOT_A_FUNCTION'}]"),
         ["'toy_rewards:NOT_A_FUNCTION' is int 3, not a function", "f(images, prompts, **args)"]),
    Case("user reward args that do not fit",
         train_args("rewards=[{name: 'toy_rewards:brightness', args: {targte: 1}}]"),
         ["arguments {'targte': 1} do not fit brightness(images, prompts, target: float = 1.0)", "'targte'"]),
    Case("user reward returns text", train_args("rewards=[{name: 'toy_rewards:strings'}]"),
         ["'toy_rewards:strings' returned list of str", "one float score per image"]),
    Case("LoRA on a model without adapters", train_args("lora.rank=4"), ["does not support LoRA", "use lora.rank=0"]),
    Case("missing distillation teacher", train_args("objective=opd", "distill.teachers=[{path: '{d}/no_teacher'}]"),
         ["distill.teachers[0].path", "does not exist", "a run directory"]),
    # prompt files
    Case("empty prompt file", train_args("rollout.prompts={d}/empty.txt"), ["holds no prompts", "add at least one"]),
    Case("non-UTF-8 prompt file", train_args("rollout.prompts={d}/latin1.txt"), ["is not UTF-8", "re-save it as UTF-8"]),
    Case("missing prompt file", train_args("rollout.prompts={d}/nope.txt"), ["does not exist", "world:train"]),
    Case("malformed JSONL prompt file", train_args("rollout.prompts={d}/bad.jsonl"),
         ["bad.jsonl:2", "one JSON object per line"]),
    Case("CSV without a prompt column", train_args("rollout.prompts={d}/bad.csv"), ["no 'prompt' column", "['text']"]),
    Case("unknown world split", train_args("rollout.prompts=world:test"),
         ["unknown split 'test'", "'train' or 'heldout'"]),
    Case("prompt the verifier cannot parse", train_args("rollout.prompts={d}/hexagon.txt", "rewards=[{name: verifier}]"),
         ["cannot parse prompt 'a purple hexagon'", "use another reward for free text"]),
    # reward back-ends
    Case("missing OCR binary", train_args("rollout.prompts={d}/sign.txt", "scoring.retries=0",
                                          "rewards=[{name: ocr, args: {binary: /nonexistent}}]"),
         ["rewards[0]: ocr:", "'/nonexistent' is not on PATH", "apt-get install -y tesseract-ocr"]),  # pre-flight
    Case("unreachable VLM endpoint",
         train_args("scoring.retries=0",
                    "rewards=[{name: vlm, args: {base_url: 'http://127.0.0.1:1', model: judge, retries: 0}}]"),
         ["groups failed to get rewards", "cannot reach http://127.0.0.1:1", "check base_url"]),
    # run directories and checkpoints
    Case("out_dir is a file", ["train", "--config", "{d}/base.yaml", "--out", "{d}/a_file"],
         ["out_dir", "is a file", "choose another out_dir"]),
    Case("out_dir under a file", ["train", "--config", "{d}/base.yaml", "--out", "{d}/a_file/run"],
         ["not a directory", "a_file/run", "choose another path"]),
    Case("existing run without --resume", ["train", "--config", "{d}/base.yaml", "--out", "{d}/run"],
         ["already holds checkpoints", "pass --resume"]),
    Case("finished run with only incomplete checkpoints",
         ["train", "--config", "{d}/base.yaml", "--out", "{d}/finished_incomplete"],
         ["finished run whose checkpoints are all incomplete (iter_000002", "choose another out_dir"]),
    Case("finished run whose checkpoints were deleted", ["train", "--config", "{d}/base.yaml", "--out", "{d}/finished"],
         ["holds a finished run whose checkpoints were deleted", "final/", "metrics.jsonl (2 records)",
          "choose another out_dir"]),
    Case("the same with --resume", ["train", "--config", "{d}/base.yaml", "--out", "{d}/finished", "--resume"],
         ["holds a finished run whose checkpoints were deleted", "choose another out_dir"]),
    Case("run directory in use", ["train", "--config", "{d}/base.yaml", "--out", "{d}/busy"],
         [f"in use by pid {os.getpid()} on host", "wait for that run to end", "choose another out_dir"]),
    Case("corrupted checkpoint",
         ["train", "--config", "{d}/base.yaml", "--out", "{d}/corrupt", "--resume", "run.iterations=3"],
         ["iter_000002 is corrupted", "delete it"]),
    Case("checkpoint from another model config",
         ["train", "--config", "{d}/base.yaml", "--out", "{d}/run", "--resume", "model.args.size=8"],
         ["different configuration", "model.args.size: 4 -> 8", "resume with the run's own config"]),
    # sample / eval
    Case("missing model path", sample_args("--path", "{d}/nope"), ["does not exist", "give a model directory"]),
    Case("corrupted model file", sample_args("--path", "{d}/corrupt/final"), ["cannot load model", "corrupted"]),
    Case("model file of another size", sample_args("--path", "{d}/size4"),
         ["cannot load model", "size of tensor", "another model or size"]),
    Case("unknown sampling plan", sample_args("--plan", "mixgrp"), ["--plan 'mixgrp' is unknown", "use 'ode'"]),
    Case("--p-mix above 1", sample_args("--p-mix", "1.5", "--base-path", "base"),
         ["--p-mix = 1.5 is invalid", "fraction in [0, 1]"]),
    Case("--p-mix below 0", sample_args("--p-mix", "-0.5"), ["--p-mix = -0.5 is invalid", "fraction in [0, 1]"]),
    Case("negative guidance", sample_args("--guidance", "-1"), ["--guidance = -1.0 is invalid", ">= 1"]),
    Case("zero images per prompt", sample_args("--num-images", "0"), ["--num-images = 0 is invalid", ">= 1"]),
    Case("empty --path", sample_args("--path", ""), ["--path is empty", "unset shell variable"]),
    Case("no prompts", ["sample", "--model", "gaussian", "--out", "{out}"], ["no prompts", "--prompt TEXT"]),
    Case("sample output is a file", sample_args("--path", "{d}/run", "--out", "{d}/a_file"),
         ["--out", "a_file' is a file, not a directory", "choose another --out"]),
    Case("sample output under a file", sample_args("--path", "{d}/run", "--out", "{d}/a_file/samples"),
         ["a_file' is a file, not a directory", "choose another --out"]),
    Case("infinite guidance", sample_args("--guidance", "inf"), ["--guidance = inf is invalid", "finite number >= 1"]),
    Case("infinite shift", sample_args("--shift", "inf"), ["--shift = inf is invalid", "finite number > 0"]),
    Case("NaN shift", sample_args("--shift", "nan"), ["--shift = nan is invalid", "finite number > 0"]),
    Case("a billion steps", sample_args("--steps", "1000000000"), ["--steps = 1000000000 is invalid", "[1, 10000]"]),
    Case("a diverged checkpoint", sample_args("--path", "{d}/diverged"),
         ["came out NaN or inf", "nothing was written", "earlier checkpoint"]),
    Case("eval of a diverged checkpoint", ["eval", "--prompt", "a red circle", "tuned={d}/diverged", "--reward",
                                           "toy_rewards:brightness", "--out", "{out}"],
         ["tuned: sampling: 1 of the 1 images of a batch came out NaN or inf", "nothing was written"]),
    Case("CUDA on a CPU-only build", sample_args("--device", "cuda"),
         ["--device = 'cuda', but torch", "has no CUDA device", "cpu"]),
    Case("a GPU index that is not there", sample_args("--device", "cuda:5"), ["--device = 'cuda:5'"]),
    Case("a device typo", sample_args("--device", "cdua"), ["--device = 'cdua' is not a device", "cpu, cuda"]),
    Case("a dtype typo", sample_args("--dtype", "flaot16"), ["--dtype = 'flaot16' is invalid", "'float16'"]),
    Case("missing --base-path", sample_args("--path", "{d}/run", "--base-path", "{d}/nope"),
         ["--base-path", "nope' does not exist"]),
    Case("a run without a model yet", sample_args("--path", "{d}/nomodel"),
         ["has no final/ and no checkpoint", "wait for its first checkpoint"]),
    Case("eval --hybrid without a base entry", ["eval", "--model", "gaussian", "--prompt", "a red circle",
                                                "tuned={d}/run", "--hybrid", "{d}/run", "--out", "{out}"],
         ["--hybrid needs the base model among the models", "base=base"]),
    Case("eval entry without a model", ["eval", "--model", "gaussian", "--prompt", "a red circle", "base=base",
                                        "early={d}/nomodel", "--out", "{out}"],
         ["nomodel has no final/ and no checkpoint", "no fine-tuned model yet"]),
    Case("eval on a GPU of a CPU-only build", ["eval", "--model", "gaussian", "--prompt", "a red circle", "--device",
                                              "cuda:5", "base=base", "--out", "{out}"], ["--device = 'cuda:5'"]),
    # export
    Case("export of a checkpoint without COMPLETE", ["export", "--run", "{d}/incomplete", "--checkpoint",
                                                     "iter_000002", "--out", "{out}"],
         ["iter_000002 is not a complete checkpoint (no COMPLETE marker)", "export a complete one: iter_000001"]),
    Case("export of a killed save", ["export", "--run", "{d}/run", "--checkpoint", ".tmp-iter_000003-4242",
                                     "--out", "{out}"], ["is not a checkpoint name", "iter_000001, iter_000002"]),
    Case("export --checkpoint outside the run", ["export", "--run", "{d}/run", "--checkpoint", "../final",
                                                 "--out", "{out}"], ["'../final' is not a checkpoint name"]),
    Case("export of a run without a checkpoint", ["export", "--run", "{d}/nomodel", "--out", "{out}"],
         ["has no complete checkpoint to export"]),
    Case("export --out is a file", ["export", "--run", "{d}/run", "--out", "{d}/a_file"],
         ["a_file already exists", "--out DIR"]),
    Case("empty export --run", ["export", "--run", ""], ["--run is empty", "unset shell variable"]),
    # preprocess
    Case("preprocess batch of 0", ["preprocess", "--model", "tiny", "--prompts", "world:train", "--out", "{out}",
                                   "--batch-size", "0"], ["--batch-size = 0 is invalid", "integer >= 1"]),
    Case("preprocess on CUDA of a CPU-only build", ["preprocess", "--model", "tiny", "--prompts", "world:train",
                                                    "--out", "{out}", "--device", "cuda"], ["--device = 'cuda', but"]),
    Case("eval entry with an empty path", ["eval", "--model", "gaussian", "--prompt", "a red circle", "base=base",
                                           "tuned=", "--out", "{out}"],
         ["'tuned=' has an empty path", "unset shell variable", "LABEL=PATH"]),
    Case("eval label given twice", ["eval", "--model", "gaussian", "--prompt", "a red circle", "a=base",
                                    "a={d}/run", "--out", "{out}"], ["label 'a' is given twice", "its own label"]),
    Case("bad --reward spec", ["eval", "--model", "gaussian", "--prompt", "a red circle", "--reward", "verifier:score",
                               "base=base", "--out", "{out}"], ["'score' is not of the form key=value", "verifier:score=strict"]),
    # input images of editing models
    Case("edit example file mixing prompts without images", train_args("rollout.prompts={d}/mixed.jsonl"),
         ["mixes 1 prompts with input images and 1 without", "give every prompt its images"]),
    Case("input image missing", ["sample", "--model", "tiny_edit", "--prompt", "make the red square blue", "--image",
                                 "{d}/nope.png", "--out", "{out}"], ["--image", "nope.png' does not exist"]),
    Case("input image not an image", ["sample", "--model", "tiny_edit", "--prompt", "make the red square blue",
                                      "--image", "{d}/empty.txt", "--steps", "2", "--out", "{out}"],
         ["is not an image Pillow can read", "PNG, JPEG or WebP"]),
    Case("input image of another aspect ratio", ["sample", "--model", "tiny_edit", "--prompt",
                                                 "make the red square blue", "--image", "{d}/wide.png", "--steps", "2",
                                                 "--out", "{out}"], ["is 64x32 but the model takes 32x32", "crop or pad"]),
    Case("editing model given no image", ["sample", "--model", "tiny_edit", "--prompt", "make the red square blue",
                                          "--steps", "2", "--out", "{out}"], ["edits an input image", "--image PATH"]),
    Case("text-to-image model given an image", sample_args("--image", "{d}/input.png"),
         ["input images but this model is text-to-image", "drop --image"]),
]


def _fill(argv: list[str], d: Path, out: Path) -> list[str]:
    return [a.replace("{d}", str(d)).replace("{out}", str(out)) for a in argv]


MESSAGES: dict[str, str] = {}
"""The real message of each case, as docs/reliability.md shows it (paths, pid, host and time replaced)."""


def _run_case(case: Case, d: Path, out: Path, capsys) -> tuple[int, str]:
    rc = main(_fill(case.argv, d, out))
    err = capsys.readouterr().err.strip()
    shown = err.replace(str(out), "OUT").replace(str(d), "DIR").replace(f"pid {os.getpid()} ", "pid PID ")
    MESSAGES[case.name] = re.sub(r"on host \S+ \(started [^)]*\)", "on host HOST (started TIME)", shown)
    return rc, err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_naming_problem_and_fix(case, files, tmp_path, capsys):
    rc, err = _run_case(case, files, tmp_path / "out", capsys)
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for text in case.expect:
        assert text.lower() in err.lower(), f"{text!r} not in {err!r}"


def _command(case: Case) -> str:
    """The case's command line as the catalogue shows it (`train ...`: the test's base config and out_dir)."""
    argv = [a.replace("{d}", "DIR").replace("{out}", "OUT") for a in case.argv]
    for prefix, short in ((train_args(), ["train", "..."]), (sample_args(), ["sample", "..."])):
        if case.argv[:len(prefix)] == prefix:
            argv = short + argv[len(prefix):]
    return " ".join(a if a else '""' for a in argv)


def catalogue_rows() -> list[str]:
    return [f"| {c.name} | `{_command(c)}` | 2 | `` {MESSAGES[c.name]} `` |" for c in CASES]


CATALOGUE_HEADER = "| case | command | exit | message |"


def test_the_catalogue_in_the_docs_is_the_real_messages(files, tmp_path, capsys):
    """docs/reliability.md's bad-input table is generated from the cases above and their real messages:
    `MIXGRPO_WRITE_CATALOGUE=1 pytest tests/test_bad_input.py` rewrites it; otherwise it must match."""
    for i, case in enumerate(CASES):
        if case.name not in MESSAGES:  # this test run alone
            _run_case(case, files, tmp_path / f"out{i}", capsys)
    doc = ROOT / "docs" / "reliability.md"
    lines = doc.read_text(encoding="utf-8").splitlines()
    start = lines.index(CATALOGUE_HEADER) + 2
    end = next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))
    if os.environ.get("MIXGRPO_WRITE_CATALOGUE"):
        doc.write_text("\n".join(lines[:start] + catalogue_rows() + lines[end:]) + "\n", encoding="utf-8")
    assert lines[start:end] == catalogue_rows(), "regenerate: MIXGRPO_WRITE_CATALOGUE=1 pytest tests/test_bad_input.py"


def test_every_numeric_config_field_has_a_range_check():
    """One place checks every value of train's config (`TrainConfig.checks` and each section's `checks`; the
    sampler's in `SamplerConfig`): a numeric field added without a range would take any value."""
    import dataclasses
    import typing

    from mixgrpo.config import TrainConfig

    def numeric(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp) and f.name != "sampler":
                yield from numeric(tp, f"{prefix}{f.name}.")
            elif tp in (int, float) or typing.get_origin(tp) is tuple:
                yield prefix + f.name

    cfg = TrainConfig()
    sections = [cfg, *(getattr(cfg, f.name) for f in dataclasses.fields(cfg))]
    checked = {name for section in sections if hasattr(section, "checks") for _, name, _, _ in section.checks()}
    unchecked = sorted(set(numeric(TrainConfig)) - checked)
    assert unchecked == [], f"no range check for {unchecked}"


def test_catalogue_has_at_least_20_kinds():
    assert len({c.name for c in CASES}) == len(CASES) >= 20


def test_debug_shows_the_traceback(files):
    from mixgrpo.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'run.iterations'"):
        main(["--debug", *_fill(train_args("iteratons=3"), files, files / "unused")])


def test_unknown_subcommand_is_an_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_resume_without_checkpoints_starts_a_new_run_and_says_so(files, tmp_path, capsys):
    """The decision: `--resume` on an empty run directory is the first launch of a job that always passes
    --resume (a preemptible job's command line), so it starts fresh, with a notice."""
    out = tmp_path / "fresh"
    assert main(_fill(train_args("--resume"), files, out)) == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    assert (out / "checkpoints" / "iter_000002" / "COMPLETE").is_file()


@pytest.mark.parametrize("argv, expect", [
    (["train", "--config", "{d}/bad.yaml"], "is not valid YAML at line 2"),
    (["train", "--config", "{d}/base.yaml", "--out", "{d}/corrupt", "--resume", "run.iterations=3"], "is corrupted"),
], ids=["malformed YAML", "corrupted checkpoint"])
def test_bad_input_in_a_real_process(argv, expect, files, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mixgrpo", *_fill(argv, files, tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr


@pytest.mark.parametrize("argv, unknown", [
    (["train", "--resum"], "--resum"),  # once taken for --resume
    (["--deb", "train"], "--deb"),
    (["sample", "--num-im", "2"], "--num-im 2"),
    (["eval", "--rew", "verifier", "base=base"], "--rew"),
    (["pretrain", "--out", "{out}", "--ste", "1"], "--ste 1"),
    (["preprocess", "--model", "tiny", "--prompts", "world:train", "--out", "{out}", "--batch", "2"], "--batch 2"),
], ids=["train", "main", "sample", "eval", "pretrain", "preprocess"])
def test_options_are_never_abbreviated(argv, unknown, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_fill(argv, tmp_path, tmp_path / "out"))
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
