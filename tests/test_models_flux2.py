"""FLUX.2 dev and klein: on tiny random pipelines saved to disk and loaded through `load_flux2`, mixgrpo's ODE rollout
equals the stock Flux2Pipeline (distilled guidance) and Flux2KleinPipeline (true CFG): latents and images; the text
encodings and their cache equal the pipelines'; what a GRPO run exports loads into the stock pipeline and reproduces
our samples."""

import pytest
import torch

from mixgrpo.models import MODELS
from mixgrpo.models.flux2 import LORA_TARGETS, Flux2Adapter, latent_ids, load_flux2, text_ids
from mixgrpo.plan import ode_plan
from mixgrpo.rollout import sample
from tiny_pipelines import save_tiny_flux2

SIZE, MAX_SEQ = 32, 160  # 32 px -> latents [16, 8, 8]; the byte tokenizers need room for the system message
PROMPTS = ["a red cube on a table", "two blue spheres"]
GUIDANCE = {"dev": 4.0, "klein": 4.0}  # dev: the guidance embedding's value; klein: true CFG (the pipelines' default)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {v: save_tiny_flux2(root / v, seed=0, variant=v) for v in ("dev", "klein")}


def load(path, **kw):
    return load_flux2(str(path), **{"dtype": "float32", "height": SIZE, "width": SIZE, "max_sequence_length": MAX_SEQ,
                                    **kw})


def stock(path):
    """The stock pipeline (the class of model_index.json), its scheduler taking mixgrpo's sigmas as they are."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0)
    return pipe


def run_stock(pipe, noise, sigmas, output_type="latent"):
    return pipe(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=len(sigmas), sigmas=sigmas,
                guidance_scale=4.0, latents=noise, max_sequence_length=MAX_SEQ, output_type=output_type).images


def as_stock_latents(model, latents):
    """Our latents in the form the pipeline's output_type="latent" returns: dev packed tokens [B, h w, C]; klein
    the VAE's latents (BatchNorm undone, patches put back)."""
    from diffusers import Flux2Pipeline

    if model.guidance is not None:
        return latents.flatten(2).transpose(1, 2)
    bn = model.decoder.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + model.decoder.vae.config.batch_norm_eps)
    return Flux2Pipeline._unpatchify_latents(latents * std + bn.running_mean.view(1, -1, 1, 1))


def noise_of(model, seeds):
    return torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def our_rollout(model, plan, seeds, variant):
    cfg = {} if variant == "dev" else {"uncond": model.encode_prompts(["", ""]), "guidance_scale": GUIDANCE["klein"]}
    return sample(model, plan, model.encode_prompts(PROMPTS), seeds, **cfg)


def test_registered_shapes_and_ids(dirs):
    assert MODELS.get("flux2") is load_flux2
    dev, klein = load(dirs["dev"]), load(dirs["klein"])
    assert isinstance(dev, Flux2Adapter) and dev.guidance == 4.0 and klein.guidance is None
    assert dev.latent_shape == klein.latent_shape == (16, 8, 8)
    assert dev.encode_prompts(PROMPTS)["prompt_embeds"].shape == (2, MAX_SEQ, 48)  # 3 layers x width 16
    from diffusers import Flux2Pipeline

    torch.testing.assert_close(latent_ids(8, 8), Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 16, 8, 8))[0])
    torch.testing.assert_close(text_ids(5), Flux2Pipeline._prepare_text_ids(torch.zeros(1, 5, 3))[0])


@pytest.mark.parametrize("variant", ["dev", "klein"])
@torch.no_grad()
def test_encoding_equals_pipeline(dirs, variant):
    model, pipe = load(dirs[variant]), stock(dirs[variant])
    embeds, ids = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)
    torch.testing.assert_close(model.encode_prompts(PROMPTS)["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(text_ids(MAX_SEQ), ids[0].cpu())
    empty, _ = pipe.encode_prompt("", max_sequence_length=MAX_SEQ)  # klein's negative prompt
    torch.testing.assert_close(model.encode_prompts([""])["prompt_embeds"], empty, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["dev", "klein"])
@torch.no_grad()
def test_rollout_ode_plan_equals_pipeline(dirs, variant):
    """mixgrpo.rollout.sample with the SDE off equals the stock pipeline for the same noise and sigmas: dev with its
    distilled guidance, klein with true CFG against "" (latents to 1e-5 in float32, and the images)."""
    model = load(dirs[variant])
    plan = ode_plan(6, 3.0)
    sigmas = [s.sigma for s in plan.steps]
    seeds = [11, 12]
    ours = our_rollout(model, plan, seeds, variant)
    pipe = stock(dirs[variant])
    expected = run_stock(pipe, noise_of(model, seeds), sigmas)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], torch.tensor(sigmas, dtype=torch.float32))
    torch.testing.assert_close(as_stock_latents(model, ours), expected, rtol=1e-5, atol=1e-5)
    assert (ours - noise_of(model, seeds)).abs().mean() > 0.1
    images = run_stock(pipe, noise_of(model, seeds), sigmas, output_type="pt")
    decoded = model.decode(ours)
    assert decoded.shape == (2, 3, SIZE, SIZE) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, images, rtol=1e-5, atol=1e-5)
    if variant == "dev":  # the guidance value reaches the transformer
        model.guidance = 1.0
        assert (our_rollout(model, plan, seeds, variant) - ours).abs().max() > 1e-3
    else:  # and CFG changed klein's result: the comparison is not vacuous
        assert (sample(model, plan, model.encode_prompts(PROMPTS), seeds) - ours).abs().max() > 1e-3


def test_bad_inputs_name_the_fix(dirs, tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_flux2(str(tmp_path))
    with pytest.raises(ValueError, match="multiples of 4"):
        load(dirs["klein"], height=30)
    with pytest.raises(ValueError, match="klein, which has no guidance embedding: drop model.args.guidance"):
        load(dirs["klein"], guidance=3.5)
    from tiny_pipelines import save_tiny_flux

    with pytest.raises(ValueError, match="holds a FluxPipeline .* not a FLUX.2 pipeline"):
        load_flux2(str(save_tiny_flux(tmp_path / "flux1")))


@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_preprocess_cache_reproduces_the_text_encoder(dirs, tmp_path, variant):
    from mixgrpo import cli

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    assert cli.main(["preprocess", "--model", "flux2", "--path", str(dirs[variant]), "--prompts",
                     str(tmp_path / "p.txt"), "--out", str(tmp_path / "cache"), "--dtype", "float32",
                     "--device", "cpu", "--max-sequence-length", str(MAX_SEQ)]) == 0
    cached, model = load(dirs[variant], embedding_cache=str(tmp_path / "cache")), load(dirs[variant])
    for batch in (PROMPTS, ["", PROMPTS[1]]):  # every prompt padded to max_sequence_length: batch-independent
        torch.testing.assert_close(cached.encode_prompts(batch), model.encode_prompts(batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant,lora", [("klein", 0), ("klein", 4), ("dev", 4)])
def test_a_grpo_iteration_exports_what_the_stock_pipeline_reproduces(dirs, tmp_path, variant, lora):
    """One MixGRPO iteration through the trainer (full or LoRA; klein with true CFG, dev with its distilled
    guidance), then the stock pipeline with final/ loaded by diffusers alone samples what mixgrpo samples."""
    from model_runs import grpo_run, noise, our_samples, sigmas, with_final

    scale = GUIDANCE["klein"] if variant == "klein" else 1.0
    args = {"path": str(dirs[variant]), "dtype": "float32", "height": SIZE, "width": SIZE,
            "max_sequence_length": MAX_SEQ}
    run = grpo_run(tmp_path / "run", "flux2", args, lora, scale, targets=list(LORA_TARGETS))
    seeds = [3, 4]
    ours = our_samples(run, PROMPTS, seeds, scale)
    pipe = with_final(stock(dirs[variant]), run, lora)
    with torch.no_grad():
        expected = run_stock(pipe, noise(ours.shape[1:], seeds), sigmas())
    torch.testing.assert_close(expected, as_stock_latents(load(dirs[variant]), ours), rtol=1e-5, atol=1e-5)
