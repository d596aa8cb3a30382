"""FLUX.1-Kontext: on a tiny random FluxKontextPipeline saved to disk and loaded through `load_flux_kontext`, mixgrpo's
ODE rollout (with and without true CFG) equals the stock pipeline's latents and images for the same noise and input
images, and a LoRA or a full transformer we save loads into the stock pipeline and reproduces our samples."""

import pytest
import torch

from mixgrpo.models import MODELS
from mixgrpo.models.flux import pack, unpack
from mixgrpo.models.flux_kontext import FluxKontextAdapter, load_flux_kontext
from mixgrpo.models.lora import apply_lora, lora_parameters, save_full, save_lora
from mixgrpo.plan import ode_plan
from mixgrpo.rollout import sample
from tiny_pipelines import save_tiny_flux_kontext

SIZE, MAX_SEQ, GUIDANCE = 32, 24, 2.5  # 32 px -> latents [16, 16, 16] -> 64 tokens, and 64 more of the input
PROMPTS = ["make the cube red", "add a blue sphere"]


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return save_tiny_flux_kontext(tmp_path_factory.mktemp("kontext") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def model(kontext_dir):
    return load(kontext_dir)


def load(path, **kw):
    return load_flux_kontext(str(path), **{"dtype": "float32", "height": SIZE, "width": SIZE, "guidance": GUIDANCE,
                                           "max_sequence_length": MAX_SEQ, **kw})


def inputs(seed=0, n=2):
    """n input images [3, SIZE, SIZE] as an image file gives them: k / 255."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float() / 255 for _ in range(n)]


def stock(path, sigmas, transformer=None):
    """The stock pipeline, its scheduler taking mixgrpo's sigmas as they are (no dynamic shift)."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(path, local_files_only=True,
                                               **({"transformer": transformer} if transformer is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0)
    return pipe


def run_stock(pipe, images, noise, sigmas, output_type="latent", scale=1.0):
    """FluxKontextPipeline on a batch (one input image per prompt), sized as the adapter is (no snapping)."""
    out = pipe(image=torch.stack(images), prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=len(sigmas),
               sigmas=sigmas, guidance_scale=GUIDANCE, latents=pack(noise, 2), max_sequence_length=MAX_SEQ,
               output_type=output_type, max_area=SIZE * SIZE, _auto_resize=False,
               **({"negative_prompt": [""] * len(PROMPTS), "true_cfg_scale": scale} if scale > 1 else {}))
    return out.images


def ours(model, images, seeds, steps=4, scale=1.0):
    examples = [(image,) for image in images]
    uncond = model.encode_prompts([""] * len(PROMPTS), examples) if scale > 1 else None
    return sample(model, ode_plan(steps, 3.0), model.encode_prompts(PROMPTS, examples), seeds, uncond, scale)


def noise_of(model, seeds):
    return torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def sigmas_of(steps=4):
    return [s.sigma for s in ode_plan(steps, 3.0).steps]


def test_registered_and_conditioning(model):
    assert MODELS.get("flux_kontext") is load_flux_kontext
    assert isinstance(model, FluxKontextAdapter) and model.image_inputs == 1
    assert model.latent_shape == (16, 16, 16)
    assert model.image_size() == (SIZE, SIZE) and MODELS.spec("flux_kontext").image_inputs == 1
    cond = model.encode_prompts(PROMPTS, [(image,) for image in inputs()])
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 32) and cond["image_latents"].shape == (2, 16, 16, 16)
    with pytest.raises(ValueError, match="was given none: give prompts with images"):
        model.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="takes 1 to 1 input images per example"):
        model.encode_prompts(PROMPTS[:1], [tuple(inputs())])


@pytest.mark.parametrize("scale", [1.0, 2.0])
@torch.no_grad()
def test_rollout_ode_plan_equals_pipeline(kontext_dir, model, scale):
    """mixgrpo.rollout.sample with the SDE off equals FluxKontextPipeline for the same noise, sigmas and input
    images (scale > 1: true CFG against "" with the same images): latents and decoded images to 1e-5."""
    images, seeds = inputs(), [11, 12]
    latents = ours(model, images, seeds, scale=scale)
    pipe = stock(kontext_dir, sigmas_of())
    expected = run_stock(pipe, images, noise_of(model, seeds), sigmas_of(), scale=scale)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], torch.tensor(sigmas_of(), dtype=torch.float32))
    torch.testing.assert_close(pack(latents, 2), expected, rtol=1e-5, atol=1e-5)
    assert (latents - noise_of(model, seeds)).abs().mean() > 0.1  # the rollout moved the latents
    decoded = model.decode(latents)
    pictures = run_stock(pipe, images, noise_of(model, seeds), sigmas_of(), output_type="pt", scale=scale)
    assert decoded.shape == (2, 3, SIZE, SIZE) == pictures.shape
    torch.testing.assert_close(decoded, pictures, rtol=1e-5, atol=1e-5)
    other = ours(model, inputs(seed=1), seeds, scale=scale)
    assert (other - latents).abs().max() > 1e-3  # the input image conditions the result


@pytest.mark.parametrize("kind", ["lora", "full"])
@torch.no_grad()
def test_exports_load_into_the_stock_pipeline_and_reproduce_our_samples(kontext_dir, tmp_path, kind):
    """A LoRA (alpha != rank, random non-zero weights) or a full transformer (perturbed) saved by us: the stock
    pipeline with it loaded by diffusers alone samples what we sample."""
    from diffusers import FluxTransformer2DModel

    model = load(kontext_dir)
    g = torch.Generator().manual_seed(0)
    if kind == "lora":
        apply_lora(model.denoiser, rank=4, alpha=8)
        params = lora_parameters(model.denoiser)
    else:
        params = list(model.denoiser.parameters())
    for p in params:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
    images, seeds = inputs(seed=2), [5, 6]
    latents = ours(model, images, seeds, steps=3)
    if kind == "lora":
        save_lora(model, tmp_path / "lora")
        pipe = stock(kontext_dir, sigmas_of(3))
        before = run_stock(pipe, images, noise_of(model, seeds), sigmas_of(3))
        pipe.load_lora_weights(tmp_path / "lora")
    else:
        save_full(model.denoiser, tmp_path / "full")
        before = run_stock(stock(kontext_dir, sigmas_of(3)), images, noise_of(model, seeds), sigmas_of(3))
        pipe = stock(kontext_dir, sigmas_of(3), FluxTransformer2DModel.from_pretrained(tmp_path / "full"))
    after = run_stock(pipe, images, noise_of(model, seeds), sigmas_of(3))
    torch.testing.assert_close(after, pack(latents, 2), rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-3  # the export changed the samples
    assert unpack(after, model.latent_shape, 2).shape == latents.shape


def test_preflight_names_a_size_that_does_not_fit(kontext_dir):
    args = {"path": str(kontext_dir), "height": 42, "width": SIZE}
    (problem,) = MODELS.spec("flux_kontext").check(args, {})
    assert "multiples of 4 for flux_kontext" in problem and "height=40" in problem  # the nearest fit
    assert MODELS.spec("flux_kontext").check({**args, "height": SIZE}, {}) == []


@pytest.mark.parametrize("objective,lora", [("grpo", 4), ("diffusion_nft", 0)])
def test_an_iteration_exports_what_the_stock_pipeline_reproduces(kontext_dir, tmp_path, objective, lora):
    """One MixGRPO (LoRA) or DiffusionNFT (full) iteration through the trainer on examples with input images, rewarded
    for keeping the input; then the stock FluxKontextPipeline with final/ loaded by diffusers alone samples what
    mixgrpo samples."""
    from model_runs import PROMPTS, grpo_run, inputs_of, noise, our_samples, sigmas, with_final

    args = {"path": str(kontext_dir), "dtype": "float32", "height": SIZE, "width": SIZE, "guidance": GUIDANCE,
            "max_sequence_length": MAX_SEQ}
    run = grpo_run(tmp_path / "run", "flux_kontext", args, lora, 1.0, inputs=(SIZE, SIZE), objective=objective,
                   reward="toy_rewards:keep_input")
    images, seeds = inputs_of(run, 2, (SIZE, SIZE)), [3, 4]
    latents = our_samples(run, PROMPTS[:2], seeds, 1.0, images)
    pipe = with_final(stock(kontext_dir, sigmas()), run, lora)
    with torch.no_grad():
        expected = pipe(image=torch.stack([i[0] for i in images]), prompt=PROMPTS[:2], height=SIZE, width=SIZE,
                        num_inference_steps=len(sigmas()), sigmas=sigmas(), guidance_scale=GUIDANCE,
                        latents=pack(noise(latents.shape[1:], seeds), 2), max_sequence_length=MAX_SEQ,
                        output_type="latent", max_area=SIZE * SIZE, _auto_resize=False).images
    torch.testing.assert_close(expected, pack(latents, 2), rtol=1e-5, atol=1e-5)


def test_preprocess_of_an_example_file_caches_the_instructions(kontext_dir, model, tmp_path):
    """Kontext's text encoders see no image: `mixgrpo preprocess` on an example file (instruction + input image)
    writes a cache keyed by prompt, and the model with it conditions exactly as without (the VAE encodes the images)."""
    from mixgrpo import cli
    from mixgrpo.models.text import EmbeddingCache
    from model_runs import PROMPTS, example_file, inputs_of

    examples = example_file(tmp_path / "run_examples", (SIZE, SIZE))
    assert cli.main(["preprocess", "--model", "flux_kontext", "--path", str(kontext_dir), "--prompts", str(examples),
                     "--out", str(tmp_path / "cache"), "--dtype", "float32", "--device", "cpu",
                     "--max-sequence-length", str(MAX_SEQ)]) == 0
    assert EmbeddingCache(tmp_path / "cache").keyed_by == "prompt"
    cached = load(kontext_dir, embedding_cache=str(tmp_path / "cache"))
    images = inputs_of(tmp_path / "run", 2, (SIZE, SIZE))
    with torch.no_grad():
        for prompts in (PROMPTS[:2], ["", PROMPTS[1]]):
            torch.testing.assert_close(cached.encode_prompts(prompts, images), model.encode_prompts(prompts, images),
                                       rtol=0, atol=0)


def test_the_memory_estimate_counts_the_input_tokens(kontext_dir):
    """The activations of the estimate count the input image's tokens beside the target's (64 + 64) and the text."""
    from mixgrpo.config import build_config
    from mixgrpo.memory import estimate

    args = {"path": str(kontext_dir), "dtype": "float32", "height": SIZE, "width": SIZE, "max_sequence_length": MAX_SEQ}
    (key,) = [k for k in estimate(build_config({"model": {"name": "flux_kontext", "args": args}})).parts
              if k.startswith("activations")]
    assert f" x {64 + 64 + MAX_SEQ} tokens x " in key
