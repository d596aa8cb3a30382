"""FluxAdapter: packing, position ids and time convention match diffusers' own FLUX pipeline."""

import pytest
import torch

from mixgrpo.models.flux import FluxAdapter, decode_pixels, image_ids, pack, unpack

diffusers = pytest.importorskip("diffusers")


class FixedText:
    """A stand-in text encoder: fixed random embeddings per prompt (FLUX-like widths, tiny)."""

    def __init__(self, length=5, dim=32, pooled_dim=16):
        self.length, self.dim, self.pooled_dim = length, dim, pooled_dim

    def encode(self, prompts):
        g = torch.Generator().manual_seed(sum(map(ord, "".join(prompts))))
        n = len(prompts)
        return {"prompt_embeds": torch.randn(n, self.length, self.dim, generator=g),
                "pooled": torch.randn(n, self.pooled_dim, generator=g)}


def tiny_flux(in_channels, guidance_embeds):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6)).eval()


def test_pack_matches_patch_loop():
    x = torch.randn(2, 3, 8, 12)
    p = 4
    tokens = pack(x, p)                                                  # [2, 6, 48]
    for row in range(2):
        for col in range(3):
            patch = x[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p].reshape(2, -1)
            torch.testing.assert_close(tokens[:, row * 3 + col], patch, rtol=0, atol=0)
    torch.testing.assert_close(unpack(tokens, (3, 8, 12), p), x, rtol=0, atol=0)
    ids = image_ids(2, 3)
    assert ids[4].tolist() == [0.0, 1.0, 1.0] and ids[2].tolist() == [0.0, 0.0, 2.0]


def test_latent_form_equals_diffusers_pipeline_packing():
    from diffusers import FluxPipeline

    transformer = tiny_flux(in_channels=64, guidance_embeds=True)
    text = FixedText()
    model = FluxAdapter(transformer, text, patch_size=2, latent_shape=(16, 8, 6), guidance=3.5)
    b = 3
    x = torch.randn(b, 16, 8, 6)
    sigma = torch.tensor([1.0, 0.6, 0.05])
    cond = model.encode_prompts(["a", "b", ""])

    # The oracle: what FluxPipeline does around its transformer call (height/width in pixels = latent * 8).
    packed = FluxPipeline._pack_latents(x, b, 16, 8, 6)
    ids = FluxPipeline._prepare_latent_image_ids(b, 8 // 2, 6 // 2, x.device, x.dtype)
    with torch.no_grad():
        out = transformer(hidden_states=packed, timestep=sigma, guidance=torch.full((b,), 3.5),
                          pooled_projections=cond["pooled"], encoder_hidden_states=cond["prompt_embeds"],
                          txt_ids=torch.zeros(5, 3), img_ids=ids, return_dict=False)[0]
    expected = FluxPipeline._unpack_latents(out, 8 * 8, 6 * 8, vae_scale_factor=8)
    with torch.no_grad():
        v = model(x, sigma, cond)
    torch.testing.assert_close(v, expected, rtol=0, atol=0)
    # The guidance value reaches the transformer: another value gives another velocity.
    model.guidance = 1.0
    with torch.no_grad():
        assert not torch.allclose(model(x, sigma, cond), v)


def test_velocity_shape_dtype_and_sigma_dependence():
    model = FluxAdapter(tiny_flux(in_channels=48, guidance_embeds=False), FixedText(), patch_size=4,
                        latent_shape=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    cond = model.encode_prompts(["x", "y"])
    with torch.no_grad():
        v = model(x, torch.tensor([0.5, 0.5]), cond)
        v_scalar = model(x, torch.tensor(0.5), cond)
        v_other = model(x, torch.tensor([0.9, 0.5]), cond)
    assert v.shape == x.shape and v.dtype == torch.float64
    torch.testing.assert_close(v, v_scalar)
    assert not torch.allclose(v_other[0], v[0]) and torch.allclose(v_other[1], v[1])
    assert model.denoiser is model.transformer
    images = model.decode(torch.tensor([-2.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2))
    assert images.flatten().tolist() == [0.0, 0.0, 0.5, 1.0]
    assert decode_pixels is model.decoder


def test_bad_configurations_name_the_problem():
    with pytest.raises(ValueError, match="in_channels"):
        FluxAdapter(tiny_flux(in_channels=48, guidance_embeds=False), FixedText(), patch_size=2,
                    latent_shape=(16, 8, 8))
    with pytest.raises(ValueError, match="guidance"):
        FluxAdapter(tiny_flux(in_channels=64, guidance_embeds=True), FixedText(), patch_size=2,
                    latent_shape=(16, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        FluxAdapter(tiny_flux(in_channels=48, guidance_embeds=False), FixedText(), patch_size=4,
                    latent_shape=(3, 10, 8))
