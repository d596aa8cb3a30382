"""Qwen-Image-Edit-2509 / 2511: on tiny random QwenImageEditPlusPipelines (a Qwen2.5-VL whose vision tower sees the
input images) saved to disk and loaded through `load_qwen_image_edit`, the VL encoding equals the pipeline's, mixgrpo's
ODE rollout with true CFG equals the stock pipeline's latents and images for the same noise and input images (one
and two inputs), and a LoRA or a full transformer we save loads into the stock pipeline and reproduces our samples."""

import pytest
import torch

from mixgrpo.models import MODELS
from mixgrpo.models._diffusers import to_pil
from mixgrpo.models.flux import pack
from mixgrpo.models.lora import apply_lora, lora_parameters, save_full, save_lora
from mixgrpo.models.qwen_image import LORA_TARGETS
from mixgrpo.models.qwen_image_edit import QwenImageEditAdapter, load_qwen_image_edit
from mixgrpo.plan import ode_plan
from mixgrpo.rollout import sample
from tiny_pipelines import QWEN_EDIT_VARIANTS, load_tiny_qwen_vl_processor, save_tiny_qwen_image_edit

# 64 px -> latents [16, 8, 8] -> 16 tokens. The pipeline resizes the inputs to fixed areas (384^2 for the VL encoder,
# 1024^2 for the VAE); the tiny models use 56^2 (64 x 64 after its multiple-of-32 rounding, 4 merged vision tokens)
# and 64^2, given to both the pipeline (its module constants) and the adapter (condition_area, reference_area).
SIZE, MAX_SEQ, CONDITION_AREA, REFERENCE_AREA = 64, 512, 56 * 56, 64 * 64
PROMPTS = ["make the cube red", "add a blue sphere"]
SCALE = 4.0  # the pipeline's true_cfg_scale in its examples


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_edit")
    return {v: save_tiny_qwen_image_edit(root / v, seed=0, variant=v) for v in QWEN_EDIT_VARIANTS}


@pytest.fixture(autouse=True)
def tiny_areas(monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock_module

    monkeypatch.setattr(stock_module, "CONDITION_IMAGE_SIZE", CONDITION_AREA)
    monkeypatch.setattr(stock_module, "VAE_IMAGE_SIZE", REFERENCE_AREA)


def load(path, **kw):
    return load_qwen_image_edit(str(path), **{"dtype": "float32", "height": SIZE, "width": SIZE,
                                              "max_sequence_length": MAX_SEQ, "condition_area": CONDITION_AREA,
                                              "reference_area": REFERENCE_AREA, **kw})


def inputs(seed=0, n=2):
    """n input images [3, SIZE, SIZE] as an image file gives them: k / 255."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float() / 255 for _ in range(n)]


def stock(path, transformer=None):
    """The stock pipeline, its scheduler taking mixgrpo's sigmas as they are (no dynamic or terminal shift)."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(path, local_files_only=True,
                                                     processor=load_tiny_qwen_vl_processor(path),
                                                     **({"transformer": transformer} if transformer else {}))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0,
                                                shift_terminal=None)
    return pipe


def run_stock(pipe, examples, noise, sigmas, output_type="latent"):
    """The stock pipeline, one example per call (it refuses batches), from PIL images as a user gives them; true CFG
    against "" (the rollout's unconditional prompt)."""
    return torch.cat([pipe(image=[to_pil(i) for i in images], prompt=prompt, negative_prompt="", true_cfg_scale=SCALE,
                           height=SIZE, width=SIZE, num_inference_steps=len(sigmas), sigmas=sigmas,
                           latents=pack(noise[b:b + 1], 2), output_type=output_type).images
                      for b, (prompt, images) in enumerate(zip(PROMPTS, examples))])


def ours(model, examples, seeds, steps=4):
    return sample(model, ode_plan(steps, 3.0), model.encode_prompts(PROMPTS, examples), seeds,
                  model.encode_prompts([""] * len(PROMPTS), examples), SCALE)


def noise_of(model, seeds):
    return torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def sigmas_of(steps=4):
    return [s.sigma for s in ode_plan(steps, 3.0).steps]


@torch.no_grad()
def test_registered_and_the_encoding_equals_the_pipeline(dirs):
    assert MODELS.get("qwen_image_edit") is load_qwen_image_edit
    model = load(dirs["2511"])
    assert isinstance(model, QwenImageEditAdapter) and model.image_inputs == 3 and model.latent_shape == (16, 8, 8)
    pipe = stock(dirs["2511"])
    for images in ([inputs()[0]], inputs()):  # one input, two inputs ("Picture 1: ... Picture 2: ...")
        from diffusers.image_processor import VaeImageProcessor

        condition = [VaeImageProcessor().resize(to_pil(i), SIZE, SIZE) for i in images]
        embeds, mask = pipe.encode_prompt(PROMPTS[0], image=condition)
        cond = model.encode_prompts(PROMPTS[:1], [tuple(images)])
        n = embeds.shape[1]
        assert mask is None and cond["prompt_mask"].sum() == n and not cond["prompt_embeds"][:, n:].any()
        torch.testing.assert_close(cond["prompt_embeds"][:, :n], embeds, rtol=1e-5, atol=1e-5)
        assert cond["image_latents"].shape == (1, 16 * len(images), 64)
    without_image = model.encode_prompts(PROMPTS[:1], [(inputs(seed=3)[0],)])["prompt_embeds"]
    assert (without_image - model.encode_prompts(PROMPTS[:1], [(inputs()[0],)])["prompt_embeds"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="takes 1 to 3 input images per example"):
        model.encode_prompts(PROMPTS[:1], [tuple(inputs(n=4))])
    with pytest.raises(ValueError, match=r"have \[1, 2\] input images; give every example .* the same number"):
        model.encode_prompts(PROMPTS, [tuple(inputs(n=1)), tuple(inputs(n=2))])


@pytest.mark.parametrize("variant,count", [("2511", 1), ("2511", 2), ("2509", 1)])
@torch.no_grad()
def test_rollout_ode_plan_with_true_cfg_equals_pipeline(dirs, variant, count):
    """mixgrpo.rollout.sample with the SDE off equals QwenImageEditPlusPipeline for the same noise, sigmas and input
    images (true CFG rescaled to the conditional norm, "" with the same images): latents and images to 1e-5."""
    model = load(dirs[variant])
    examples = [tuple(inputs(seed=b, n=count)) for b in range(2)]
    seeds = [11, 12]
    latents = ours(model, examples, seeds)
    pipe = stock(dirs[variant])
    expected = run_stock(pipe, examples, noise_of(model, seeds), sigmas_of())
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], torch.tensor(sigmas_of(), dtype=torch.float32))
    torch.testing.assert_close(pack(latents, 2), expected, rtol=1e-5, atol=1e-5)
    assert (latents - noise_of(model, seeds)).abs().mean() > 0.1  # the rollout moved the latents
    images = run_stock(pipe, examples, noise_of(model, seeds), sigmas_of(), output_type="pt")
    decoded = model.decode(latents)
    assert decoded.shape == (2, 3, SIZE, SIZE) == images.shape
    torch.testing.assert_close(decoded, images, rtol=1e-5, atol=1e-5)
    other = ours(model, [tuple(inputs(seed=5 + b, n=count)) for b in range(2)], seeds)
    assert (other - latents).abs().max() > 1e-3  # the input images condition the result


@pytest.mark.parametrize("kind", ["lora", "full"])
@torch.no_grad()
def test_exports_load_into_the_stock_pipeline_and_reproduce_our_samples(dirs, tmp_path, kind):
    """A LoRA (alpha != rank, random non-zero weights) or a full transformer (perturbed) saved by us, loaded into
    QwenImageEditPlusPipeline by diffusers alone, samples what we sample."""
    from diffusers import QwenImageTransformer2DModel

    model = load(dirs["2511"])
    g = torch.Generator().manual_seed(0)
    if kind == "lora":
        apply_lora(model.denoiser, rank=4, alpha=8, target_modules=LORA_TARGETS)
        params = lora_parameters(model.denoiser)
    else:
        params = list(model.denoiser.parameters())
    for p in params:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
    examples, seeds = [(image,) for image in inputs(seed=2)], [5, 6]
    latents = ours(model, examples, seeds, steps=3)
    before = run_stock(stock(dirs["2511"]), examples, noise_of(model, seeds), sigmas_of(3))
    if kind == "lora":
        save_lora(model, tmp_path / "lora")
        pipe = stock(dirs["2511"])
        pipe.load_lora_weights(tmp_path / "lora")
    else:
        save_full(model.denoiser, tmp_path / "full")
        pipe = stock(dirs["2511"], QwenImageTransformer2DModel.from_pretrained(tmp_path / "full"))
    after = run_stock(pipe, examples, noise_of(model, seeds), sigmas_of(3))
    torch.testing.assert_close(after, pack(latents, 2), rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-3  # the export changed the samples


def test_preflight_refuses_an_embedding_cache_and_names_a_missing_processor(dirs, tmp_path):
    import shutil

    check = MODELS.spec("qwen_image_edit").check
    args = {"path": str(dirs["2511"]), "height": SIZE, "width": SIZE}
    assert check(args, {}) == []
    (problem,) = check({**args, "embedding_cache": "cache"}, {})
    assert "sees the input images" in problem and "drop embedding_cache" in problem
    shutil.copytree(dirs["2511"], tmp_path / "copy", ignore=shutil.ignore_patterns("processor"))
    (problem,) = check({**args, "path": str(tmp_path / "copy")}, {})
    assert "lacks the component folders ['processor']" in problem


@pytest.mark.parametrize("objective,lora", [("grpo", 4), ("diffusion_nft", 0)])
def test_an_iteration_exports_what_the_stock_pipeline_reproduces(dirs, tmp_path, objective, lora):
    """One MixGRPO (LoRA) or DiffusionNFT (full) iteration through the trainer on examples with input images (true
    CFG 4), rewarded for keeping the input; then the stock QwenImageEditPlusPipeline with final/ loaded by diffusers
    alone samples what mixgrpo samples."""
    from model_runs import PROMPTS, grpo_run, inputs_of, noise, our_samples, sigmas, with_final

    args = {"path": str(dirs["2511"]), "dtype": "float32", "height": SIZE, "width": SIZE,
            "max_sequence_length": MAX_SEQ, "condition_area": CONDITION_AREA, "reference_area": REFERENCE_AREA}
    run = grpo_run(tmp_path / "run", "qwen_image_edit", args, lora, SCALE, inputs=(SIZE, SIZE), objective=objective,
                   reward="toy_rewards:keep_input", targets=list(LORA_TARGETS))
    images, seeds = inputs_of(run, 2, (SIZE, SIZE)), [3, 4]
    latents = our_samples(run, PROMPTS[:2], seeds, SCALE, images)
    pipe = with_final(stock(dirs["2511"]), run, lora)
    with torch.no_grad():
        expected = torch.cat([pipe(image=[to_pil(i) for i in example], prompt=prompt, negative_prompt="",
                                   true_cfg_scale=SCALE, height=SIZE, width=SIZE, num_inference_steps=len(sigmas()),
                                   sigmas=sigmas(), latents=pack(noise(latents.shape[1:], [seed]), 2),
                                   output_type="latent").images
                              for prompt, example, seed in zip(PROMPTS, images, seeds)])
    torch.testing.assert_close(expected, pack(latents, 2), rtol=1e-5, atol=1e-5)


def test_the_memory_estimate_counts_the_reference_tokens(dirs):
    """The activations of the estimate count the target's tokens and one input's at the reference area: at 64 x 64
    with a 128^2 reference area, 16 + 64 image tokens beside the text."""
    from mixgrpo.config import build_config
    from mixgrpo.memory import estimate

    def tokens(**over):
        args = {"path": str(dirs["2511"]), "dtype": "float32", "height": SIZE, "width": SIZE,
                "max_sequence_length": MAX_SEQ, **over}
        (key,) = [k for k in estimate(build_config({"model": {"name": "qwen_image_edit", "args": args}})).parts
                  if k.startswith("activations")]
        return int(key.split(" rows x ")[1].split(" tokens")[0])

    assert tokens(reference_area=REFERENCE_AREA) == 16 + 16 + MAX_SEQ
    assert tokens(reference_area=128 * 128) == 16 + 64 + MAX_SEQ
