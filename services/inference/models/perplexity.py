"""Perplexity of a token sequence under the model (quality check for faster precision modes)."""

from __future__ import annotations

import math

import torch

from services.inference.models.attention import AttentionMetadata, PrefillSpan, new_kv_pool
from services.inference.models.llama import LlamaModel


@torch.inference_mode()
def token_logprobs(model: LlamaModel, token_ids: list[int]) -> torch.Tensor:
    """log p(token_i | tokens_<i) for i >= 1, in one causal pass over a scratch KV pool."""
    hp, n = model.hp, len(token_ids)
    kv = [(new_kv_pool(hp.num_kv_heads, n, hp.head_dim, model.dtype),
           new_kv_pool(hp.num_kv_heads, n, hp.head_dim, model.dtype)) for _ in range(hp.num_layers)]
    slots = torch.arange(n)
    meta = AttentionMetadata(slot_mapping=slots, block_size=1, num_paged_rows=0, paged_block_table=None,
                             decode_mask=None, prefills=[PrefillSpan(0, n, None, None)])
    ids = torch.tensor(token_ids)
    hidden = model.forward(ids, slots, kv, meta)
    logp = torch.log_softmax(model.compute_logits(hidden[:-1]), dim=-1)
    return logp.gather(1, ids[1:, None]).squeeze(1)


def perplexity(model: LlamaModel, token_ids: list[int]) -> float:
    return math.exp(-float(token_logprobs(model, token_ids).mean()))
