"""Qwen-Image: on a tiny random pipeline saved to disk and loaded through `load_qwen_image`, mixgrpo's ODE rollout
with true CFG equals the stock QwenImagePipeline (latents and images), the text encoding (padded to a fixed length
with a mask) and its cache equal the pipeline's, and what a GRPO run exports loads into the stock pipeline and
reproduces our samples."""

import pytest
import torch

from mixgrpo.models import MODELS, cond_cat
from mixgrpo.models.flux import pack
from mixgrpo.models.qwen_image import LORA_TARGETS, QwenImageAdapter, load_qwen_image
from mixgrpo.plan import ode_plan
from mixgrpo.rollout import sample
from tiny_pipelines import save_tiny_qwen_image

SIZE, MAX_SEQ = 64, 200  # 64 px -> latents [16, 8, 8]; the tiny byte tokenizer makes long prompts
PROMPTS = ["a red cube on a table", "two blue spheres"]
SCALE = 4.0  # the pipeline's true_cfg_scale in its examples


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def model(qwen_dir):
    return load(qwen_dir)


def load(path, **kw):
    return load_qwen_image(str(path), **{"dtype": "float32", "height": SIZE, "width": SIZE,
                                         "max_sequence_length": MAX_SEQ, **kw})


def stock(path):
    """The stock pipeline, its scheduler taking mixgrpo's sigmas as they are (no dynamic or terminal shift)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0,
                                                shift_terminal=None)
    return pipe


def run_stock(pipe, noise, sigmas, output_type="latent", cfg=True, **kw):
    out = pipe(PROMPTS, negative_prompt=[""] * len(PROMPTS) if cfg else None, true_cfg_scale=SCALE if cfg else 1.0,
               height=SIZE, width=SIZE, num_inference_steps=len(sigmas), sigmas=sigmas, latents=pack(noise, 2),
               max_sequence_length=MAX_SEQ, output_type=output_type, **kw)
    return out.images


def noise_of(model, seeds):
    return torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def test_registered_and_shapes(model):
    assert MODELS.get("qwen_image") is load_qwen_image
    assert isinstance(model, QwenImageAdapter) and model.latent_shape == (16, 8, 8)
    cond = model.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 32) and cond["prompt_mask"].shape == (2, MAX_SEQ)
    lengths = cond["prompt_mask"].sum(1)
    assert lengths[0] > lengths[1] > 0  # prompts of their own lengths, zero-padded after
    assert torch.all(cond["prompt_embeds"][1, int(lengths[1]):] == 0)


@torch.no_grad()
def test_encoding_equals_pipeline(model, qwen_dir):
    pipe = stock(qwen_dir)
    embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)  # padded to the longer prompt
    cond = model.encode_prompts(PROMPTS)
    n = embeds.shape[1]
    torch.testing.assert_close(cond["prompt_embeds"][:, :n], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["prompt_mask"][:, :n], mask, rtol=0, atol=0)
    assert torch.all(cond["prompt_mask"][:, n:] == 0)
    with pytest.warns(UserWarning, match="truncated to 40"):
        short = load(qwen_dir, max_sequence_length=40).encode_prompts(PROMPTS[:1])
    torch.testing.assert_close(short["prompt_embeds"], pipe.encode_prompt(PROMPTS[:1], max_sequence_length=40)[0])


@torch.no_grad()
def test_padding_changes_no_velocity(model):
    """The fixed-length padding is masked out: one prompt's velocity is the same alone, next to a longer prompt (as
    CFG batches cond with the empty prompt), and with the padding trimmed or not."""
    x, sigma = torch.randn(2, *model.latent_shape), torch.tensor([0.7, 0.7])
    both = model.encode_prompts(PROMPTS)
    alone = model(x[1:], sigma[1:], {k: v[1:] for k, v in both.items()})
    torch.testing.assert_close(model(x, sigma, both)[1:], alone, rtol=1e-5, atol=1e-6)
    empty = model.encode_prompts([""])
    mixed = model(torch.cat([x[1:], x[1:]]), sigma, cond_cat([{k: v[1:] for k, v in both.items()}, empty]))
    torch.testing.assert_close(mixed[:1], alone, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_rollout_ode_plan_with_true_cfg_equals_pipeline(model, qwen_dir):
    """mixgrpo.rollout.sample with the SDE off equals QwenImagePipeline (true CFG with its norm rescaling) for the
    same noise and sigmas: latents to 1e-5 in float32, and the decoded images."""
    plan = ode_plan(6, 3.0)
    sigmas = [s.sigma for s in plan.steps]
    seeds = [11, 12]
    ours = sample(model, plan, model.encode_prompts(PROMPTS), seeds, uncond=model.encode_prompts(["", ""]),
                  guidance_scale=SCALE)
    pipe = stock(qwen_dir)
    expected = run_stock(pipe, noise_of(model, seeds), sigmas)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], torch.tensor(sigmas, dtype=torch.float32))
    torch.testing.assert_close(pack(ours, 2), expected, rtol=1e-5, atol=1e-5)
    assert (ours - noise_of(model, seeds)).abs().mean() > 0.1
    plain = sample(model, plan, model.encode_prompts(PROMPTS), seeds)  # without CFG: the pipeline's plain run
    torch.testing.assert_close(pack(plain, 2), run_stock(pipe, noise_of(model, seeds), sigmas, cfg=False),
                               rtol=1e-5, atol=1e-5)
    assert (plain - ours).abs().max() > 1e-3  # CFG (and its rescaling) mattered
    images = run_stock(pipe, noise_of(model, seeds), sigmas, output_type="pt")
    decoded = model.decode(ours)
    assert decoded.shape == (2, 3, SIZE, SIZE) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, images, rtol=1e-5, atol=1e-5)


def test_guidance_rescales_each_token_to_the_conditional_norm(model):
    v_c, v_u = torch.randn(2, *model.latent_shape), torch.randn(2, *model.latent_shape)
    v = model.guide(v_c, v_u, 4.0)
    tokens, plain = pack(v, 2), pack(v_u + 4.0 * (v_c - v_u), 2)
    torch.testing.assert_close(tokens.norm(dim=-1), pack(v_c, 2).norm(dim=-1))  # the conditional norm ...
    cosine = torch.nn.functional.cosine_similarity(tokens, plain, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))  # ... in the direction of plain CFG


def test_bad_inputs_name_the_fix(qwen_dir, tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_qwen_image(str(tmp_path))
    with pytest.raises(ValueError, match="multiples of 16"):
        load_qwen_image(str(qwen_dir), dtype="float32", height=56, width=SIZE)
    with pytest.raises(ValueError, match="1..1024"):
        load(qwen_dir, max_sequence_length=2000)


def test_preprocess_cache_reproduces_the_text_encoder(model, qwen_dir, tmp_path):
    from mixgrpo import cli

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    assert cli.main(["preprocess", "--model", "qwen_image", "--path", str(qwen_dir), "--prompts",
                     str(tmp_path / "p.txt"), "--out", str(tmp_path / "cache"), "--dtype", "float32",
                     "--device", "cpu", "--max-sequence-length", str(MAX_SEQ)]) == 0
    cached = load(qwen_dir, embedding_cache=str(tmp_path / "cache"))
    for batch in (PROMPTS, ["", PROMPTS[1]]):
        ours, theirs = cached.encode_prompts(batch), model.encode_prompts(batch)
        assert ours.keys() == theirs.keys() == {"prompt_embeds", "prompt_mask"}
        torch.testing.assert_close(ours["prompt_mask"], theirs["prompt_mask"], rtol=0, atol=0)
        # the cache encoded its own batch (other padding lengths inside Qwen2.5-VL): float noise at most
        torch.testing.assert_close(ours["prompt_embeds"], theirs["prompt_embeds"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [0, 4])
def test_a_grpo_iteration_exports_what_the_stock_pipeline_reproduces(qwen_dir, tmp_path, lora):
    """One MixGRPO iteration with true CFG through the trainer (full or LoRA), then the stock QwenImagePipeline with
    final/ loaded by diffusers alone samples what mixgrpo samples."""
    from model_runs import grpo_run, noise, our_samples, sigmas, with_final

    args = {"path": str(qwen_dir), "dtype": "float32", "height": SIZE, "width": SIZE, "max_sequence_length": MAX_SEQ}
    run = grpo_run(tmp_path / "run", "qwen_image", args, lora, SCALE, targets=list(LORA_TARGETS))
    seeds = [3, 4]
    ours = our_samples(run, PROMPTS, seeds, SCALE)
    pipe = with_final(stock(qwen_dir), run, lora)
    with torch.no_grad():
        expected = run_stock(pipe, noise(ours.shape[1:], seeds), sigmas())
    torch.testing.assert_close(expected, pack(ours, 2), rtol=1e-5, atol=1e-5)
