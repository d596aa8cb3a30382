"""Wan 2.1 / 2.2 text-to-video: on tiny random pipelines saved to disk and loaded through `load_wan`, mixgrpo's
ODE rollout (with true CFG) equals the stock WanPipeline's latents and videos, the text encoding and its cache equal
the pipeline's, Wan 2.2 A14B routes each sigma to its expert, and a LoRA we save loads into the stock pipeline and
reproduces our samples."""

import pytest
import torch

from mixgrpo.models import MODELS
from mixgrpo.models.lora import apply_lora, lora_parameters, save_lora
from mixgrpo.models.wan import LORA_TARGETS, WanAdapter, load_wan
from mixgrpo.plan import SamplerConfig, build_plan
from mixgrpo.rollout import sample
from tiny_pipelines import WAN_VARIANTS, save_tiny_wan

SIZE, FRAMES, MAX_SEQ = 64, 5, 24
PROMPTS = ["a red cube on a table", "two blue spheres"]
SCALE = 5.0  # the pipeline's default guidance_scale


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {v: save_tiny_wan(root / v, seed=0, variant=v) for v in WAN_VARIANTS}


def load(path, **kw):
    return load_wan(str(path), dtype="float32", height=SIZE, width=SIZE, num_frames=FRAMES,
                    max_sequence_length=MAX_SEQ, **kw)


def stock(path, sigmas=None):
    """The stock pipeline, its scheduler made to integrate over `sigmas` exactly (WanPipeline takes no sigmas:
    set_timesteps(n) is redirected to set_timesteps(sigmas=...), shift 1 so the grid is used as it is)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, shift=1.0)
    if sigmas is not None:
        set_timesteps = pipe.scheduler.set_timesteps
        pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=sigmas, device=device)
    return pipe


def ode(num_steps=4):
    return build_plan(SamplerConfig(num_steps=num_steps, shift=3.0, sde_steps="none", train_steps="none"))


def noise_of(model, seeds):
    """The rollout's initial noise: one generator per seed, [len(seeds), *latent_shape]."""
    return torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def test_registered_and_shapes(dirs):
    assert MODELS.get("wan") is load_wan
    model = load(dirs["2.1"])
    assert isinstance(model, WanAdapter) and model.transformer_2 is None and model.denoiser is model.transformer
    assert model.latent_shape == (16, 2, 8, 8)  # 5 frames -> 2 latent frames; 64 px / VAE factor 8
    assert load(dirs["2.2-ti2v"]).latent_shape == (16, 2, 4, 4)  # the Wan 2.2 VAE: spatial factor 16
    cond = model.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 32)


@torch.no_grad()
def test_encoding_equals_pipeline(dirs):
    model, pipe = load(dirs["2.1"]), stock(dirs["2.1"])
    embeds, negative = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, max_sequence_length=MAX_SEQ)
    torch.testing.assert_close(model.encode_prompts(PROMPTS)["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(model.encode_prompts(["", ""])["prompt_embeds"], negative, rtol=0, atol=0)
    long = model.encode_prompts(["a  red   cube &amp; a cat"])["prompt_embeds"]  # cleaned as the pipeline cleans
    torch.testing.assert_close(long, pipe.encode_prompt("a red cube & a cat", do_classifier_free_guidance=False,
                                                        max_sequence_length=MAX_SEQ)[0], rtol=0, atol=0)


@pytest.mark.parametrize("variant", WAN_VARIANTS)
@torch.no_grad()
def test_rollout_ode_plan_with_cfg_equals_pipeline(dirs, variant):
    """mixgrpo.rollout.sample with the SDE off equals WanPipeline for the same noise and sigmas: latents to 1e-5
    in float32, and the decoded videos [B, F, 3, H, W]."""
    model = load(dirs[variant])
    plan = ode(4)
    sigmas = [s.sigma for s in plan.steps]
    seeds = [11, 12]
    ours = sample(model, plan, model.encode_prompts(PROMPTS), seeds, uncond=model.encode_prompts(["", ""]),
                  guidance_scale=SCALE)
    pipe = stock(dirs[variant], sigmas)
    kw = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=len(sigmas), guidance_scale=SCALE,
              max_sequence_length=MAX_SEQ)
    expected = pipe(PROMPTS, latents=noise_of(model, seeds), output_type="latent", **kw).frames
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], torch.tensor(sigmas, dtype=torch.float32))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - noise_of(model, seeds)).abs().mean() > 0.1  # the rollout moved the latents
    videos = pipe(PROMPTS, latents=noise_of(model, seeds), output_type="pt", **kw).frames
    decoded = model.decode(ours)
    assert decoded.shape == (2, FRAMES, 3, SIZE, SIZE) == videos.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, videos, rtol=1e-5, atol=1e-5)
    if variant == "2.2-a14b":  # the low-noise expert took part: with it replaced by the first, the result moves
        model.transformer_2 = model.transformer
        other = sample(model, plan, model.encode_prompts(PROMPTS), seeds, uncond=model.encode_prompts(["", ""]),
                       guidance_scale=SCALE)
        assert (other - ours).abs().max() > 1e-3


def test_wan22_experts_split_at_the_boundary_and_a_frozen_expert_is_never_trained(dirs):
    model = load(dirs["2.2-a14b"])
    assert model.boundary == 0.875 and model.denoiser is model.transformer
    x = torch.randn(3, *model.latent_shape)
    sigma = torch.tensor([0.95, 0.875, 0.5])  # high, high (>= boundary), low
    cond = model.encode_prompts(PROMPTS + ["a cat"])
    with torch.no_grad():
        mixed = model(x, sigma, cond)
        for i in range(3):
            expert = model.transformer if sigma[i] >= 0.875 else model.transformer_2
            alone = model._call(expert, x[i:i + 1], sigma[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()})
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-6, atol=1e-6)
    model.requires_grad_(False)
    model.denoiser.requires_grad_(True)
    model(x[:2], sigma[:2], {k: v[:2] for k, v in cond.items()}).sum().backward()  # the trained expert's range
    with pytest.raises(ValueError, match="sigma 0.500 is denoised by the frozen low_noise expert"):
        model(x, sigma, cond)
    low = load(dirs["2.2-a14b"], trained_expert="low_noise")
    assert low.denoiser is low.transformer_2
    with pytest.raises(ValueError, match="trained_expert = 'middle'"):
        load(dirs["2.2-a14b"], trained_expert="middle")


def test_bad_inputs_name_the_fix(dirs, tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_wan(str(tmp_path))
    with pytest.raises(ValueError, match=r"num_frames = 6 must be 1 \+ 4 k .* e.g. 5"):
        load_wan(str(dirs["2.1"]), dtype="float32", height=SIZE, width=SIZE, num_frames=6)
    with pytest.raises(ValueError, match="multiples of 16"):
        load_wan(str(dirs["2.1"]), dtype="float32", height=40, width=SIZE, num_frames=FRAMES)
    with pytest.raises(ValueError, match="multiples of 32"):  # Wan 2.2's VAE: factor 16 x patch 2
        load_wan(str(dirs["2.2-ti2v"]), dtype="float32", height=48, width=SIZE, num_frames=FRAMES)


@pytest.mark.parametrize("variant", ["2.1", "2.2-a14b"])
@torch.no_grad()
def test_lora_loads_into_the_stock_pipeline_and_reproduces_our_samples(dirs, tmp_path, variant):
    """A LoRA (alpha != rank, random non-zero weights) saved by us: WanPipeline.load_lora_weights reproduces our
    sampling (Wan 2.2: the low-noise expert's LoRA goes in with load_into_transformer_2=True)."""
    expert = "low_noise" if variant == "2.2-a14b" else "high_noise"
    model = load(dirs[variant], trained_expert=expert)
    apply_lora(model.denoiser, rank=4, alpha=8, target_modules=LORA_TARGETS)
    g = torch.Generator().manual_seed(0)
    for p in lora_parameters(model.denoiser):
        p.add_(0.2 * torch.randn(p.shape, generator=g))
    save_lora(model, tmp_path / "lora")
    plan = ode(3)
    sigmas = [s.sigma for s in plan.steps]
    seeds = [5, 6]
    ours = sample(model, plan, model.encode_prompts(PROMPTS), seeds, uncond=model.encode_prompts(["", ""]),
                  guidance_scale=SCALE)
    pipe = stock(dirs[variant], sigmas)
    kw = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=3, guidance_scale=SCALE,
              max_sequence_length=MAX_SEQ, output_type="latent")
    before = pipe(PROMPTS, latents=noise_of(model, seeds), **kw).frames
    pipe.load_lora_weights(tmp_path / "lora", **({"load_into_transformer_2": True} if expert == "low_noise" else {}))
    after = pipe(PROMPTS, latents=noise_of(model, seeds), **kw).frames
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-3  # the LoRA changed the samples


def test_preprocess_cache_reproduces_the_text_encoder(dirs, tmp_path):
    from mixgrpo import cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert cli.main(["preprocess", "--model", "wan", "--path", str(dirs["2.1"]), "--prompts", str(prompts),
                     "--out", str(tmp_path / "cache"), "--dtype", "float32", "--device", "cpu",
                     "--max-sequence-length", str(MAX_SEQ)]) == 0
    cached = load(dirs["2.1"], embedding_cache=str(tmp_path / "cache"))
    model = load(dirs["2.1"])
    for batch in (PROMPTS, ["", PROMPTS[1]]):
        torch.testing.assert_close(cached.encode_prompts(batch), model.encode_prompts(batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expects width"):
        load(dirs["2.1"], embedding_cache=str(_other_width_cache(tmp_path)))


def _other_width_cache(tmp_path):
    from mixgrpo.preprocess import preprocess

    (tmp_path / "a.txt").write_text("a\n")
    encoder = type("Narrow", (), {"encode": lambda self, ps: {"prompt_embeds": torch.zeros(len(ps), MAX_SEQ, 8)}})()
    return preprocess(tmp_path / "a.txt", encoder, tmp_path / "other")


@pytest.mark.parametrize("variant,lora", [("2.1", 0), ("2.1", 4), ("2.2-a14b", 4)])
def test_a_grpo_iteration_exports_what_the_stock_pipeline_reproduces(dirs, tmp_path, variant, lora):
    """One MixGRPO iteration through the trainer (full or LoRA; Wan 2.2: the high-noise expert, whose range holds
    the window), then the stock WanPipeline with final/ loaded by diffusers alone samples what mixgrpo samples."""
    from model_runs import grpo_run, noise, our_samples, sigmas, with_final

    args = {"path": str(dirs[variant]), "dtype": "float32", "height": SIZE, "width": SIZE, "num_frames": FRAMES,
            "max_sequence_length": MAX_SEQ}
    run = grpo_run(tmp_path / "run", "wan", args, lora, SCALE, targets=list(LORA_TARGETS))
    seeds = [3, 4]
    ours = our_samples(run, PROMPTS, seeds, SCALE)
    pipe = with_final(stock(dirs[variant], sigmas()), run, lora)
    with torch.no_grad():
        stock_latents = pipe(PROMPTS, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=len(sigmas()),
                             guidance_scale=SCALE, max_sequence_length=MAX_SEQ, output_type="latent",
                             latents=noise(ours.shape[1:], seeds)).frames
    torch.testing.assert_close(stock_latents, ours, rtol=1e-5, atol=1e-5)
