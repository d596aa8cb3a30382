"""Videos through the whole stack, with no video branch in it: 5-D latents [B, C, F, H, W] in the rollout and the
update, videos [B, F, 3, H, W] in the rewards (image rewards per frame, aggregated; a temporal reward), animated
grids and sample files, and a run on the analytic video model from the CLI to `mixgrpo sample`."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo import cli
from mixgrpo.config import build_config
from mixgrpo.images import media_name, save_grid, save_media
from mixgrpo.models.analytic import GaussianFlow
from mixgrpo.plan import ALGORITHMS, build_plan, train_mask
from mixgrpo.rewards import FRAME_AGGREGATIONS, RewardError, build_reward
from mixgrpo.rollout import guided_velocity, rollout
from mixgrpo.sampling import gaussian_log_prob, sde_mean_std

P, G, F = 2, 3, 4


def _video_model(frames=F):
    torch.manual_seed(0)
    model = GaussianFlow(size=4, frames=frames)
    model.mu.data.normal_(0, 0.3)
    return model


def test_video_latents_roll_out_and_rescore_like_images():
    """The rollout stores [B, K, C, F, H, W]; re-scoring gives ratio 1; a transition's log-prob (the mean over
    the latent elements) is the mean of the per-frame log-probs, so a video's step is on the same scale as an image's."""
    model = _video_model()
    plan = build_plan(dataclasses.replace(ALGORITHMS["mixgrpo"], num_steps=6,
                                          window=dataclasses.replace(ALGORITHMS["mixgrpo"].window, size=2)), 0, 0)
    mask = train_mask(plan, P * G, 0, 0)
    cond = model.encode_prompts(["a", "b"])
    traj = rollout(model, plan, cond, G, [1, 2], mask)
    assert traj.x.shape == (P * G, 2, 3, F, 4, 4) and traj.final.shape == (P * G, 3, F, 4, 4)
    rows = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}
    for k in range(2):
        x, x_next, sigma, sigma_next = traj.x[:, k], traj.x_next[:, k], traj.sigma[:, k], traj.sigma_next[:, k]
        v = guided_velocity(model, x, sigma.float(), rows, None, 1.0)
        mean, std = sde_mean_std(x, v, sigma, sigma_next, form=plan.sde_form, eta=plan.eta)
        logp = gaussian_log_prob(x_next, mean, std)
        torch.testing.assert_close(logp.float(), traj.log_prob[:, k], rtol=0, atol=1e-6)  # on-policy ratio 1
        std_frame = std[:, :, 0] if torch.is_tensor(std) and std.dim() == 5 else std  # [B, 1, 1, 1, 1] -> 4-D
        per_frame = torch.stack([gaussian_log_prob(x_next[:, :, f], mean[:, :, f], std_frame) for f in range(F)], 1)
        torch.testing.assert_close(logp, per_frame.mean(1), rtol=1e-6, atol=1e-6)
    videos = model.decode(traj.final)
    assert videos.shape == (P * G, F, 3, 4, 4)
    torch.testing.assert_close(videos[:, 2], model.decode(traj.final[:, :, 2]))  # frame f of the video


def _frames_then_videos(b=3, f=F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, 8, 8, generator=g)


@pytest.mark.parametrize("frames", sorted(FRAME_AGGREGATIONS))
def test_an_image_reward_scores_every_frame_and_aggregates(frames):
    videos = _frames_then_videos()
    prompts = ["a red cube", "a cat", "two dogs"]
    seen = []

    def reward(images, prompts):  # an image reward that also records what it was given
        seen.append((tuple(images.shape), list(prompts)))
        return images.mean(dim=(1, 2, 3)) * (1 + torch.tensor([len(p) for p in prompts]))

    scores = build_reward(f"{__name__}:_record", {"fn": reward}, frames)(videos, prompts)
    # the loop reference: each frame of each video on its own, with the video's prompt
    loop = torch.tensor([[float(reward(videos[b, f][None], [prompts[b]])[0]) for f in range(F)] for b in range(3)])
    expected = {"mean": loop.mean(1), "min": loop.min(1).values, "max": loop.max(1).values,
                "median": loop.median(1).values}[frames]
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
    assert seen[0] == ((3 * F, 3, 8, 8), [p for p in prompts for _ in range(F)])  # one batched call for every frame
    images = videos[:, 0]
    torch.testing.assert_close(build_reward(f"{__name__}:_record", {"fn": reward}, frames)(images, prompts),
                               reward(images, prompts))  # images pass through unchanged


def _record(images, prompts, fn):
    return fn(images, prompts)


def test_a_failed_frame_fails_its_video_and_a_wrong_count_is_a_reward_error():
    videos = _frames_then_videos(b=2)

    def nan_in_first(images, prompts):
        scores = images.mean(dim=(1, 2, 3)).clone()
        scores[1] = float("nan")  # frame 1 of video 0
        return scores

    for frames in FRAME_AGGREGATIONS:
        scores = build_reward(f"{__name__}:_record", {"fn": nan_in_first}, frames)(videos, ["a", "b"])
        assert torch.isnan(scores[0]) and torch.isfinite(scores[1]), frames
    short = build_reward(f"{__name__}:_record", {"fn": lambda images, prompts: torch.zeros(3)})
    with pytest.raises(RewardError, match="3 scores for the 8 frames of 2 videos"):
        short(videos, ["a", "b"])
    with pytest.raises(ValueError, match="frames = 'avg' is not a frame aggregation"):
        build_reward("jpeg_compressibility", frames="avg")
    from mixgrpo.preflight import problems_of  # a run with it stops before anything loads, naming the fix

    cfg = build_config({"rewards": [{"name": "jpeg_compressibility", "frames": "avg"}]})
    assert any(p.startswith("rewards[0]: frames = 'avg' is not a frame aggregation: use one of ['max', 'mean'")
               for p in problems_of(cfg))


def test_temporal_consistency_closed_forms():
    reward = build_reward("temporal_consistency")  # order 2: flicker
    first = build_reward("temporal_consistency", {"order": 1})
    t = torch.linspace(0, 1, 6).view(1, 6, 1, 1, 1)
    still = torch.full((1, 6, 3, 4, 4), 0.3)
    ramp = (0.2 + 0.6 * t).expand(1, 6, 3, 4, 4)  # a steady fade: 0.12 per frame
    flicker = torch.tensor([0.0, 1.0] * 3).view(1, 6, 1, 1, 1).expand(1, 6, 3, 4, 4)
    videos = torch.cat([still, ramp, flicker])
    torch.testing.assert_close(reward(videos, [""] * 3), torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(first(videos, [""] * 3), torch.tensor([1.0, 1 - 0.12, 0.0]))
    with pytest.raises(ValueError, match="scores videos"):
        reward(torch.rand(2, 3, 4, 4), ["", ""])
    with pytest.raises(ValueError, match="more than 2 frames"):
        reward(torch.rand(1, 2, 3, 4, 4), [""])
    assert reward.scores_videos  # whole videos, not frame by frame


def _video_mean(videos, prompts):
    return videos.mean(dim=(1, 2, 3, 4))


_video_mean.scores_videos = True


def test_a_user_video_reward_gets_whole_videos():
    videos = _frames_then_videos(b=2)
    reward = build_reward(f"{__name__}:_video_mean")
    torch.testing.assert_close(reward(videos, ["a", "b"]), videos.mean(dim=(1, 2, 3, 4)))


def test_video_grids_and_files_are_animations_of_the_frames(tmp_path):
    videos = _frames_then_videos(b=2)
    assert media_name("grid", videos) == "grid.gif" and media_name("grid", videos[:, 0]) == "grid.png"
    assert media_name("x", videos[0], batched=False) == "x.gif"
    save_grid(videos, tmp_path / "grid.gif", nrow=2, captions=["a", "b"])
    save_grid(videos[:, 2], tmp_path / "frame2.png", nrow=2, captions=["a", "b"])
    with Image.open(tmp_path / "grid.gif") as gif:
        assert gif.n_frames == F and gif.info["loop"] == 0
        assert abs(gif.info["duration"] - 1000 / 16) < 10  # 16 fps, in the GIF format's centiseconds
        gif.seek(2)
        frame2 = np.asarray(gif.convert("RGB")).astype(int)
    still = np.asarray(Image.open(tmp_path / "frame2.png").convert("RGB")).astype(int)
    assert frame2.shape == still.shape  # frame f of the animated grid is the grid of frame f ...
    assert np.abs(frame2 - still).mean() < 4  # ... up to GIF's 256-colour palette
    save_media(videos[0], tmp_path / "one.gif")
    with Image.open(tmp_path / "one.gif") as gif:
        assert gif.n_frames == F and gif.size == (8, 8)
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        save_media(videos[0], tmp_path / "one.png")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_mp4_through_imageio(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    video = torch.linspace(0, 1, F).view(F, 1, 1, 1).expand(F, 3, 9, 7)  # odd sides: padded, not rescaled
    save_media(video, tmp_path / "v.mp4")
    frames = iio.imread(tmp_path / "v.mp4")
    assert frames.shape == (F, 10, 8, 3)
    assert np.abs(frames[:, :9, :7].mean(axis=(1, 2, 3)) - video[:, 0, 0, 0].numpy() * 255).max() < 8


def test_a_video_run_from_the_cli_to_mixgrpo_sample(tmp_path):
    """The analytic video model through train (rollout, per-frame and temporal rewards, update, evaluation grids,
    export) and sample (animated files), with no video-specific code on the way."""
    run = tmp_path / "run"
    over = ["model.name=gaussian", "model.args={size: 4, frames: 3}", "algorithm=mixgrpo", "sampler.num_steps=4",
            "sampler.window.size=1", "run.iterations=2", "rollout.prompts_per_iteration=2", "rollout.group_size=2",
            "update.steps_per_epoch=1", "update.micro_batch_size=4", "eval.num_prompts=2", "optim.lr=0.05",
            "rewards=[{name: jpeg_compressibility, frames: min}, {name: temporal_consistency, weight: 0.5}]"]
    assert cli.main(["train", "--out", str(run), "--quiet", *over]) == 0
    for tag in ("before", "after"):
        with Image.open(run / f"samples_{tag}.gif") as gif:
            assert gif.n_frames == 3
    import json

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/jpeg_compressibility", "reward/temporal_consistency"} <= set(metrics[0])
    assert metrics[0]["onpolicy_ratio_error"] < 1e-5 and metrics[-1]["grad_norm"] > 0
    assert cli.main(["sample", "--path", str(run), "--prompt", "a red circle", "--num-images", "2",
                     "--steps", "3", "--out", str(tmp_path / "s")]) == 0
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["0000_00.gif", "0000_01.gif", "grid.gif", "prompts.txt"]
    with Image.open(tmp_path / "s" / "0000_01.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (4, 4)
    mp4 = ["sample", "--path", str(run), "--prompt", "a red circle", "--num-images", "1", "--steps", "3",
           "--video-format", "mp4", "--out", str(tmp_path / "m")]
    from mixgrpo.images import mp4_problem

    if mp4_problem():  # refused before any model loads, naming what to install
        assert cli.main(mp4) == 2 and not (tmp_path / "m").exists()
    else:
        assert cli.main(mp4) == 0
        assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["0000_00.mp4", "grid.mp4", "prompts.txt"]
