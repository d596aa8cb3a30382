"""Model rewards: tiny random models saved in each reward's official checkpoint format, loaded through our code,
scored, and compared with an independent computation of the reward's formula.

HPS and ImageReward: the checkpoint is written key by key in the official naming (open_clip; timm ViT + BLIP
BERT), and the reference forward is written here directly from those raw tensors, so our key conversion onto
transformers is checked end to end. PickScore, CLIP score and the aesthetic CLIP: the official format is a
transformers directory; the reference is transformers' own CLIPModel forward plus the formula.
"""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mixgrpo.rewards import REWARDS, RewardError
from mixgrpo.rewards.clip import CLIP_MEAN, CLIP_STD, clip_preprocess

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red cat", "a blue dog", "a red cat", "two green birds"]
W, LAYERS, HEADS, IMAGE, PATCH, EMBED, CONTEXT = 32, 2, 4, 32, 8, 16, 16


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    """A CLIP BPE tokenizer over single letters: like the real one, pad "!" = 0 and end-of-text the last id."""
    vocab = {"!": 0}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path = tmp_path_factory.mktemp("clip_tokenizer")
    transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token="!").save_pretrained(path)
    return path


TINY_CLIP = {
    "projection_dim": EMBED,
    "vision_config": {"hidden_size": W, "intermediate_size": 4 * W, "num_hidden_layers": LAYERS,
                      "num_attention_heads": HEADS, "image_size": IMAGE, "patch_size": PATCH,
                      "hidden_act": "gelu", "projection_dim": EMBED},
    "text_config": {"vocab_size": 55, "hidden_size": W, "intermediate_size": 4 * W, "num_hidden_layers": LAYERS,
                    "num_attention_heads": HEADS, "max_position_embeddings": CONTEXT, "hidden_act": "gelu",
                    "projection_dim": EMBED, "bos_token_id": 53, "eos_token_id": 54, "pad_token_id": 0},
}


def random_images(n: int, size: int = IMAGE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------- preprocessing

def test_clip_preprocess_matches_pil_bicubic_resize_and_center_crop():
    # a smooth image (as generated images are) quantised to uint8, so that PIL and we see the same input
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 60), torch.linspace(0, 1, 45), indexing="ij")
    image = torch.stack([yy, xx, (torch.sin(6 * yy) * torch.cos(4 * xx) + 1) / 2])
    uint8 = (image * 255).round().to(torch.uint8)
    ours = clip_preprocess(uint8[None].float() / 255, 24)[0] * torch.tensor(CLIP_STD).view(3, 1, 1) \
        + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    pil = Image.fromarray(uint8.permute(1, 2, 0).numpy()).resize((24, 32), Image.BICUBIC)  # shorter side 45 -> 24
    top = round((32 - 24) / 2)
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()[:, top:top + 24] / 255
    assert ours.shape == (3, 24, 24)
    assert (ours - reference).abs().max() < 2.5 / 255  # PIL rounds to uint8 and uses fixed-point weights


# ------------------------------------------------------------------------------------------------------- HPS

def open_clip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random open_clip CLIP state dict in the naming and layout of HPS_v2.1_compressed.pt."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix):
        return {f"{prefix}.weight": 1 + rand(W, scale=0.1), f"{prefix}.bias": rand(W, scale=0.1)}

    def tower(prefix):
        sd = {}
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}"
            sd |= norm(f"{p}.ln_1") | norm(f"{p}.ln_2")
            sd |= {f"{p}.attn.in_proj_weight": rand(3 * W, W), f"{p}.attn.in_proj_bias": rand(3 * W),
                   f"{p}.attn.out_proj.weight": rand(W, W), f"{p}.attn.out_proj.bias": rand(W),
                   f"{p}.mlp.c_fc.weight": rand(4 * W, W), f"{p}.mlp.c_fc.bias": rand(4 * W),
                   f"{p}.mlp.c_proj.weight": rand(W, 4 * W), f"{p}.mlp.c_proj.bias": rand(W)}
        return sd

    grid = IMAGE // PATCH
    return {
        "visual.class_embedding": rand(W), "visual.positional_embedding": rand(grid * grid + 1, W),
        "visual.proj": rand(W, EMBED), "visual.conv1.weight": rand(W, 3, PATCH, PATCH),
        **norm("visual.ln_pre"), **tower("visual."), **norm("visual.ln_post"),
        "positional_embedding": rand(CONTEXT, W), "text_projection": rand(W, EMBED),
        "logit_scale": torch.tensor(math.log(1 / 0.07)), "token_embedding.weight": rand(55, W),
        **tower(""), **norm("ln_final"),
    }


def open_clip_blocks(sd, prefix, x, mask):
    """open_clip's residual blocks (nn.MultiheadAttention on [L, B, W]), from the raw tensors."""
    for i in range(LAYERS):
        p = f"{prefix}transformer.resblocks.{i}"
        h = F.layer_norm(x, (W,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"]).transpose(0, 1)
        attn, _ = F.multi_head_attention_forward(
            h, h, h, W, HEADS, sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"], None, None, False,
            0.0, sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"], training=False,
            need_weights=False, attn_mask=mask)
        x = x + attn.transpose(0, 1)
        h = F.layer_norm(x, (W,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
        h = F.gelu(F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
    return x


def open_clip_features(sd, pixels, input_ids):
    """open_clip CLIP.encode_image / encode_text from the raw state dict: ([B, E], [B, E])."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # [B, N, W]
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, W)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (W,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = open_clip_blocks(sd, "visual.", x, None)
    x = F.layer_norm(x, (W,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    image = x[:, 0] @ sd["visual.proj"]

    length = input_ids.shape[1]
    t = sd["token_embedding.weight"][input_ids] + sd["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    t = open_clip_blocks(sd, "", t, causal)
    t = F.layer_norm(t, (W,), sd["ln_final.weight"], sd["ln_final.bias"])
    text = t[torch.arange(t.shape[0]), input_ids.argmax(-1)] @ sd["text_projection"]  # pooled at end-of-text
    return image, text


@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict-key", "raw"])
def test_hps_equals_open_clip_cosine_computed_from_the_raw_checkpoint(tmp_path, clip_tokenizer_dir, wrapped):
    sd = open_clip_state_dict()
    torch.save({"epoch": 1, "state_dict": sd} if wrapped else sd, tmp_path / "HPS_v2.1_compressed.pt")
    reward = REWARDS.get("hps")(path=str(tmp_path / "HPS_v2.1_compressed.pt"), tokenizer=str(clip_tokenizer_dir),
                                config=TINY_CLIP, batch_size=3)
    images = random_images(len(PROMPTS))
    scores = reward(images, PROMPTS)

    # open_clip's tokenizer: [SOT] tokens [EOT], zero-padded to the context length
    ids = transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir)(
        PROMPTS, padding="max_length", max_length=CONTEXT, return_tensors="pt").input_ids
    image, text = open_clip_features(sd, normalise(images), ids)
    expected = F.cosine_similarity(image, text, dim=-1)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (4,)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert scores.std() > 1e-3  # random weights still give distinct scores: the check above is not vacuous


def test_hps_rejects_a_checkpoint_of_another_architecture(tmp_path, clip_tokenizer_dir):
    sd = open_clip_state_dict() | {"visual.attn_pool.query": torch.zeros(4, W)}
    torch.save({"state_dict": sd}, tmp_path / "other.pt")
    reward = REWARDS.get("hps")(path=str(tmp_path / "other.pt"), tokenizer=str(clip_tokenizer_dir), config=TINY_CLIP)
    with pytest.raises(RewardError, match="visual.attn_pool.query"):
        reward(random_images(1), PROMPTS[:1])


def test_hps_with_a_config_of_another_depth_names_the_mismatch(tmp_path, clip_tokenizer_dir):
    torch.save({"state_dict": open_clip_state_dict()}, tmp_path / "hps.pt")
    deeper = {**TINY_CLIP, "text_config": {**TINY_CLIP["text_config"], "num_hidden_layers": LAYERS + 1}}
    reward = REWARDS.get("hps")(path=str(tmp_path / "hps.pt"), tokenizer=str(clip_tokenizer_dir), config=deeper)
    with pytest.raises(RewardError, match="missing.*text_model.encoder.layers.2"):
        reward(random_images(1), PROMPTS[:1])


def test_hps_checkpoint_of_the_wrong_architecture_is_refused_before_any_model_is_built(tmp_path, clip_tokenizer_dir,
                                                                                       monkeypatch):
    """The tiny checkpoint given with the default ViT-H-14 config: `check()` (the trainer's pre-flight) names the
    mismatch in one line from the file's shapes alone, building the 1B-parameter model on the meta device only."""
    torch.save({"state_dict": open_clip_state_dict()}, tmp_path / "hps.pt")
    reward = REWARDS.get("hps")(path=str(tmp_path / "hps.pt"), tokenizer=str(clip_tokenizer_dir))
    built_on = []
    init = transformers.CLIPModel.__init__
    monkeypatch.setattr(transformers.CLIPModel, "__init__",
                        lambda self, *a, **kw: (built_on.append(torch.empty(0).device.type), init(self, *a, **kw))[1])
    with pytest.raises(RewardError) as e:
        reward.check()
    message = str(e.value)
    assert "\n" not in message and "of another shape" in message and "leave `config` unset" in message
    assert built_on == ["meta"]
    REWARDS.get("hps")(path=str(tmp_path / "hps.pt"), tokenizer=str(clip_tokenizer_dir), config=TINY_CLIP).check()


def test_a_missing_checkpoint_is_a_reward_error_naming_the_path(tmp_path, clip_tokenizer_dir):
    reward = REWARDS.get("hps")(path=str(tmp_path / "nowhere.pt"), tokenizer=str(clip_tokenizer_dir))
    with pytest.raises(RewardError, match="nowhere.pt.*does not exist"):
        reward(random_images(1), PROMPTS[:1])


# ----------------------------------------------------------------------------- PickScore, CLIP score, aesthetic

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip_tokenizer_dir):
    """A transformers CLIPModel directory with its tokenizer (the PickScore_v1 / openai CLIP layout)."""
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**TINY_CLIP)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))  # not the init value, so that using it is visible
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_outputs(clip_dir):
    """transformers' own CLIPModel forward: (images, prompts) -> (logits_per_image [B, B], image_embeds [B, E]),
    the image embeddings normalised."""
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_dir)

    def outputs(images, prompts):
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                        pixel_values=normalise(images))
        return out.logits_per_image, out.image_embeds

    return outputs


def test_pickscore_is_logit_scale_times_cosine(clip_dir, clip_outputs):
    images = random_images(len(PROMPTS), seed=1)
    scores = REWARDS.get("pickscore")(path=str(clip_dir), batch_size=3)(images, PROMPTS)
    logits, _ = clip_outputs(images, PROMPTS)
    torch.testing.assert_close(scores, logits.diagonal(), rtol=0, atol=1e-4)
    assert scores.std() > 1e-2


def test_clipscore_is_the_cosine_or_torchmetrics_clipped_100_cosine(clip_dir, clip_outputs):
    images = random_images(len(PROMPTS), seed=2)
    logits, _ = clip_outputs(images, PROMPTS)
    cosine = logits.diagonal() / 50.0
    scores = REWARDS.get("clipscore")(path=str(clip_dir))(images, PROMPTS)
    torch.testing.assert_close(scores, cosine, rtol=0, atol=1e-5)
    scores = REWARDS.get("clipscore")(path=str(clip_dir), mode="torchmetrics")(images, PROMPTS)
    torch.testing.assert_close(scores, (100 * cosine).clamp(min=0), rtol=0, atol=1e-3)


def test_clip_scores_follow_the_image_when_resized_from_another_resolution(clip_dir):
    # 48x64 images go through resize + center crop; the score must equal scoring the preprocessed 32x32 image
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    reward = REWARDS.get("clipscore")(path=str(clip_dir))
    pre = clip_preprocess(images, IMAGE) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) \
        + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(reward(images, PROMPTS[:2]), reward(pre, PROMPTS[:2]), rtol=0, atol=1e-5)


def aesthetic_mlp_state(input_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The rating MLP's state dict in the naming of sac+logos+ava1-l14-linearMSE.pth."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(0, input_size, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    state = {}
    for index, n_in, n_out in sizes:
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        state[f"layers.{index}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


def mlp_reference(state: dict[str, torch.Tensor], x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """The published head: five Linear layers, no activations (dropout is off at inference)."""
    for index in (0, 2, 4, 6, 7):
        x = F.linear(x, state[f"{prefix}layers.{index}.weight"], state[f"{prefix}layers.{index}.bias"])
    return x.squeeze(-1)


def test_aesthetic_is_the_mlp_of_the_normalised_clip_image_embedding(tmp_path, clip_dir, clip_outputs):
    state = aesthetic_mlp_state(EMBED)
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    images = random_images(len(PROMPTS), seed=4)
    reward = REWARDS.get("aesthetic")(path=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), clip=str(clip_dir))
    scores = reward(images, PROMPTS)
    _, image_embeds = clip_outputs(images, PROMPTS)
    torch.testing.assert_close(scores, mlp_reference(state, image_embeds), rtol=0, atol=1e-4)
    assert scores.std() > 1e-3


def test_aesthetic_rejects_an_mlp_for_another_clip_width(tmp_path, clip_dir):
    torch.save(aesthetic_mlp_state(768), tmp_path / "mlp.pth")
    reward = REWARDS.get("aesthetic")(path=str(tmp_path / "mlp.pth"), clip=str(clip_dir))
    with pytest.raises(RewardError, match="768"):
        reward(random_images(1), PROMPTS[:1])


# ----------------------------------------------------------------------------------------------- ImageReward

VW, TW, TEXT_POSITIONS = 48, 32, 40  # vision and text widths differ, so cross-attention shapes are checked
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "blue", "dog", "two", "green",
              "birds", *string.ascii_lowercase]
TINY_BLIP = {
    "vision_config": {"hidden_size": VW, "intermediate_size": 4 * VW, "num_hidden_layers": LAYERS,
                      "num_attention_heads": HEADS, "image_size": IMAGE, "patch_size": PATCH,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-6},
    "text_config": {"vocab_size": len(BERT_WORDS) + 2, "hidden_size": TW, "intermediate_size": 4 * TW,
                    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                    "max_position_embeddings": TEXT_POSITIONS, "encoder_hidden_size": VW, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-12, "pad_token_id": 0, "is_decoder": True,
                    "bos_token_id": None, "eos_token_id": None, "sep_token_id": None},
}


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_tokenizer")
    (path / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return path


def imagereward_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ImageReward.pt state dict: timm ViT under blip.visual_encoder, BLIP's BERT with cross-attention
    under blip.text_encoder, the contrastive projections (unused by the score), and the MLP head."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def linear(prefix, n_out, n_in):
        return {f"{prefix}.weight": rand(n_out, n_in), f"{prefix}.bias": rand(n_out)}

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width, scale=0.1), f"{prefix}.bias": rand(width, scale=0.1)}

    v, t = "blip.visual_encoder", "blip.text_encoder"
    grid = IMAGE // PATCH
    sd = {f"{v}.cls_token": rand(1, 1, VW), f"{v}.pos_embed": rand(1, grid * grid + 1, VW),
          **linear(f"{v}.patch_embed.proj", VW, 3 * PATCH * PATCH), **norm(f"{v}.norm", VW)}
    sd[f"{v}.patch_embed.proj.weight"] = sd[f"{v}.patch_embed.proj.weight"].reshape(VW, 3, PATCH, PATCH)
    for i in range(LAYERS):
        b = f"{v}.blocks.{i}"
        sd |= norm(f"{b}.norm1", VW) | norm(f"{b}.norm2", VW) | linear(f"{b}.attn.qkv", 3 * VW, VW)
        sd |= linear(f"{b}.attn.proj", VW, VW) | linear(f"{b}.mlp.fc1", 4 * VW, VW) | linear(f"{b}.mlp.fc2", VW, 4 * VW)
    sd |= {f"{t}.embeddings.word_embeddings.weight": rand(len(BERT_WORDS) + 2, TW),
           f"{t}.embeddings.position_embeddings.weight": rand(TEXT_POSITIONS, TW),
           f"{t}.embeddings.position_ids": torch.arange(TEXT_POSITIONS)[None], **norm(f"{t}.embeddings.LayerNorm", TW)}
    for i in range(LAYERS):
        layer = f"{t}.encoder.layer.{i}"
        for block, kv_width in (("attention", TW), ("crossattention", VW)):
            sd |= linear(f"{layer}.{block}.self.query", TW, TW)
            sd |= linear(f"{layer}.{block}.self.key", TW, kv_width)
            sd |= linear(f"{layer}.{block}.self.value", TW, kv_width)
            sd |= linear(f"{layer}.{block}.output.dense", TW, TW) | norm(f"{layer}.{block}.output.LayerNorm", TW)
        sd |= linear(f"{layer}.intermediate.dense", 4 * TW, TW) | linear(f"{layer}.output.dense", TW, 4 * TW)
        sd |= norm(f"{layer}.output.LayerNorm", TW)
    sd |= linear("blip.vision_proj", 8, VW) | linear("blip.text_proj", 8, TW)
    sd |= {f"mlp.{k}": value for k, value in aesthetic_mlp_state(TW, seed=seed).items()}
    return sd


def attention(q, k, v, heads, mask=None):
    """Multi-head scaled dot-product attention on [B, L, D] tensors, written out."""
    b, lq, d = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        logits = logits + mask
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


def imagereward_reference(sd, pixels, input_ids, attention_mask):
    """ImageReward.score from the raw state dict: timm ViT, BLIP BERT (post-norm, cross-attention), MLP."""
    v, t = "blip.visual_encoder", "blip.text_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[f"{v}.cls_token"].expand(x.shape[0], 1, VW), x.flatten(2).transpose(1, 2)], 1)
    x = x + sd[f"{v}.pos_embed"]
    for i in range(LAYERS):
        b = f"{v}.blocks.{i}"
        h = F.layer_norm(x, (VW,), sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], eps=1e-6)
        q, k, val = F.linear(h, sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + F.linear(attention(q, k, val, HEADS), sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
        h = F.layer_norm(x, (VW,), sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"]))
        x = x + F.linear(h, sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])
    image = F.layer_norm(x, (VW,), sd[f"{v}.norm.weight"], sd[f"{v}.norm.bias"], eps=1e-6)

    def lin(prefix, x):
        return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def ln(prefix, x):
        return F.layer_norm(x, (TW,), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-12)

    length = input_ids.shape[1]
    h = sd[f"{t}.embeddings.word_embeddings.weight"][input_ids]
    h = ln(f"{t}.embeddings.LayerNorm", h + sd[f"{t}.embeddings.position_embeddings.weight"][:length])
    pad_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # BLIP's additive padding mask
    for i in range(LAYERS):
        p = f"{t}.encoder.layer.{i}"
        for name, context, mask in (("attention", h, pad_mask), ("crossattention", image, None)):
            a = attention(lin(f"{p}.{name}.self.query", h), lin(f"{p}.{name}.self.key", context),
                          lin(f"{p}.{name}.self.value", context), HEADS, mask)
            h = ln(f"{p}.{name}.output.LayerNorm", lin(f"{p}.{name}.output.dense", a) + h)
        h = ln(f"{p}.output.LayerNorm", lin(f"{p}.output.dense", F.gelu(lin(f"{p}.intermediate.dense", h))) + h)
    raw = mlp_reference(sd, h[:, 0], prefix="mlp.")
    return (raw - 0.16717362830052426) / 1.0333394966054072  # the official normalisation


def test_imagereward_equals_blip_and_mlp_computed_from_the_raw_checkpoint(tmp_path, bert_tokenizer_dir):
    sd = imagereward_state_dict()
    torch.save(sd, tmp_path / "ImageReward.pt")
    reward = REWARDS.get("imagereward")(path=str(tmp_path / "ImageReward.pt"), tokenizer=str(bert_tokenizer_dir),
                                        config=TINY_BLIP, batch_size=3)
    images = random_images(len(PROMPTS), seed=5)
    scores = reward(images, PROMPTS)
    tokens = transformers.BertTokenizer.from_pretrained(bert_tokenizer_dir)(
        PROMPTS, padding="max_length", max_length=35, return_tensors="pt")
    expected = imagereward_reference(sd, normalise(images), tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-4)
    assert scores.std() > 1e-2


def test_imagereward_rejects_unknown_keys(tmp_path, bert_tokenizer_dir):
    torch.save(imagereward_state_dict() | {"blip.itm_head.weight": torch.zeros(2, TW)}, tmp_path / "x.pt")
    reward = REWARDS.get("imagereward")(path=str(tmp_path / "x.pt"), tokenizer=str(bert_tokenizer_dir),
                                        config=TINY_BLIP)
    with pytest.raises(RewardError, match="blip.itm_head.weight"):
        reward(random_images(1), PROMPTS[:1])


# ----------------------------------------------------------------------------------------------- user rewards

def mean_red(images: torch.Tensor, prompts, scale: float = 1.0) -> torch.Tensor:
    """A user reward, named in a config as 'module:function' and called with the config's args."""
    return scale * images[:, 0].mean(dim=(1, 2))


def test_a_user_reward_is_a_module_function_called_with_its_args():
    from mixgrpo.rewards import build_reward

    reward = build_reward(f"{__name__}:mean_red", {"scale": 2.0})
    images = random_images(3)
    torch.testing.assert_close(reward(images, ["x"] * 3), 2.0 * images[:, 0].mean(dim=(1, 2)))
