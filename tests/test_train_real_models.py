"""A GRPO iteration through the trainer on tiny random FLUX and SD3 pipelines (full and LoRA), and the
exported result loads into the stock diffusers pipeline with no code of ours."""

import pytest
import torch

from mixgrpo.config import build_config
from mixgrpo.rundir import read_metrics
from mixgrpo.train import train

from tiny_pipelines import save_tiny_flux, save_tiny_sd3


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"flux": save_tiny_flux(root / "flux", seed=0), "sd3": save_tiny_sd3(root / "sd3", seed=0)}


@pytest.mark.parametrize("name,lora", [("flux", 0), ("sd3", 4)])
def test_grpo_iteration_on_a_diffusers_model(tmp_path, pipelines, name, lora):
    args = {"path": str(pipelines[name]), "dtype": "float32", "height": 32, "width": 32, "max_sequence_length": 24}
    cfg = build_config({"algorithm": "mixgrpo", "sampler": {"num_steps": 6, "window": {"size": 2}}, "model": {"name": name, "args": args}, "rewards": [{"name": "toy_rewards:brightness"}], "rollout": {"guidance_scale": 4.5 if name == "sd3" else 1.0, "prompts_per_iteration": 2, "group_size": 2}, "run": {"iterations": 2, "out_dir": str(tmp_path / "run")}, "update": {"steps_per_epoch": 1, "micro_batch_size": 4}, "optim": {"lr": 1.0e-3}, "loss": {"clip_range": 0.2}, "eval": {"num_prompts": 0}, "lora": {"rank": lora}})
    run = train(cfg, progress=False)
    metrics = read_metrics(run)
    assert len(metrics) == 2 and metrics[0]["onpolicy_ratio_error"] < 1e-4
    assert metrics[-1]["grad_norm"] > 0
    if name == "sd3":  # LoRA result in diffusers' format, loaded by the stock pipeline
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(pipelines[name], local_files_only=True)
        before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        pipe.load_lora_weights(run / "final")
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights under their original names
        changed = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])]
        assert changed  # the trained LoRA moved some weights
    else:  # full fine-tuning: a diffusers transformer directory
        from diffusers import FluxTransformer2DModel

        tuned = FluxTransformer2DModel.from_pretrained(run / "final")
        base = FluxTransformer2DModel.from_pretrained(pipelines[name], subfolder="transformer")
        assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))


def test_eval_and_sample_of_a_run_follow_its_own_evaluation(tmp_path, pipelines):
    """`mixgrpo eval tuned=RUN` with nothing else: the run's held-out prompts (free text, not the shapes world),
    its rewards (weight-0 guards included), images per prompt, seed, steps and guidance, so it redraws the
    run's own final evaluation; `mixgrpo sample --path RUN` samples those prompts."""
    import json

    from mixgrpo import cli

    (tmp_path / "train.txt").write_text("a red cube on a table\ntwo blue spheres\n")
    (tmp_path / "eval.txt").write_text("a cat wearing a hat\na yellow dog\na house by a lake\n")
    args = {"path": str(pipelines["flux"]), "dtype": "float32", "height": 32, "width": 32, "max_sequence_length": 24}
    cfg = build_config({"algorithm": "mixgrpo", "sampler": {"num_steps": 3, "shift": 2.0, "window": {"size": 1}}, "model": {"name": "flux", "args": args}, "rewards": [{"name": "toy_rewards:brightness"}, {"name": "jpeg_compressibility", "weight": 0.0}], "rollout": {"prompts": str(tmp_path / "train.txt"), "prompts_per_iteration": 1, "group_size": 2}, "eval": {"prompts": str(tmp_path / "eval.txt"), "num_prompts": 2, "images_per_prompt": 2}, "run": {"seed": 7, "iterations": 1, "out_dir": str(tmp_path / "run")}, "update": {"steps_per_epoch": 1, "micro_batch_size": 2}, "optim": {"lr": 1.0e-2}, "loss": {"clip_range": 0.2}})
    run = train(cfg, progress=False)
    assert cli.main(["eval", f"tuned={run}", "--out", str(tmp_path / "eval")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a cat wearing a hat"] * 2 + ["a yellow dog"] * 2
    after = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    for label in ("brightness", "jpeg_compressibility"):
        mean = sum(r[label] for r in rows) / len(rows)
        assert mean == pytest.approx(after[f"eval/{label}"], rel=1e-4, abs=1e-5), label
    # --reward and --prompt still take over
    assert cli.main(["eval", f"tuned={run}", "--prompt", "a boat", "--reward", "jpeg_compressibility",
                     "--num-images", "1", "--out", str(tmp_path / "eval2")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval2" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "a boat" and "brightness" not in rows[0]
    assert cli.main(["sample", "--path", str(run), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "prompts.txt").read_text().splitlines() == ["a cat wearing a hat", "a yellow dog"]
    assert (tmp_path / "s" / "0001_01.png").is_file()
