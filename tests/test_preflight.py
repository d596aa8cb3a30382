"""Pre-flight: what a run needs is checked before any model loads, one line per problem naming the fix."""

import pytest
import torch
from gaussian_run import merged

from mixgrpo.config import build_config
from mixgrpo.preflight import PreflightError, check_run, problems_of


def _cfg(**over):
    data = merged({"model": {"name": "gaussian", "args": {"size": 4}}, "rewards": [{"name": "jpeg_compressibility"}],
                   "eval": {"num_prompts": 2}}, over)
    return build_config(data)


def test_a_clean_config_has_no_problems():
    assert problems_of(_cfg()) == []
    assert problems_of(build_config({})) == []  # the main job: the tiny model, the world's prompts, the verifier


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_names_the_fix():
    problems = problems_of(_cfg(model={"name": "gaussian", "args": {"size": 4, "device": "cuda"}},
                                rewards=[{"name": "hps", "args": {"path": "x", "tokenizer": "y", "device": "cuda:0"}}]))
    assert any("model.args.device = 'cuda'" in p and "model.args.device=cpu" in p for p in problems)
    assert any("rewards[0].args.device = 'cuda:0'" in p for p in problems)


def test_every_problem_is_reported_at_once_one_line_each(tmp_path):
    cfg = _cfg(rewards=[{"name": "jpeg"}, {"name": "hps", "args": {"path": str(tmp_path / "no.pt"),
                                                                    "tokenizer": str(tmp_path)}}],
               model={"name": "gaussian", "args": {"size": 4, "colour": "red"}},
               eval={"prompts": str(tmp_path / "missing.txt")})
    with pytest.raises(PreflightError) as e:
        check_run(cfg)
    lines = str(e.value).splitlines()
    assert len(lines) == 4
    assert "did you mean 'jpeg_compressibility'" in lines[0].lower()  # the registry's name, as the docs now use
    assert "no.pt" in lines[1] and "does not exist" in lines[1]
    assert lines[2].startswith("eval.prompts:") and "does not exist" in lines[2]
    assert "model.args do not fit model 'gaussian'" in lines[3] and "colour" in lines[3]


def test_tiny_prompts_longer_than_its_text_encoder_are_refused(tmp_path):
    long = "a red circle left of a blue square above a green triangle below two yellow squares"
    (tmp_path / "p.txt").write_text(f"a red circle\n{long}\n")
    problems = problems_of(build_config({"rollout": {"prompts": str(tmp_path / "p.txt")}, "eval": {"num_prompts": 0}}))
    assert len(problems) == 1 and "1 of the 2 train prompts" in problems[0] and "16 text tokens" in problems[0]


def test_the_cli_prints_each_problem_as_an_error_line(tmp_path, capsys):
    from mixgrpo import cli

    code = cli.main(["train", "--out", str(tmp_path / "run"), "--quiet", "rewards=[{name: jpeg}, {name: verifer}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2 and all(line.startswith("error: rewards[") for line in err)
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore:prompt .* was truncated")  # the tiny byte tokenizers make long prompts
@pytest.mark.parametrize("name", ["qwen_image", "flux2", "wan"])
def test_the_new_models_runs_are_checked_before_any_model_loads(name, tmp_path):
    """A pipeline directory without its text encoder and no cache, a cache lacking prompts, a cache of another
    model (widths) and of another text length: each one line naming the fix, from the files alone."""
    import shutil

    import tiny_pipelines
    from mixgrpo import cli

    save = {"qwen_image": tiny_pipelines.save_tiny_qwen_image, "flux2": tiny_pipelines.save_tiny_flux2,
            "wan": tiny_pipelines.save_tiny_wan}[name]
    path = save(tmp_path / "pipe")
    (tmp_path / "train.txt").write_text("a red cube\na cat\n")
    args = {"path": str(path), "dtype": "float32", "height": 64, "width": 64, "max_sequence_length": 24}
    cfg = lambda **a: _cfg(model={"name": name, "args": {**args, **a}},  # noqa: E731
                           rollout={"prompts": str(tmp_path / "train.txt")}, eval={"num_prompts": 0})
    assert problems_of(cfg()) == []
    (tmp_path / "one.txt").write_text("a red cube\n")
    assert cli.main(["preprocess", "--model", name, "--path", str(path), "--prompts", str(tmp_path / "one.txt"),
                     "--out", str(tmp_path / "cache"), "--dtype", "float32", "--device", "cpu",
                     "--max-sequence-length", "24"]) == 0
    (problem,) = problems_of(cfg(embedding_cache=str(tmp_path / "cache")))
    assert "lacks 1 of the 2 train prompts" in problem and f"mixgrpo preprocess --model {name}" in problem
    (tmp_path / "one.txt").write_text("a red cube\na cat\n")
    assert cli.main(["preprocess", "--model", name, "--path", str(path), "--prompts", str(tmp_path / "one.txt"),
                     "--out", str(tmp_path / "cache"), "--dtype", "float32", "--device", "cpu",
                     "--max-sequence-length", "24"]) == 0
    assert problems_of(cfg(embedding_cache=str(tmp_path / "cache"))) == []
    (problem,) = problems_of(cfg(embedding_cache=str(tmp_path / "cache"), max_sequence_length=32))
    assert "holds 24 text tokens per prompt" in problem
    shutil.rmtree(path / "text_encoder")
    (problem,) = problems_of(cfg())
    assert "lacks the component folders ['text_encoder']" in problem


def test_a_window_that_leaves_the_trained_wan_expert_stops_the_run_before_it_starts(tmp_path):
    """Wan 2.2 A14B trains one expert: a GRPO run whose window would walk past the boundary (sigma 0.875) later
    in training is refused from the files alone, naming the first iteration; a frozen window is not."""
    from tiny_pipelines import save_tiny_wan

    path = save_tiny_wan(tmp_path / "a14b", variant="2.2-a14b")
    (tmp_path / "train.txt").write_text("a red cube\n")
    args = {"path": str(path), "dtype": "float32", "height": 64, "width": 64, "num_frames": 5,
            "max_sequence_length": 24}

    def cfg(iterations, window=None, expert="high_noise", **over):  # 20 steps at shift 3: 0-6 have sigma >= 0.875
        return _cfg(**merged({"model": {"name": "wan", "args": {**args, "trained_expert": expert}},
                              "run": {"iterations": iterations}, "rollout": {"prompts": str(tmp_path / "train.txt")},
                              "eval": {"num_prompts": 0},
                              "sampler": {"num_steps": 20, "window": window or {"size": 4, "tau": 2}}}, over))

    assert problems_of(cfg(8)) == []  # windows 0-3 .. 3-6
    (problem,) = problems_of(cfg(10))
    assert problem.startswith("wan: iteration 8 trains sigma 0.848, which Wan 2.2's frozen low_noise expert")
    assert "sampler.window.strategy=frozen" in problem
    assert problems_of(cfg(100, {"size": 4, "strategy": "frozen"})) == []
    (problem,) = problems_of(cfg(1, expert="low_noise"))
    assert problem.startswith("wan: iteration 0 trains sigma 1.000, which Wan 2.2's frozen high_noise expert")
    assert problems_of(cfg(1, objective="diffusion_nft", algorithm="ode", rollout={"shared_noise": False})) == []  # drawn later
    args["path"] = str(save_tiny_wan(tmp_path / "wan21", variant="2.1"))
    assert problems_of(cfg(10)) == []  # one transformer: any sigma


def _without(monkeypatch, *modules):
    """Make `modules` look uninstalled to the pre-flight."""
    from mixgrpo import packages

    real = packages.importable
    monkeypatch.setattr(packages, "importable", lambda m: m not in modules and real(m))


def test_missing_packages_are_named_with_their_pip_command_before_any_model_loads(monkeypatch, tmp_path, capsys):
    """A LoRA recipe without peft, with tensorboard asked for and absent: one line naming both, what needs them
    and the pip command, from `mixgrpo train`, before the model (or anything else) is touched."""
    import re

    from mixgrpo import cli
    from mixgrpo.models import base

    _without(monkeypatch, "peft", "tensorboard")
    monkeypatch.setattr(base, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["train", "--config", "sd35_mixgrpo", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "peft (LoRA (lora.rank = 32))" in err[0] and "tensorboard (run.tensorboard: true" in err[0]
    assert re.search(r": pip install 'peft[>=<~!.0-9]*' 'tensorboard[>=<~!.0-9]*'$", err[0]), err[0]
    assert not (tmp_path / "run").exists()
    # run.tensorboard=false goes without it; full fine-tuning (rank 0) needs no peft
    assert problems_of(_cfg(run={"tensorboard": False})) == []
    assert not any("peft" in p for p in problems_of(_cfg(run={"tensorboard": False}, lora={"rank": 0})))


def test_a_reward_model_and_wandb_name_their_packages(monkeypatch):
    from mixgrpo.preflight import package_problems

    _without(monkeypatch, "transformers", "wandb")
    cfg = _cfg(rewards=[{"name": "pickscore", "args": {"path": "x"}}], run={"wandb_project": "p"})
    (line,) = package_problems(cfg)
    assert "transformers (reward 'pickscore')" in line and "wandb (run.wandb_project = 'p')" in line
    assert package_problems(_cfg()) == []  # the gaussian model and the jpeg reward import nothing more


def test_sampling_a_lora_run_without_peft_stops_before_its_model_loads(monkeypatch, tmp_path):
    from mixgrpo.config import ConfigError, save_config
    from mixgrpo.export import load_run
    from mixgrpo.models import base

    (tmp_path / "run").mkdir()
    save_config(_cfg(lora={"rank": 4}), tmp_path / "run" / "config.yaml")
    _without(monkeypatch, "peft")
    monkeypatch.setattr(base, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"peft \(LoRA .*pip install 'peft"):
        load_run(tmp_path / "run")


def test_a_missing_tesseract_is_found_by_the_pre_flight():
    cfg = _cfg(rewards=[{"name": "ocr", "args": {"binary": "tesseract-that-is-not-installed"}}])
    (line,) = problems_of(cfg)
    assert line.startswith("rewards[0]: ocr:") and "apt-get install -y tesseract-ocr" in line


def _printed_commands(line: str) -> list[str]:
    """The commands an error line tells the user to run: `backticked` spans and a trailing pip install."""
    import re

    return re.findall(r"`([^`]+)`", line) + re.findall(r"(pip install (?:'[^']+' ?)+)$", line)


def _run_printed(command: str) -> None:
    """Run a printed command as a user would paste it: `mixgrpo ...` through the CLI's main (no subprocess: the
    tiny stand-ins load in-process), `pip install` offline (--no-index: it must resolve to what is installed)."""
    import shlex
    import subprocess
    import sys

    argv = shlex.split(command)
    if argv[0] == "mixgrpo":
        from mixgrpo import cli

        assert cli.main(argv[1:]) == 0, command
    else:
        assert argv[:2] == ["pip", "install"], command
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *argv[2:]],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "already satisfied" in result.stdout, (command, result.stderr)


@pytest.mark.filterwarnings("ignore:prompt .* was truncated")
def test_every_printed_fix_command_runs_as_printed_and_fixes_the_problem(tmp_path, monkeypatch):
    """A missing embedding cache, one of another text length, and missing packages: each error prints a command
    that, pasted as printed, fixes it (after which the pre-flight is clean)."""
    import tiny_pipelines

    path = tiny_pipelines.save_tiny_flux(tmp_path / "my flux")  # a space: the command must quote it
    (tmp_path / "train.txt").write_text("a red cube\na cat\n")
    (tmp_path / "eval.txt").write_text("a green cone\n")
    model = {"name": "flux", "args": {"path": str(path), "dtype": "float32", "height": 64, "width": 64,
                                      "max_sequence_length": 24, "embedding_cache": str(tmp_path / "cache")}}
    cfg = lambda **a: _cfg(model={**model, "args": {**model["args"], **a}},  # noqa: E731
                           rollout={"prompts": str(tmp_path / "train.txt")}, eval={"prompts": str(tmp_path / "eval.txt")})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # preprocess's default device
    (problem,) = problems_of(cfg())  # no cache yet
    assert "no index.json" in problem
    (command,) = _printed_commands(problem)
    assert "--model flux" in command and "--path" in command
    _run_printed(command)
    assert problems_of(cfg()) == []
    (problem,) = problems_of(cfg(max_sequence_length=32))  # the cache holds 24 tokens per prompt
    (command,) = _printed_commands(problem)
    _run_printed(command)
    assert problems_of(cfg(max_sequence_length=32)) == []
    # packages: the pip command resolves against what is installed here
    _without(monkeypatch, "peft", "tensorboard", "transformers")
    (problem,) = problems_of(_cfg(lora={"rank": 2}, rewards=[{"name": "pickscore", "args": {"path": "x"}}]))
    (command,) = _printed_commands(problem)
    monkeypatch.undo()
    _run_printed(command)


@pytest.mark.parametrize("name", ["flux", "sd3", "qwen_image", "flux2", "wan"])
def test_a_size_the_model_cannot_take_is_refused_before_it_loads(name, tmp_path, monkeypatch):
    """height / width off the VAE factor x patch grid, and Wan's num_frames off 1 + 4k: one line each from the
    config files, naming sizes that fit; the sizes it names pass, and the loader takes them."""
    import re

    import tiny_pipelines
    from mixgrpo.models import MODELS, base

    save = {"flux": tiny_pipelines.save_tiny_flux, "sd3": tiny_pipelines.save_tiny_sd3,
            "qwen_image": tiny_pipelines.save_tiny_qwen_image, "flux2": tiny_pipelines.save_tiny_flux2,
            "wan": tiny_pipelines.save_tiny_wan}[name]
    path = save(tmp_path / "pipe")
    (tmp_path / "p.txt").write_text("a red cube\n")
    video = {"num_frames": 6} if name == "wan" else {}
    cfg = lambda **a: _cfg(model={"name": name, "args": {"path": str(path), "dtype": "float32",  # noqa: E731
                                                         "max_sequence_length": 24, **a}},
                           rollout={"prompts": str(tmp_path / "p.txt")}, eval={"num_prompts": 0})
    monkeypatch.setattr(base, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    problems = problems_of(cfg(height=66, width=64, **video))
    assert "height 66 and width 64 must be multiples of" in problems[0] and "VAE factor" in problems[0]
    height, width = map(int, re.search(r"use e.g. height=(\d+) width=(\d+)$", problems[0]).groups())
    fixed = {"height": height, "width": width}
    if name == "wan":
        assert len(problems) == 2 and "num_frames = 6 must be 1 + 4 k" in problems[1] and "num_frames=5" in problems[1]
        fixed["num_frames"] = 5
    else:
        assert len(problems) == 1
    monkeypatch.undo()
    assert problems_of(cfg(**fixed)) == []
    load = lambda **a: MODELS.get(name)(path=str(path), dtype="float32", max_sequence_length=24, **a)  # noqa: E731
    load(**fixed)  # the loader agrees on both sides
    with pytest.raises(ValueError, match="must be multiples of"):
        load(**{**fixed, "height": 66})


def test_a_user_module_in_the_working_directory_names_the_pythonpath_fix(tmp_path, monkeypatch):
    """The `mixgrpo` command does not search the working directory (python -m does): the pre-flight says so."""
    import sys

    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    (line,) = problems_of(_cfg(rewards=[{"name": "mypkg.rewards:redness"}]))
    assert "mypkg is in the working directory" in line and "PYTHONPATH=." in line
    monkeypatch.chdir(tmp_path.parent)
    (line,) = problems_of(_cfg(rewards=[{"name": "mypkg.rewards:redness"}]))
    assert "PYTHONPATH=DIR" in line and "pip install" in line
