"""The trainer end to end on the analytic Gaussian model: learning, invariances, resume, failure policy."""

import json
import sys

import pytest
import torch

from mixgrpo.checkpoint import latest_checkpoint, load_checkpoint
from mixgrpo.config import ConfigError, build_config
from mixgrpo.rundir import read_metrics
from mixgrpo.train import TrainingError, train

from gaussian_run import gaussian_run, merged


def _cfg(tmp_path, **over):
    data = gaussian_run(run={"iterations": 6, "out_dir": str(tmp_path / "run"), "checkpoint_every": 2}, loss={"clip_range": 0.2}, eval={"num_prompts": 4})
    return build_config(merged(data, over))


@pytest.mark.parametrize("algorithm", ["mixgrpo", "mixgrpo_flash_star", "flow_grpo", "dance_grpo"])
def test_reward_rises_and_only_trainable_weights_change(tmp_path, algorithm):
    cfg = _cfg(tmp_path, algorithm=algorithm, run={"iterations": 16}, optim={"lr": 0.1})  # DanceGRPO's eta 0.3 learns slowest
    run = train(cfg, progress=False)
    metrics = read_metrics(run)
    rewards = [m["reward/brightness"] for m in metrics]
    assert len(rewards) == 16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["eval/brightness"] > evals[0]["eval/brightness"]
    final = load_checkpoint(latest_checkpoint(run))["model"]
    assert set(final) == {"mu"}
    assert not torch.equal(final["mu"], torch.zeros_like(final["mu"]))
    for name in ("reward_curve.png", "samples_before.png", "samples_after.png", "summary.md", "config.yaml"):
        assert (run / name).is_file(), name


def test_on_policy_ratio_is_one_on_the_first_optimizer_step(tmp_path):
    run = train(_cfg(tmp_path, run={"iterations": 2}), progress=False)
    for m in read_metrics(run):
        assert m["onpolicy_ratio_error"] < 1e-5


@pytest.mark.parametrize("algorithm", ["mixgrpo", "flow_grpo"])
def test_grpo_guard_is_on_policy_on_the_first_step_and_the_reward_rises(tmp_path, algorithm):
    """GRPO-Guard: the re-centred ratio is exactly 1 before the first optimizer step (the old means are re-scored
    in the update's own layout), the clip binds, and the brightness reward rises as without the guard."""
    run = train(_cfg(tmp_path, algorithm=algorithm, run={"iterations": 16}, optim={"lr": 0.1}, loss={"grpo_guard": True}), progress=False)
    metrics = read_metrics(run)
    assert all(m["onpolicy_ratio_error"] == 0 for m in metrics)
    rewards = [m["reward/brightness"] for m in metrics]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05


def test_micro_batch_size_does_not_change_the_update(tmp_path):
    a = train(_cfg(tmp_path / "a", run={"iterations": 2}, update={"micro_batch_size": 1}), progress=False)
    b = train(_cfg(tmp_path / "b", run={"iterations": 2}, update={"micro_batch_size": 4}), progress=False)
    wa = load_checkpoint(latest_checkpoint(a))["model"]["mu"]
    wb = load_checkpoint(latest_checkpoint(b))["model"]["mu"]
    torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("over", [{}, {"loss": {"grpo_guard": True}}])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, over):
    full = train(_cfg(tmp_path / "full", **over), progress=False)
    cfg = _cfg(tmp_path / "cut", **over)
    train(cfg, progress=False, stop_after=3)  # interrupted after iteration 3 (checkpointed on stop)
    assert latest_checkpoint(cfg.run.out_dir).name == "iter_000003"
    resumed = train(cfg, resume=True, progress=False)
    wf = load_checkpoint(latest_checkpoint(full))["model"]["mu"]
    wr = load_checkpoint(latest_checkpoint(resumed))["model"]["mu"]
    assert torch.equal(wf, wr)
    mf, mr = read_metrics(full), read_metrics(resumed)
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert [drop(m) for m in mf] == [drop(m) for m in mr]


def test_time_limit_ends_the_run_like_its_last_iteration(tmp_path):
    # a budget of ~0 minutes: the first iteration reaches it; the run checkpoints, evaluates and exports there
    run = train(_cfg(tmp_path, run={"iterations": 6, "time_limit_minutes": 1e-9}), progress=False)
    assert len(read_metrics(run)) == 1 and latest_checkpoint(run).name == "iter_000001"
    evals = [json.loads(line)["iteration"] for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals == [0, 1] and (run / "final").is_dir()
    # the limit counts per launch and is not part of the run's identity: a resumed run may change it
    again = train(_cfg(tmp_path, run={"iterations": 6, "time_limit_minutes": 0}), resume=True, progress=False)
    assert len(read_metrics(again)) == 6


def test_existing_run_needs_resume(tmp_path):
    cfg = _cfg(tmp_path, run={"iterations": 2})
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False)


def _flat(data: dict) -> dict:
    """A config mapping as mixgrpo wrote it before the config had sections (`lr`, `reward_policy.retries`)."""
    from mixgrpo.config import MOVED_KEYS

    out = json.loads(json.dumps(data))
    for was, key in MOVED_KEYS.items():
        section, leaf = key.split(".")
        if leaf in out.get(section, {}):
            old_section, _, old_leaf = was.rpartition(".")
            (out.setdefault(old_section, {}) if old_section else out)[old_leaf] = out[section].pop(leaf)
    return {k: v for k, v in out.items() if v != {}}


def test_a_run_directory_of_the_flat_config_layout_resumes(tmp_path):
    """A run written before the config had sections (flat keys in its config.yaml and in its checkpoints'
    fingerprints, its prompt files under their old names) resumes from the command line and ends as the
    uninterrupted run."""
    import yaml

    from mixgrpo import cli

    full = train(_cfg(tmp_path / "full", run={"iterations": 4}), progress=False)
    cut = train(_cfg(tmp_path / "cut", run={"iterations": 4}, rollout={"prompts": "world:train"}), progress=False,
                stop_after=2)
    config = yaml.safe_load((cut / "config.yaml").read_text())
    (cut / "config.yaml").write_text(yaml.safe_dump(_flat(config)))
    assert "lr" in yaml.safe_load((cut / "config.yaml").read_text())
    for state in cut.glob("checkpoints/*/state.json"):
        recorded = json.loads(state.read_text())
        files = {{"rollout.prompts": "train_prompts", "eval.prompts": "eval_prompts"}.get(k, k): v
                 for k, v in recorded["files"].items()}
        state.write_text(json.dumps({**recorded, "config": _flat(recorded["config"]), "files": files}))
    assert cli.main(["train", "--out", str(cut), "--resume"]) == 0
    wf = load_checkpoint(latest_checkpoint(full))["model"]["mu"]
    wr = load_checkpoint(latest_checkpoint(cut))["model"]["mu"]
    assert latest_checkpoint(cut).name == "iter_000004"
    torch.testing.assert_close(wf, wr, rtol=0, atol=0)
    assert "optim" in yaml.safe_load((cut / "config.yaml").read_text())  # rewritten in today's layout


def test_resume_with_another_config_is_refused(tmp_path):
    train(_cfg(tmp_path, run={"iterations": 2}), progress=False)
    from mixgrpo.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="different configuration"):
        train(_cfg(tmp_path, run={"iterations": 4}, optim={"lr": 0.01}), resume=True, progress=False)


def test_nan_rewards_skip_their_groups_and_are_counted(tmp_path):
    cfg = _cfg(tmp_path, run={"iterations": 2}, rewards=[{"name": "toy_rewards:flaky", "args": {"fail_every": 8}}],
               scoring={"max_failed_groups": 0.5})
    run = train(cfg, progress=False)
    assert all(m["failed_groups"] == 1 for m in read_metrics(run))  # image 0 of 8: one group of 2


def test_failing_reward_aborts_with_a_clear_message(tmp_path):
    cfg = _cfg(tmp_path, run={"iterations": 2}, rewards=[{"name": "toy_rewards:broken"}], scoring={"retries": 1})
    with pytest.raises(TrainingError, match="failed to get rewards"):
        train(cfg, progress=False)


def test_kl_to_the_base_pulls_towards_it(tmp_path):
    free = train(_cfg(tmp_path / "free", run={"iterations": 6}), progress=False)
    tied = train(_cfg(tmp_path / "tied", run={"iterations": 6}, loss={"kl_beta": 50.0}), progress=False)
    wf = load_checkpoint(latest_checkpoint(free))["model"]["mu"].abs().mean()
    wt = load_checkpoint(latest_checkpoint(tied))["model"]["mu"].abs().mean()
    assert "kl_to_base" in read_metrics(tied)[-1]
    assert wt < wf


@pytest.mark.parametrize("algorithm", ["mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star", "flow_grpo", "dance_grpo"])
def test_counted_model_calls_match_the_plan(tmp_path, algorithm):
    """Calls are counted by hooks on the model; the plan's NFE is what the paper counts."""
    from mixgrpo.plan import build_plan

    cfg = _cfg(tmp_path, algorithm=algorithm, run={"iterations": 3, "profile": True}, sampler={"num_steps": 10})
    run = train(cfg, progress=False)
    for m in read_metrics(run):
        plan = build_plan(cfg.sampler, m["iteration"] - 1, cfg.run.seed)
        assert m["model_calls/rollout"] == plan.nfe == m["nfe_rollout"]
        micro_batches = cfg.update.steps_per_epoch * -(-cfg.rollout.prompts_per_iteration * cfg.rollout.group_size
                                                      // cfg.update.steps_per_epoch // cfg.update.micro_batch_size)
        assert m["model_calls/update"] == plan.num_trained * micro_batches
        assert m["time/model_rollout"] <= m["time/rollout"]


def test_metrics_reach_tensorboard_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged, inits = [], []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    fake = type(sys)("wandb")
    fake.init = lambda **kw: inits.append(kw) or FakeRun()
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = train(_cfg(tmp_path, run={"iterations": 3, "wandb_project": "proj"}), progress=False)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    rewards = [(e.step, e.value) for e in events.Scalars("reward/brightness")]
    assert rewards == [(m["iteration"], pytest.approx(m["reward/brightness"])) for m in read_metrics(run)]
    assert [e.step for e in events.Scalars("eval/brightness")] == [0, 3]
    # the sample grids before and after training, and the config
    grids = [(e.step, e.height, e.width) for e in events.Images("samples")]
    from PIL import Image

    sizes = {tag: Image.open(run / f"samples_{tag}.png").size for tag in ("before", "after")}
    assert grids == [(0, *sizes["before"][::-1]), (3, *sizes["after"][::-1])]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "iterations: 3" in config_text
    assert inits[0]["project"] == "proj" and inits[0]["config"]["run"]["iterations"] == 3
    steps = [s for s, v in logged[:-1] if "reward/brightness" in v]
    assert steps == [1, 2, 3] and logged[-1] == "finished"
    assert [s for s, v in logged[:-1] if "samples" in v] == [0, 3]
    # every record carries a timestamp and the peak memory, and they stay out of the tracked scalars
    for m in read_metrics(run):
        assert m["time/unix"] > 1.7e9 and m["memory/peak_rss_gib"] > 0
    assert "time/unix" not in events.Tags()["scalars"] and "memory/peak_rss_gib" in events.Tags()["scalars"]
    # a resumed run continues the same W&B run
    train(_cfg(tmp_path, run={"iterations": 4, "wandb_project": "proj"}), resume=True, progress=False)
    assert inits[1]["id"] == inits[0]["id"] == (run / "wandb_id").read_text().strip()


def test_wandb_without_the_package_is_refused_by_name(tmp_path, monkeypatch):
    from mixgrpo.preflight import PreflightError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(PreflightError, match="pip install .wandb"):
        train(_cfg(tmp_path, run={"iterations": 1, "wandb_project": "proj"}), progress=False)


def _eval_rows(run):
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def test_periodic_evaluation_resumes_without_duplicated_or_lost_rows(tmp_path):
    """eval_every: rows at 0, 2, 4, 6 on the same noise; a run interrupted at 3, or resumed from an earlier
    checkpoint than its last evaluation, ends with the uninterrupted run's rows exactly."""
    over = {"eval": {"every": 2}, "run": {"checkpoint_every": 2, "keep_checkpoints": 3}}
    full = train(_cfg(tmp_path / "full", **over), progress=False)
    rows = _eval_rows(full)
    assert [r["iteration"] for r in rows] == [0, 2, 4, 6]
    assert rows[0] != rows[-1]  # the model moved, and the evaluation sees it
    for name in ("eval_curve.png", "reward_curve.png"):
        assert (full / name).stat().st_size > 10_000, name  # a drawn plot, not an empty canvas

    cut = _cfg(tmp_path / "cut", **over)
    train(cut, progress=False, stop_after=3)
    assert [r["iteration"] for r in _eval_rows(tmp_path / "cut" / "run")] == [0, 2]
    # the curves are drawn at every evaluation, not only at the end (a run stopped here has no summary)
    assert not (tmp_path / "cut" / "run" / "summary.md").exists()
    for name in ("eval_curve.png", "reward_curve.png"):
        assert (tmp_path / "cut" / "run" / name).stat().st_size > 10_000, name
    assert _eval_rows(train(cut, resume=True, progress=False)) == rows

    # a crash after the evaluation at 4 but before the checkpoint at 4 (here: the later checkpoints removed)
    import shutil

    for name in ("iter_000004", "iter_000006"):
        shutil.rmtree(full / "checkpoints" / name)
    assert _eval_rows(train(_cfg(tmp_path / "full", **over), resume=True, progress=False)) == rows


def test_sample_grids_are_captioned_with_their_prompts(tmp_path):
    from PIL import Image

    from mixgrpo.images import save_grid

    images = torch.zeros(3, 3, 16, 16) + 1.0  # white tiles: any dark pixel below them is caption text
    save_grid(images, tmp_path / "plain.png", nrow=3)
    save_grid(images, tmp_path / "captioned.png", nrow=3,
              captions=["a red circle left of a blue square", "x", "a " + "very " * 40 + "long prompt"])
    plain, captioned = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "captioned.png")
    assert plain.size == (3 * 17 + 1, 18)
    tile = 128  # tiles are upscaled so that a caption line holds a few words
    assert captioned.width == 3 * (tile + 1) + 1 and captioned.height > tile + 2 * 11
    pixels = torch.tensor(list(captioned.convert("L").getdata())).view(captioned.height, captioned.width)
    below = pixels[tile + 1:, :]
    assert (below[:, 1:tile + 1] < 128).any() and (below[:, 2 * tile + 3:] < 128).any()  # text under tiles 1 and 3
    # a caption never grows past CAPTION_LINES lines, however long the prompt
    from mixgrpo.images import CAPTION_FONT_SIZE, CAPTION_LINES

    assert captioned.height <= tile + 2 + CAPTION_LINES * (CAPTION_FONT_SIZE + 3) + 2


def test_final_holds_the_ema_weights_when_ema_decay_is_set(tmp_path):
    """ema_decay > 0: final/ (and so `mixgrpo sample --path RUN`) is the EMA of the trained weights, the last
    checkpoint's ema.safetensors, not its live weights; `mixgrpo export --no-ema` writes the live ones."""
    from safetensors.torch import load_file

    from mixgrpo import cli
    from mixgrpo.export import load_run

    run = train(_cfg(tmp_path, run={"iterations": 3}, optim={"ema_decay": 0.5}, eval={"num_prompts": 0}), progress=False)
    checkpoint = run / "checkpoints" / "iter_000003"
    ema, live = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    final = dict(load_run(run).named_parameters())
    trained = [n for n in ema if n in final]
    assert trained and all(torch.equal(final[n], ema[n].to(final[n].dtype)) for n in trained)
    assert any(not torch.equal(ema[n], live[n]) for n in trained)  # the EMA lags the live weights
    assert cli.main(["export", "--run", str(run), "--no-ema", "--out", str(tmp_path / "live")]) == 0
    exported = dict(load_run(run, tmp_path / "live").named_parameters())
    assert all(torch.equal(exported[n], live[n].to(exported[n].dtype)) for n in trained)


def test_the_slow_phases_of_an_iteration_show_their_model_calls(tmp_path, monkeypatch, capsys):
    """A phase longer than SLOW_PHASE_S gets a bar of its model calls (the rollout's: the plan's NFE); a fast one
    (the Gaussian model's, with the default threshold) adds nothing to the one line per iteration."""
    from mixgrpo import progress
    from mixgrpo.plan import build_plan

    monkeypatch.setenv("TQDM_DISABLE", "0")
    train(_cfg(tmp_path / "fast", run={"iterations": 1}, eval={"num_prompts": 0}), progress=False)
    assert "rollout" not in capsys.readouterr().err
    monkeypatch.setattr(progress, "SLOW_PHASE_S", 0.0)
    cfg = _cfg(tmp_path / "slow", run={"iterations": 1}, eval={"num_prompts": 0})
    train(cfg, progress=False)
    err = capsys.readouterr().err
    nfe = build_plan(cfg.sampler, 0, cfg.run.seed).nfe
    assert "it 1 rollout: 100%" in err and f" {nfe}/{nfe} " in err, err
    assert "it 1 update:" in err and "it 1 scoring: 100%" in err
