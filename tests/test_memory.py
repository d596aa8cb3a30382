"""The memory estimate printed before a run loads its model: parameter counts from the pipeline's configs on the
meta device equal those of the loaded adapter (every tiny stand-in in the official layout), the LoRA count equals
peft's, and `mixgrpo train --dry-run` stops after it with no model loaded and no run directory."""

import pytest

import tiny_pipelines
from gaussian_run import merged
from mixgrpo.config import build_config
from mixgrpo.memory import estimate
from mixgrpo.models import MODELS

SAVE = {"flux": tiny_pipelines.save_tiny_flux, "sd3": tiny_pipelines.save_tiny_sd3,
        "qwen_image": tiny_pipelines.save_tiny_qwen_image, "flux2": tiny_pipelines.save_tiny_flux2,
        "wan": tiny_pipelines.save_tiny_wan}


def _args(name, path):
    return {"path": str(path), "dtype": "float32", "height": 32, "width": 32, "max_sequence_length": 24,
            **({"num_frames": 5} if name == "wan" else {})}


@pytest.mark.filterwarnings("ignore:prompt .* was truncated")
@pytest.mark.parametrize("name", sorted(SAVE))
def test_the_estimates_parameter_counts_are_the_loaded_models(name, tmp_path):
    from mixgrpo.train.weights import trainable_parameters

    path = SAVE[name](tmp_path / "pipe")
    args = _args(name, path)
    lora = {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    est = estimate(build_config({"model": {"name": name, "args": args}, "lora": lora, "optim": {"ema_decay": 0.9}}))
    model = MODELS.get(name)(**args)
    assert est.params["transformer"] == sum(p.numel() for p in model.denoiser.parameters())
    assert sum(est.params.values()) == sum(p.numel() for p in model.parameters())  # text encoders and VAE too
    trained = trainable_parameters(model, name, 4, 0, lora["target_modules"], False)
    assert est.trained == sum(p.numel() for p in trained.values())
    assert est.parts["EMA of the trained weights"] == 4 * est.trained
    full = estimate(build_config({"model": {"name": name, "args": args}}))
    assert full.trained == est.params["transformer"]
    assert full.parts["weights"] == 4 * sum(est.params.values())  # float32
    # an embedding cache: the text encoders are not loaded, nor counted
    cached = estimate(build_config({"model": {"name": name, "args": {**args, "embedding_cache": "c"}}}))
    assert not any(k.startswith("text_encoder") for k in cached.params) and cached.total < full.total


def test_activations_follow_the_micro_batch_cfg_and_checkpointing(tmp_path):
    path = SAVE["flux"](tmp_path / "pipe")
    act = lambda **over: next(v for k, v in estimate(build_config(  # noqa: E731
        merged({"model": {"name": "flux", "args": _args("flux", path)}}, over))).parts.items() if k.startswith("activ"))
    base = act(update={"micro_batch_size": 2})
    assert act(update={"micro_batch_size": 4}) == 2 * base
    assert act(update={"micro_batch_size": 2}, rollout={"guidance_scale": 3.0}) == 2 * base  # GRPO's CFG: both rows in one batch
    assert act(update={"micro_batch_size": 2, "grad_checkpointing": True}) < base


def test_dry_run_loads_no_model_and_writes_no_run_directory(tmp_path, monkeypatch, capsys):
    import yaml

    from mixgrpo import cli
    from mixgrpo.models import base

    path = SAVE["sd3"](tmp_path / "pipe")
    (tmp_path / "p.txt").write_text("a red cube\n")
    config = {"model": {"name": "sd3", "args": _args("sd3", path)}, "lora": {"rank": 4}, "rewards": [{"name": "jpeg_compressibility"}], "rollout": {"prompts": str(tmp_path / "p.txt")}, "eval": {"num_prompts": 0}, "run": {"out_dir": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(base, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate per process" in out and "LoRA weights" in out and "dry run" in out
    assert not (tmp_path / "run").exists()
    # a problem is still a problem
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--dry-run", "rewards=[{name: jpeg}]"]) == 2


def test_an_estimate_that_cannot_be_made_says_so_and_stops_nothing(tmp_path, capsys):
    import json

    from mixgrpo.memory import report

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "NoSuchTransformer"]}))
    cfg = build_config({"model": {"name": "flux", "args": {"path": str(tmp_path)}}})
    assert report(cfg, 1) is None
    assert capsys.readouterr().out.startswith("memory estimate unavailable (")
