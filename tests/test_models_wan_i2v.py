"""Wan image-to-video: on tiny random WanImageToVideoPipelines (Wan 2.1 I2V's layout with a CLIP vision encoder, Wan 2.2
TI2V-5B's and I2V-A14B's) saved to disk and loaded through `load_wan_i2v`, mixgrpo's ODE rollout with true CFG equals the
stock pipeline's latents and videos for the same noise and first frames, and a LoRA or a full transformer we save
loads into the stock pipeline and reproduces our samples."""

import pytest
import torch

from mixgrpo.models import MODELS
from mixgrpo.models.lora import apply_lora, lora_parameters, save_full, save_lora
from mixgrpo.models.wan import LORA_TARGETS
from mixgrpo.models._diffusers import to_pil
from mixgrpo.models.wan_i2v import WanI2VAdapter, load_wan_i2v
from mixgrpo.plan import ode_plan
from mixgrpo.rollout import sample
from tiny_pipelines import WAN_I2V_VARIANTS, save_tiny_wan, save_tiny_wan_i2v

SIZE, FRAMES, MAX_SEQ = 64, 5, 24
PROMPTS = ["the cube rolls to the left", "the spheres bounce"]
SCALE = 5.0  # the pipeline's default guidance_scale


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_i2v")
    return {v: save_tiny_wan_i2v(root / v, seed=0, variant=v) for v in WAN_I2V_VARIANTS}


def load(path, **kw):
    return load_wan_i2v(str(path), dtype="float32", height=SIZE, width=SIZE, num_frames=FRAMES,
                        max_sequence_length=MAX_SEQ, **kw)


def frames(seed=0, n=2):
    """n first frames [3, SIZE, SIZE] as an image file gives them: k / 255."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float() / 255 for _ in range(n)]


def stock(path, sigmas, transformer=None):
    """The stock pipeline, its scheduler made to integrate over `sigmas` exactly (as tests/test_models_wan.py)."""
    from diffusers import WanImageToVideoPipeline
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    # diffusers 0.42's image-to-video pipeline calls ftfy even when it is not installed (its text-to-video pipeline,
    # whose cleaning the adapter uses, checks): give it that cleaning, which is the same when ftfy is installed
    pipeline_wan_i2v.basic_clean = pipeline_wan.basic_clean
    pipe = WanImageToVideoPipeline.from_pretrained(path, local_files_only=True,
                                                   **({"transformer": transformer} if transformer is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, shift=1.0)
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=sigmas, device=device)
    return pipe


def run_stock(pipe, images, noise, steps, output_type="latent"):
    """The stock pipeline, one example per call (it takes one image for a whole batch), from a PIL image as a user
    gives it."""
    return torch.cat([pipe(image=to_pil(image), prompt=[prompt], height=SIZE, width=SIZE, num_frames=FRAMES,
                           num_inference_steps=steps, guidance_scale=SCALE, max_sequence_length=MAX_SEQ,
                           latents=noise[i:i + 1], output_type=output_type).frames
                      for i, (prompt, image) in enumerate(zip(PROMPTS, images))])


def ours(model, images, seeds, steps=4):
    examples = [(image,) for image in images]
    return sample(model, ode_plan(steps, 3.0), model.encode_prompts(PROMPTS, examples), seeds,
                  model.encode_prompts([""] * len(PROMPTS), examples), SCALE)


def noise_of(model, seeds):
    return torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def sigmas_of(steps=4):
    return [s.sigma for s in ode_plan(steps, 3.0).steps]


def test_registered_and_conditioning(dirs):
    assert MODELS.get("wan_i2v") is load_wan_i2v
    model = load(dirs["2.1"])
    assert isinstance(model, WanI2VAdapter) and model.image_inputs == 1 and model.latent_shape == (16, 2, 8, 8)
    cond = model.encode_prompts(PROMPTS, [(f,) for f in frames()])
    assert cond["image_condition"].shape == (2, 20, 2, 8, 8)  # 4 mask channels, then the 16 latent channels
    assert torch.equal(cond["image_condition"][:, :4, 0], torch.ones(2, 4, 8, 8))
    assert not cond["image_condition"][:, :4, 1:].any()
    assert cond["image_embeds"].shape == (2, 17, 16)          # CLIP's penultimate states: 16 patches + class
    ti2v = load(dirs["2.2-ti2v"])
    assert ti2v.image_encoder is None and ti2v.latent_shape == (16, 2, 4, 4)
    assert set(ti2v.encode_prompts(PROMPTS, [(f,) for f in frames()])) == {"prompt_embeds", "image_condition"}
    assert model.image_size() == (SIZE, SIZE) and MODELS.spec("wan_i2v").image_inputs == 1
    with pytest.raises(ValueError, match="was given none: give prompts with images"):
        model.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match=r"takes \[3, 64, 64\] .* resize the inputs"):
        model.encode_prompts(PROMPTS[:1], [(torch.zeros(3, 32, 64),)])


def test_a_text_to_video_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="text-to-video checkpoint\\? Use model `wan`"):
        load(save_tiny_wan(tmp_path / "t2v"))


@pytest.mark.parametrize("variant", WAN_I2V_VARIANTS)
@torch.no_grad()
def test_rollout_ode_plan_with_cfg_equals_pipeline(dirs, variant):
    """mixgrpo.rollout.sample with the SDE off equals WanImageToVideoPipeline for the same noise, sigmas and first
    frames (true CFG, the negative prompt with the same frame): latents and decoded videos to 1e-5 in float32."""
    model = load(dirs[variant])
    images, seeds = frames(), [11, 12]
    latents = ours(model, images, seeds)
    pipe = stock(dirs[variant], sigmas_of())
    expected = run_stock(pipe, images, noise_of(model, seeds), 4)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], torch.tensor(sigmas_of(), dtype=torch.float32))
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    assert (latents - noise_of(model, seeds)).abs().mean() > 0.1  # the rollout moved the latents
    videos = run_stock(pipe, images, noise_of(model, seeds), 4, output_type="pt")
    decoded = model.decode(latents)
    assert decoded.shape == (2, FRAMES, 3, SIZE, SIZE) == videos.shape
    torch.testing.assert_close(decoded, videos, rtol=1e-5, atol=1e-5)
    other = ours(model, frames(seed=1), seeds)
    assert (other - latents)[:, :, 1:].abs().max() > 1e-3  # the first frame conditions the rest of the video
    if variant == "2.2-a14b":  # the low-noise expert took part: with it replaced by the first, the result moves
        model.transformer_2 = model.transformer
        assert (ours(model, images, seeds) - latents).abs().max() > 1e-3


# diffusers fills in zero LoRA layers for the image cross-attention (add_k_proj, add_v_proj) that a Wan 2.1 I2V LoRA
# lacks, and peft warns about them
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
@pytest.mark.parametrize("kind", ["lora", "full"])
@torch.no_grad()
def test_exports_load_into_the_stock_pipeline_and_reproduce_our_samples(dirs, tmp_path, kind):
    """Wan 2.1 I2V: a LoRA (alpha != rank, random non-zero weights) or a full transformer (perturbed) saved by us,
    loaded into WanImageToVideoPipeline by diffusers alone, samples what we sample."""
    from diffusers import WanTransformer3DModel

    model = load(dirs["2.1"])
    g = torch.Generator().manual_seed(0)
    if kind == "lora":
        apply_lora(model.denoiser, rank=4, alpha=8, target_modules=LORA_TARGETS)
        params = lora_parameters(model.denoiser)
    else:
        params = list(model.denoiser.parameters())
    for p in params:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
    images, seeds = frames(seed=2), [5, 6]
    latents = ours(model, images, seeds, steps=3)
    before = run_stock(stock(dirs["2.1"], sigmas_of(3)), images, noise_of(model, seeds), 3)
    if kind == "lora":
        save_lora(model, tmp_path / "lora")
        pipe = stock(dirs["2.1"], sigmas_of(3))
        pipe.load_lora_weights(tmp_path / "lora")
    else:
        save_full(model.denoiser, tmp_path / "full")
        pipe = stock(dirs["2.1"], sigmas_of(3), WanTransformer3DModel.from_pretrained(tmp_path / "full"))
    after = run_stock(pipe, images, noise_of(model, seeds), 3)
    torch.testing.assert_close(after, latents, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-3  # the export changed the samples


def test_preflight_names_a_missing_image_encoder(dirs, tmp_path):
    import shutil

    check = MODELS.spec("wan_i2v").check
    args = {"path": str(dirs["2.1"]), "height": SIZE, "width": SIZE, "num_frames": FRAMES}
    assert check(args, {}) == [] and check({**args, "path": str(dirs["2.2-ti2v"])}, {}) == []
    shutil.copytree(dirs["2.1"], tmp_path / "copy", ignore=shutil.ignore_patterns("image_encoder"))
    (problem,) = check({**args, "path": str(tmp_path / "copy")}, {})
    assert "lacks ['image_encoder']" in problem


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")  # as above
@pytest.mark.parametrize("objective,lora", [("grpo", 4), ("diffusion_nft", 0)])
def test_an_iteration_exports_what_the_stock_pipeline_reproduces(dirs, tmp_path, objective, lora):
    """Wan 2.1 I2V: one MixGRPO (LoRA) or DiffusionNFT (full) iteration through the trainer on prompts with first
    frames (CFG 5); then the stock WanImageToVideoPipeline with final/ loaded by diffusers alone samples what mixgrpo
    samples."""
    from model_runs import PROMPTS, grpo_run, inputs_of, noise, our_samples, sigmas, with_final

    args = {"path": str(dirs["2.1"]), "dtype": "float32", "height": SIZE, "width": SIZE, "num_frames": FRAMES,
            "max_sequence_length": MAX_SEQ}
    run = grpo_run(tmp_path / "run", "wan_i2v", args, lora, SCALE, inputs=(SIZE, SIZE), objective=objective,
                   targets=list(LORA_TARGETS))
    images, seeds = inputs_of(run, 2, (SIZE, SIZE)), [3, 4]
    latents = our_samples(run, PROMPTS[:2], seeds, SCALE, images)
    pipe = with_final(stock(dirs["2.1"], sigmas()), run, lora)
    with torch.no_grad():
        expected = torch.cat([pipe(image=to_pil(example[0]), prompt=[prompt], height=SIZE, width=SIZE,
                                   num_frames=FRAMES, num_inference_steps=len(sigmas()), guidance_scale=SCALE,
                                   max_sequence_length=MAX_SEQ, latents=noise(latents.shape[1:], [seed]),
                                   output_type="latent").frames
                              for prompt, example, seed in zip(PROMPTS, images, seeds)])
    torch.testing.assert_close(expected, latents, rtol=1e-5, atol=1e-5)
