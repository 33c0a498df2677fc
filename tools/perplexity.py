"""Perplexity of a token sequence under the model (quality check for faster precision modes)."""

from __future__ import annotations

import math

import torch

from services.inference.models.attention import AttentionMetadata, PrefillSpan, new_kv_pool, single_table_metadata
from services.inference.models.compute import choose_compute
from services.inference.models.registry import CausalLM


@torch.inference_mode()
def token_logprobs(model: CausalLM, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """log p(token_i | tokens_<i) for i >= 1 over a scratch KV pool: one causal pass, or with `chunk`
    passes of that many tokens each attending to everything before it, which is how decode-sized steps
    see the model (with chunk <= 16 the quantized kernels of `--quantization gguf` do every product)."""
    hp, n = model.hp, len(token_ids)
    kv = [(new_kv_pool(hp.num_kv_heads, n, hp.head_dim, model.dtype),
           new_kv_pool(hp.num_kv_heads, n, hp.head_dim, model.dtype)) for _ in range(hp.num_layers)]
    ids = torch.tensor(token_ids)
    compute = choose_compute(model, kv, 1)
    step = chunk or n
    logps = []
    for start in range(0, n, step):
        end = min(n, start + step)
        slots = torch.arange(start, end)
        if start == 0:
            span = PrefillSpan(0, end, None, None)
        else:                                  # block size 1: block ids are positions
            span = PrefillSpan(0, end - start, torch.arange(end), torch.arange(end)[None, :] <= slots[:, None])
        meta = AttentionMetadata(slot_mapping=slots, block_size=1, num_paged_rows=0, paged_block_table=None,
                                 decode_mask=None, prefills=[span])
        single_table_metadata(meta, hp, [], [start])       # local layers (gemma3): cut to their window
        hidden = model.forward(ids[start:end], slots, kv, meta, compute)
        rows = hidden if end < n else hidden[:-1]                  # the last token predicts nothing here
        logp = torch.log_softmax(model.compute_logits(rows), dim=-1)
        logps.append(logp.gather(1, ids[start + 1:start + 1 + rows.shape[0], None]).squeeze(1))
    return torch.cat(logps)


def perplexity(model: CausalLM, token_ids: list[int], chunk: int | None = None) -> float:
    return math.exp(-float(token_logprobs(model, token_ids, chunk).mean()))
