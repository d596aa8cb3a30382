"""LoRA: zero init is a no-op, only LoRA weights train, and saved results load into stock diffusers pipelines."""

import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.models import cond_cat
from mixgrpo.models.flux import pack
from mixgrpo.models.flux_pipeline import load_flux
from mixgrpo.models.lora import apply_lora, load_lora, lora_parameters, save_full, save_lora
from mixgrpo.models.sd3 import load_sd3

from tiny_pipelines import save_tiny_flux, save_tiny_sd3

SIZE, MAX_SEQ = 32, 24
PROMPTS = ["a red cube on a table", "two blue spheres"]
SIGMAS = [1.0, 0.6, 0.3]
RANK, ALPHA = 4, 8.0  # alpha != rank: the saved scale alpha / rank must survive the round trip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"flux": save_tiny_flux(root / "flux"), "sd3": save_tiny_sd3(root / "sd3")}


def load(name, dirs):
    loader = load_flux if name == "flux" else load_sd3
    return loader(str(dirs[name]), dtype="float32", height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)


def velocity(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *model.latent_shape, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.8, 0.4]), model.encode_prompts(PROMPTS))


def perturb(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(transformer):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def euler(model, noise, sigmas, scale=None):
    """Euler over the given grid; with `scale`, CFG against "" with cond and uncond in one batch."""
    x, b = noise, noise.shape[0]
    cond = model.encode_prompts(PROMPTS)
    both = cond_cat([model.encode_prompts([""] * b), cond])
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            if scale is None:
                v = model(x, sigma.expand(b), cond)
            else:
                v2 = model(torch.cat([x, x]), sigma.expand(2 * b), both)
                v = v2[:b] + scale * (v2[b:] - v2[:b])
            x = x + (sigma_next - sigma) * v
    return x


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_zero_init_is_identity_and_only_lora_trains(name, dirs):
    model = load(name, dirs)
    before = velocity(model)
    n_base = sum(p.numel() for p in model.denoiser.parameters())
    apply_lora(model.denoiser, RANK, ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch.testing.assert_close(velocity(model), before, rtol=0, atol=0)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # Exactly the LoRA weights of the transformer: frozen text encoders and VAE contribute none.
    assert trainable == {"transformer." + n for n, _ in model.denoiser.named_parameters() if ".lora_" in n}
    n_lora = sum(p.numel() for p in lora_parameters(model.denoiser))
    assert 0 < n_lora < 0.5 * n_base

    # Gradients reach exactly the LoRA weights, lora_B first (lora_A's gradient is zero while B = 0).
    x = torch.randn(1, *model.latent_shape)
    model(x, torch.tensor([0.5]), model.encode_prompts(PROMPTS[:1])).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n and p.grad is not None)


def test_lora_weights_float32_on_bf16_base(dirs):
    model = load_flux(str(dirs["flux"]), dtype="bfloat16", height=SIZE, width=SIZE,
                      max_sequence_length=MAX_SEQ)
    apply_lora(model.denoiser, RANK)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model.denoiser))
    assert model.denoiser.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
    v = velocity(model)  # mixed dtypes run: peft casts to the LoRA dtype and back
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_flux_lora_loads_into_stock_pipeline(dirs, tmp_path):
    from diffusers import FluxPipeline

    model = load("flux", dirs)
    apply_lora(model.denoiser, RANK, ALPHA)  # default targets: attention of the joint and single blocks
    base_v = velocity(model)
    perturb(model.denoiser)
    assert (velocity(model) - base_v).abs().max() > 1e-3  # the perturbed LoRA changes the model
    save_lora(model, tmp_path / "lora")

    pipe = FluxPipeline.from_pretrained(dirs["flux"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    noise = torch.randn(2, *model.latent_shape)
    expected = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=len(SIGMAS), sigmas=SIGMAS,
                    guidance_scale=3.5, max_sequence_length=MAX_SEQ, latents=pack(noise, 2),
                    output_type="latent").images
    ours = euler(model, noise, pipe.scheduler.sigmas)
    torch.testing.assert_close(pack(ours, 2), expected, rtol=1e-5, atol=1e-5)


def test_sd3_lora_loads_into_stock_pipeline_with_cfg(dirs, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    model = load("sd3", dirs)
    apply_lora(model.denoiser, RANK, ALPHA)
    perturb(model.denoiser, seed=1)
    save_lora(model, tmp_path / "lora")

    pipe = StableDiffusion3Pipeline.from_pretrained(dirs["sd3"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    noise = torch.randn(2, *model.latent_shape)
    expected = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=len(SIGMAS), sigmas=SIGMAS,
                    guidance_scale=4.5, max_sequence_length=MAX_SEQ, latents=noise.clone(),
                    output_type="latent").images
    ours = euler(model, noise, pipe.scheduler.sigmas, scale=4.5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_load_lora_adds_or_overwrites_in_place(dirs, tmp_path):
    trained = load("flux", dirs)
    apply_lora(trained.denoiser, RANK, ALPHA)
    perturb(trained.denoiser)
    save_lora(trained, tmp_path / "lora")
    target = velocity(trained)

    fresh = load("flux", dirs)  # no adapter yet: added from the file, with the saved alpha / rank
    load_lora(fresh.denoiser, tmp_path / "lora")
    torch.testing.assert_close(velocity(fresh), target, rtol=1e-6, atol=1e-6)
    assert lora_parameters(fresh.denoiser)

    resumed = load("flux", dirs)  # resuming: same adapter config, weights overwritten in place
    apply_lora(resumed.denoiser, RANK, ALPHA)
    params = lora_parameters(resumed.denoiser)
    load_lora(resumed.denoiser, tmp_path / "lora")
    assert lora_parameters(resumed.denoiser)[0] is params[0]  # same objects: an optimizer keeps working
    torch.testing.assert_close(velocity(resumed), target, rtol=1e-6, atol=1e-6)

    other = load("flux", dirs)
    apply_lora(other.denoiser, RANK + 1, ALPHA)
    with pytest.raises(ValueError, match="same rank and target_modules"):
        load_lora(other.denoiser, tmp_path / "lora")


def test_save_full_round_trip(dirs, tmp_path):
    from diffusers import FluxTransformer2DModel

    model = load("flux", dirs)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.01)
    target = velocity(model)
    out = tmp_path / "full"
    (out).mkdir()
    (out / "stale.txt").write_text("replaced atomically")
    save_full(model, out, max_shard_size=100_000)  # tiny shards: exercises the sharded index
    assert not (out / "stale.txt").exists()
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = FluxTransformer2DModel.from_pretrained(out, local_files_only=True)
    model.transformer = loaded
    torch.testing.assert_close(velocity(model), target, rtol=0, atol=0)

    save_full(loaded, tmp_path / "bf16", dtype=torch.bfloat16)  # e.g. float32 master weights -> bf16 release
    weights = load_file(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors")
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    half = FluxTransformer2DModel.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16, local_files_only=True)
    torch.testing.assert_close(half.state_dict(), {k: v.bfloat16() for k, v in loaded.state_dict().items()})

    apply_lora(loaded, RANK)
    with pytest.raises(ValueError, match="save_lora"):
        save_full(loaded, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_bad_lora_settings_name_the_fix(dirs):
    model = load("flux", dirs)
    with pytest.raises(ValueError, match="match no layer"):
        apply_lora(model.denoiser, RANK, target_modules=["not_a_layer"])
    with pytest.raises(ValueError, match="rank 0"):
        apply_lora(model.denoiser, 0)
    with pytest.raises(ValueError, match="save_full"):
        save_lora(model, "/nonexistent/never-written")
