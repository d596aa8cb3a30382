"""SD3 adapter: a plain Euler loop with CFG over our adapter reproduces the stock StableDiffusion3Pipeline."""

import pytest
import torch

from mixgrpo.models import MODELS, cond_cat
from mixgrpo.models.sd3 import SD3Adapter, load_sd3

from tiny_pipelines import save_tiny_sd3

SIZE = 32            # pixels; latents are [16, 16, 16] (VAE factor 2)
MAX_SEQ = 24         # T5 tokens (the prompts fit: no truncation)
PROMPTS = ["a red cube on a table", "two blue spheres"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def model(sd3_dir):
    return load_sd3(str(sd3_dir), dtype="float32", height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)


@pytest.fixture(scope="module")
def pipe(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler_cfg(model, x, sigmas, cond, uncond, scale):
    """x <- x + (sigma' - sigma) v with v = v_u + s (v_c - v_u), cond and uncond in one batch."""
    b = x.shape[0]
    both = cond_cat([uncond, cond])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = model(torch.cat([x, x]), sigma.expand(2 * b), both)
        v_uncond, v_cond = v[:b], v[b:]
        x = x + (sigma_next - sigma) * (v_uncond + scale * (v_cond - v_uncond))
    return x


def test_registered_and_shapes(model):
    assert MODELS.get("sd3") is load_sd3
    assert isinstance(model, SD3Adapter)
    assert model.latent_shape == (16, 16, 16)
    cond = model.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77 + MAX_SEQ, 32)  # 77 CLIP tokens, then T5, width 32
    assert cond["pooled"].shape == (2, 12 + 20)                   # CLIP-L and CLIP-G projections
    # The CLIP part (widths 8 + 16 = 24) is zero-padded to T5's width 32.
    assert torch.all(cond["prompt_embeds"][:, :77, 24:] == 0)
    assert not torch.all(cond["prompt_embeds"][:, 77:] == 0)


@torch.no_grad()
def test_encoding_equals_pipeline(model, pipe):
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=MAX_SEQ)
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts(["", ""])
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(uncond["prompt_embeds"], neg_embeds, rtol=0, atol=0)
    torch.testing.assert_close(uncond["pooled"], neg_pooled, rtol=0, atol=0)


def test_euler_cfg_equals_pipeline(model, pipe):
    torch.manual_seed(1)
    noise = torch.randn(2, *model.latent_shape)
    steps, scale = 4, 4.5
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=scale,
              max_sequence_length=MAX_SEQ, latents=noise.clone(),
              sigmas=[1.0, 0.75, 0.5, 0.25])
    expected = pipe(PROMPTS, output_type="latent", **kw).images
    # The scheduler shifts the given sigmas (shift 3) and appends 0: integrate over exactly its grid.
    sigmas = pipe.scheduler.sigmas.clone()
    assert len(sigmas) == steps + 1 and sigmas[0] == 1 and sigmas[-1] == 0 and sigmas[1] > 0.75
    with torch.no_grad():
        ours = euler_cfg(model, noise, sigmas, model.encode_prompts(PROMPTS), model.encode_prompts(["", ""]), scale)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - noise).abs().mean() > 0.1  # the loop actually moved the latents

    images = pipe(PROMPTS, output_type="pt", **kw).images
    with torch.no_grad():
        decoded = model.decode(ours)
    assert decoded.shape == (2, 3, SIZE, SIZE) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, images, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_without_t5_equals_pipeline_without_t5(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    model = load_sd3(str(sd3_dir), dtype="float32", height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ,
                     use_t5=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=MAX_SEQ)
    cond = model.encode_prompts(PROMPTS)
    assert torch.all(cond["prompt_embeds"][:, 77:] == 0)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled"], pooled, rtol=0, atol=0)


def test_bf16_velocity_close_to_fp32(sd3_dir, model):
    bf16 = load_sd3(str(sd3_dir), dtype="bfloat16", height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    assert bf16.denoiser.dtype == torch.bfloat16
    x, sigma = torch.randn(2, *model.latent_shape), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        v32 = model(x, sigma, model.encode_prompts(PROMPTS))
        v16 = bf16(x, sigma, bf16.encode_prompts(PROMPTS))
    assert v16.dtype == torch.float32  # the adapter returns x's dtype: step math stays in float32
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()


def test_bad_inputs_name_the_fix(sd3_dir, tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_sd3(str(tmp_path))
    with pytest.raises(ValueError, match="multiples of 4"):
        load_sd3(str(sd3_dir), dtype="float32", height=30, width=32)
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_sd3(str(sd3_dir), dtype="float8")


def test_long_prompt_truncated_with_warning(model):
    with pytest.warns(UserWarning, match="truncated to 24"):
        cond = model.encode_prompts(["a very long prompt about many red cubes and blue spheres"])
    assert cond["prompt_embeds"].shape == (1, 77 + MAX_SEQ, 32)


@torch.no_grad()
def test_rollout_ode_plan_equals_pipeline(sd3_dir, model):
    """mixgrpo's rollout with the SDE off (plan of ODE steps, CFG in one batch) equals the stock pipeline."""
    from diffusers import StableDiffusion3Pipeline

    from mixgrpo.plan import SamplerConfig, build_plan
    from mixgrpo.rollout import sample

    plan = build_plan(SamplerConfig(num_steps=6, shift=3.0, sde_steps="none", train_steps="none"))
    sigmas = [s.sigma for s in plan.steps]
    seeds, scale = [11, 12], 4.5
    ours = sample(model, plan, model.encode_prompts(PROMPTS), seeds, uncond=model.encode_prompts(["", ""]),
                  guidance_scale=scale)
    noise = torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    # Shift 1: the scheduler takes our (already shifted) grid as is.
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, shift=1.0)
    expected = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=len(sigmas), sigmas=sigmas,
                    guidance_scale=scale, latents=noise, max_sequence_length=MAX_SEQ, output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], torch.tensor(sigmas, dtype=torch.float32))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
