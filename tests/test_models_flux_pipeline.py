"""FLUX.1 loader: a plain Euler loop over our FluxAdapter reproduces the stock FluxPipeline."""

import pytest
import torch

from mixgrpo.models import MODELS, cond_cat
from mixgrpo.models.flux import FluxAdapter, pack, unpack
from mixgrpo.models.flux_pipeline import load_flux

from tiny_pipelines import save_tiny_flux

SIZE = 32            # pixels; latents [16, 16, 16] (VAE factor 2), packed into 64 tokens of 64 channels
MAX_SEQ = 24         # T5 tokens (the prompts fit: no truncation)
GUIDANCE = 3.5       # FLUX.1-dev's distilled guidance
PROMPTS = ["a red cube on a table", "two blue spheres"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def model(flux_dir):
    return load_flux(str(flux_dir), dtype="float32", height=SIZE, width=SIZE, guidance=GUIDANCE,
                     max_sequence_length=MAX_SEQ)


@pytest.fixture(scope="module")
def pipe(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler(model, x, sigmas, cond, uncond=None, scale=1.0):
    """x <- x + (sigma' - sigma) v; with uncond, v = v_u + s (v_c - v_u) with cond and uncond in one batch."""
    b = x.shape[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if uncond is None:
            v = model(x, sigma.expand(b), cond)
        else:
            v_both = model(torch.cat([x, x]), sigma.expand(2 * b), cond_cat([uncond, cond]))
            v = v_both[:b] + scale * (v_both[b:] - v_both[:b])
        x = x + (sigma_next - sigma) * v
    return x


def run_pipeline(pipe, noise, steps, **kw):
    """The stock pipeline from our [B, C, H, W] noise (packed as FLUX packs it); returns its output and sigmas."""
    out = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=GUIDANCE,
               max_sequence_length=MAX_SEQ, latents=pack(noise, 2), sigmas=[1.0, 0.75, 0.5, 0.25][:steps], **kw)
    return out.images, pipe.scheduler.sigmas.clone()


def test_registered_and_shapes(model):
    assert MODELS.get("flux") is load_flux
    assert isinstance(model, FluxAdapter)
    assert model.latent_shape == (16, 16, 16) and model.guidance == GUIDANCE
    cond = model.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 32)  # T5 states
    assert cond["pooled"].shape == (2, 16)                  # CLIP pooled output


@torch.no_grad()
def test_encoding_equals_pipeline(model, pipe):
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)
    cond = model.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled"], pooled, rtol=0, atol=0)
    assert torch.all(text_ids == 0)


@torch.no_grad()
def test_euler_equals_pipeline(model, pipe):
    torch.manual_seed(1)
    noise = torch.randn(2, *model.latent_shape)
    expected, sigmas = run_pipeline(pipe, noise, steps=4, output_type="latent")
    # FLUX's dynamic shift moved the given sigmas; integrate over exactly the grid the scheduler used.
    assert len(sigmas) == 5 and sigmas[-1] == 0 and sigmas[1] != 0.75
    ours = euler(model, noise, sigmas, model.encode_prompts(PROMPTS))
    torch.testing.assert_close(pack(ours, 2), expected, rtol=1e-5, atol=1e-5)
    assert (ours - noise).abs().mean() > 0.1  # the loop actually moved the latents

    images, _ = run_pipeline(pipe, noise, steps=4, output_type="pt")
    decoded = model.decode(unpack(expected, model.latent_shape, 2))
    assert decoded.shape == (2, 3, SIZE, SIZE) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, images, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_true_cfg_equals_pipeline(model, pipe):
    """Real CFG against the empty prompt (the rollout's uncond) equals the pipeline's true_cfg_scale path."""
    torch.manual_seed(2)
    noise = torch.randn(2, *model.latent_shape)
    scale = 2.0
    expected, sigmas = run_pipeline(pipe, noise, steps=3, output_type="latent", negative_prompt=["", ""],
                                    true_cfg_scale=scale)
    ours = euler(model, noise, sigmas, model.encode_prompts(PROMPTS), model.encode_prompts(["", ""]), scale)
    torch.testing.assert_close(pack(ours, 2), expected, rtol=1e-5, atol=1e-5)
    without_cfg = euler(model, noise, sigmas, model.encode_prompts(PROMPTS))
    assert (without_cfg - ours).abs().max() > 1e-3  # CFG changed the result: the comparison is not vacuous


def test_schnell_layout_needs_no_guidance(tmp_path):
    path = save_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    with pytest.raises(ValueError, match="guidance"):
        load_flux(str(path), dtype="float32", height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    model = load_flux(str(path), dtype="float32", height=SIZE, width=SIZE, guidance=None,
                      max_sequence_length=MAX_SEQ)
    assert model.guidance is None


def test_bad_inputs_name_the_fix(flux_dir, tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_flux(str(tmp_path))
    with pytest.raises(ValueError, match="multiples of 4"):
        load_flux(str(flux_dir), dtype="float32", height=32, width=34)


def test_reference_copy_shares_the_text_encoder(flux_dir, model):
    """A frozen reference model (KL term) reuses the policy's text encoder instead of loading T5 again."""
    ref = load_flux(str(flux_dir), dtype="float32", height=SIZE, width=SIZE, guidance=GUIDANCE,
                    text_encoder=model.text_encoder)
    assert ref.text_encoder is model.text_encoder and ref.transformer is not model.transformer
    x = torch.randn(1, *model.latent_shape)
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS[:1])
        torch.testing.assert_close(ref(x, torch.tensor([0.5]), cond), model(x, torch.tensor([0.5]), cond))
    with pytest.raises(ValueError, match="not both"):
        load_flux(str(flux_dir), text_encoder=model.text_encoder, embedding_cache="cache")


@torch.no_grad()
def test_rollout_ode_plan_equals_pipeline(flux_dir, model):
    """mixgrpo's rollout with the SDE off (plan of ODE steps, static shift 3) equals the stock FluxPipeline."""
    from diffusers import FluxPipeline

    from mixgrpo.plan import SamplerConfig, build_plan
    from mixgrpo.rollout import sample

    plan = build_plan(SamplerConfig(num_steps=6, shift=3.0, sde_steps="none", train_steps="none"))
    sigmas = [s.sigma for s in plan.steps]
    seeds = [11, 12]
    ours = sample(model, plan, model.encode_prompts(PROMPTS), seeds)
    noise = torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    # No dynamic shift, shift 1: the scheduler takes our (already shifted) grid as is.
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0)
    expected = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=len(sigmas), sigmas=sigmas,
                    guidance_scale=GUIDANCE, latents=pack(noise, 2), max_sequence_length=MAX_SEQ,
                    output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], torch.tensor(sigmas, dtype=torch.float32))
    torch.testing.assert_close(pack(ours, 2), expected, rtol=1e-5, atol=1e-5)
