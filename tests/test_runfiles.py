"""Runs that move: a run's paths are stored absolute and its files compared by identity, so a run directory copied
elsewhere (and its base model, embedding cache and prompts moved) resumes bit-exactly, samples and evaluates once
told where its files are, and a run pointed at another model is refused (mixgrpo.runfiles)."""

import json
import shutil

import pytest
import torch
import yaml

from mixgrpo.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from mixgrpo.cli import main
from mixgrpo.config import ConfigError, apply_override, build_config
from mixgrpo.rundir import read_metrics
from mixgrpo.runfiles import identity, path_fields, without_paths
from mixgrpo.train import train

from gaussian_run import merged
from tiny_pipelines import save_tiny_flux

SIZE, MAX_SEQ = 32, 24
TRAIN = ["a red cube on a table", "two blue spheres", "a green cone", "a yellow torus"]
HELD_OUT = ["a purple pyramid", "an orange ring"]


def _machine(root, seed=0):
    """A 'machine': a working directory with a tiny FLUX pipeline, its prompt files and their embedding cache, all
    named by relative paths, as the recipes name them."""
    root.mkdir(parents=True)
    save_tiny_flux(root / "ckpt" / "flux", seed=seed)
    (root / "prompts").mkdir()
    (root / "prompts" / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "prompts" / "test.txt").write_text("\n".join(HELD_OUT) + "\n")
    return root


def _recipe(out: str) -> dict:
    return {"algorithm": "mixgrpo", "sampler": {"num_steps": 4, "window": {"size": 1}}, "model": {"name": "flux", "args": {"path": "ckpt/flux", "dtype": "float32", "height": SIZE, "width": SIZE,
                                           "max_sequence_length": MAX_SEQ, "embedding_cache": "cache/flux"}}, "rewards": [{"name": "toy_rewards:brightness"}], "rollout": {"prompts": "prompts/train.txt", "prompts_per_iteration": 2, "group_size": 2}, "eval": {"prompts": "prompts/test.txt", "num_prompts": 2}, "run": {"iterations": 3, "checkpoint_every": 1, "out_dir": out}, "update": {"steps_per_epoch": 1, "micro_batch_size": 4}, "optim": {"lr": 1.0e-2}, "loss": {"clip_range": 0.2}, "lora": {"rank": 2}}


def _preprocess(root):
    assert main(["preprocess", "--model", "flux", "--path", str(root / "ckpt" / "flux"), "--prompts",
                 str(root / "prompts" / "train.txt"), str(root / "prompts" / "test.txt"), "--out",
                 str(root / "cache" / "flux"), "--dtype", "float32", "--max-sequence-length", str(MAX_SEQ)]) == 0


@pytest.fixture(scope="module")
def machine_a(tmp_path_factory):
    root = _machine(tmp_path_factory.mktemp("a") / "machine")
    _preprocess(root)
    return root


def _weights(run):
    return load_checkpoint(latest_checkpoint(run))["model"]


def _no_timings(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in rows]


def test_a_moved_run_resumes_bit_exactly_samples_and_evaluates(machine_a, tmp_path, monkeypatch, capsys):
    # the reference: the same run, uninterrupted, where it started
    monkeypatch.chdir(machine_a)
    reference = train(build_config(_recipe(str(tmp_path / "reference"))), progress=False)
    # the run to move: interrupted after iteration 1, in a working directory whose relative paths name its files
    train(build_config(_recipe("runs/moving")), progress=False, stop_after=1)
    stored = yaml.safe_load((machine_a / "runs" / "moving" / "config.yaml").read_text())
    assert stored["model"]["args"]["path"] == str(machine_a / "ckpt" / "flux")  # absolute in config.yaml
    assert stored["rollout"]["prompts"] == str(machine_a / "prompts" / "train.txt")

    # the move: the run, the model, the cache and the prompts each to another place; nothing is left where it was
    elsewhere = tmp_path / "b"
    shutil.copytree(machine_a / "runs" / "moving", elsewhere / "runs" / "moved")
    shutil.copytree(machine_a / "ckpt" / "flux", elsewhere / "models" / "flux")
    shutil.copytree(machine_a / "cache" / "flux", elsewhere / "caches" / "flux-prompts")
    shutil.copytree(machine_a / "prompts", elsewhere / "data")
    (elsewhere / "models" / "flux" / "README.md").write_text("a model card the copy gained\n")
    gone = machine_a.parent / "unmounted"
    machine_a.rename(gone)
    try:
        monkeypatch.chdir(elsewhere)
        # a plain resume names every file it lacks and the command that tells it where they are
        assert main(["train", "--out", "runs/moved", "--resume"]) == 2
        err = capsys.readouterr().err
        for field in ("model.args.path", "model.args.embedding_cache", "rollout.prompts", "eval.prompts"):
            assert f"{field}=PATH" in err
        tell = ["model.args.path=models/flux", "model.args.embedding_cache=caches/flux-prompts",
                "rollout.prompts=data/train.txt", "eval.prompts=data/test.txt"]
        assert main(["train", "--out", "runs/moved", "--resume", "--quiet", *tell]) == 0
        moved = elsewhere / "runs" / "moved"
        for name, tensor in _weights(reference).items():
            assert torch.equal(_weights(moved)[name], tensor), name
        assert _no_timings(read_metrics(moved)) == _no_timings(read_metrics(reference))
        assert [json.loads(r) for r in (moved / "eval.jsonl").read_text().splitlines()] == \
            [json.loads(r) for r in (reference / "eval.jsonl").read_text().splitlines()]
        # config.yaml now names the files where they are: sample, eval and export need nothing more
        capsys.readouterr()
        assert main(["sample", "--path", "runs/moved", "--prompts", "data/test.txt", "--out", "samples"]) == 0
        assert len(list((elsewhere / "samples").glob("0*.png"))) == len(HELD_OUT)
        assert main(["export", "--run", "runs/moved", "--out", "exported"]) == 0
        # a copy of the run with the old config.yaml: sample and eval take the new places with --set
        shutil.copytree(machine_a.parent / "unmounted" / "runs" / "moving", elsewhere / "runs" / "copy")
        capsys.readouterr()
        assert main(["sample", "--path", "runs/copy", "--prompt", TRAIN[0], "--out", "s2"]) == 2
        assert "--set model.args.path=PATH" in capsys.readouterr().err
        assert main(["eval", "tuned=runs/copy", "base=base", "--prompts", "data/test.txt", "--reward",
                     "toy_rewards:brightness", "--set", "model.args.path=models/flux", "--out", "eval"]) == 0
        out = capsys.readouterr().out
        assert "embedding cache" in out and "loading the text encoders instead" in out  # the cache stayed behind
        assert (elsewhere / "eval" / "scores.jsonl").is_file()
    finally:
        gone.rename(machine_a)


def test_a_run_pointed_at_another_model_is_refused(machine_a, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(machine_a)
    run = train(build_config(_recipe(str(tmp_path / "run"))), progress=False, stop_after=1)
    other = save_tiny_flux(tmp_path / "other-flux", seed=1)  # same architecture and file names, other weights
    with pytest.raises(CheckpointError, match="other files") as e:
        train(build_config({**_recipe(str(run)), "model": {**_recipe("")["model"], "args": {
            **_recipe("")["model"]["args"], "path": str(other)}}}), resume=True, progress=False)
    assert "model.args.path" in str(e.value) and "embedding_cache" not in str(e.value)
    assert main(["sample", "--path", str(run), "--prompt", TRAIN[0], "--set", f"model.args.path={other}",
                 "--out", str(tmp_path / "s")]) == 2
    assert "trained with other files" in capsys.readouterr().err
    # other prompts are another run too
    edited = tmp_path / "train.txt"
    edited.write_text("\n".join(TRAIN[::-1]) + "\n")
    with pytest.raises(CheckpointError, match="rollout.prompts"):
        train(build_config(merged(_recipe(str(run)), {"rollout": {"prompts": str(edited)}})), resume=True,
              progress=False)


def test_a_checkpoint_from_before_file_identities_still_resumes(tmp_path, capsys):
    """Checkpoints of older versions record the literal paths among the config values and no identities."""
    from gaussian_run import gaussian_run

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    cfg = build_config(gaussian_run(run={"iterations": 3, "out_dir": str(tmp_path / "run")}, rollout={"prompts": str(prompts)}, eval={"num_prompts": 0}))
    run = train(cfg, progress=False, stop_after=1)
    state_file = latest_checkpoint(run) / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["train_prompts"] = "p.txt"  # as an old version wrote it: relative to its working directory
    del state["files"]
    state_file.write_text(json.dumps(state))
    train(cfg, resume=True, progress=False)
    assert "predates file identities" in capsys.readouterr().out
    assert len(read_metrics(run)) == 3


def test_identity_is_the_content_not_the_place(tmp_path):
    model = save_tiny_flux(tmp_path / "m", seed=0)
    copy = tmp_path / "elsewhere" / "m"
    shutil.copytree(model, copy)
    (copy / ".cache").mkdir()
    (copy / ".cache" / "download.lock").write_text("x")
    (copy / "LICENSE.md").write_text("terms")
    a, b = identity("model.args.path", str(model)), identity("model.args.path", str(copy))
    assert a["sha256"] == b["sha256"] and a["files"] == b["files"] > 5
    config = copy / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"num_layers": 1', '"num_layers": 2'))
    assert identity("model.args.path", str(copy))["sha256"] != a["sha256"]
    # prompt sources: the prompts, whatever file or format holds them
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    assert identity("rollout.prompts", str(tmp_path / "p.txt"))["sha256"] == \
        identity("rollout.prompts", str(tmp_path / "p.jsonl"))["sha256"]
    assert "sha256" not in identity("model.args.path", str(tmp_path / "nowhere"))


def test_path_fields_and_list_overrides():
    data = {"rollout": {"prompts": "world:train"}, "eval": {"prompts": "p/test.txt"},
            "model": {"name": "flux", "args": {"path": "/m", "height": 64, "embedding_cache": None}},
            "rewards": [{"name": "hps", "args": {"path": "/h.pt", "tokenizer": "/tok"}}, {"name": "jpeg"}]}
    assert path_fields(data) == {"eval.prompts": "p/test.txt", "model.args.path": "/m", "rewards[0].args.path": "/h.pt",
                                 "rewards[0].args.tokenizer": "/tok"}
    assert without_paths(data)["rewards"][0]["args"] == {} and without_paths(data)["model"]["args"]["height"] == 64
    apply_override(data, "rewards[0].args.path=/new/h.pt")
    apply_override(data, "rewards[1].weight=0.5")
    assert data["rewards"][0]["args"]["path"] == "/new/h.pt" and data["rewards"][1]["weight"] == 0.5
    with pytest.raises(ConfigError, match="has 2 elements"):
        apply_override(data, "rewards[2].args.path=/x")
