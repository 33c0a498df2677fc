"""A cross-encoder for the semantic cache's hit decision: an experiment, not served (see below).

MiniLM's pooled cosine cannot tell "How do I learn Python?" from "How do I learn Java?": the two vectors
are close because most of each question is the same. A cross-encoder attends across both questions at
once. This one is all-MiniLM-L6-v2 itself (the embedding model's weights, from its installed package),
read as a pair `[CLS] new [SEP] cached [SEP]`, with low-rank adapters (LoRA) on its dense layers, its
LayerNorms and a logistic head, fine-tuned by `tools/train_cache_reranker.py`; its forward is the
embedder's own (`MiniLMEmbedder.encode`, packed tokens).

Measured on the held-out half of the QQP dev file (README, "How good the hit decision is"): trained on the
other half's 8,000 lookups it ranks pairs no better than MiniLM's cosine (ROC AUC 0.77 against 0.77), and
it costs 7 ms of one core per candidate pair, so a miss with three candidates takes 15-30 ms in the
service: it is not wired into the cache. all-MiniLM-L6-v2 was trained on Quora's duplicates among its
billion pairs; 8,000 lookups do not teach a cross-encoder more than that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.embedding.embedder import MiniLMEmbedder, _Layer

DENSE = ("qkv", "o", "up", "down")          # the adapted matrices of each layer (x @ w, w stored [in, out])
NORMS = ("ln1_w", "ln1_b", "ln2_w", "ln2_b")
MAX_PAIR_TOKENS = 128                       # a pair longer than this is truncated (the longer side first)


@dataclass(frozen=True, slots=True)
class RerankerConfig:
    layers: int                  # the first `layers` of MiniLM's 6 (fewer: cheaper, less exact)
    rank: int
    alpha: float
    min_cosine: float            # candidates below this cosine are never read (and never hit)
    top: int                     # at most this many candidates per lookup are read, best cosine first
    threshold: float             # the default hit probability
    meta: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Adapters(torch.nn.Module):
    """Trainable parts: per adapted layer, LoRA factors (a [in, rank], b [rank, out]) of each dense
    matrix and the LayerNorms' weights; a head over the mean-pooled last states."""

    def __init__(self, base: MiniLMEmbedder, layers: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.num_layers, self.rank, self.alpha = layers, rank, alpha
        self.lora = torch.nn.ParameterDict()
        self.norms = torch.nn.ParameterDict()
        gen = torch.Generator().manual_seed(0)
        for i, layer in enumerate(base.layers[:layers]):
            for name in DENSE:
                w = getattr(layer, f"{name}_w")
                self.lora[f"{i}_{name}_a"] = torch.nn.Parameter(torch.randn(w.shape[0], rank, generator=gen) / w.shape[0] ** 0.5)
                self.lora[f"{i}_{name}_b"] = torch.nn.Parameter(torch.zeros(rank, w.shape[1]))
            for name in NORMS:
                self.norms[f"{i}_{name}"] = torch.nn.Parameter(getattr(layer, name).clone())
        self.head_w = torch.nn.Parameter(torch.zeros(base.hidden))
        self.head_b = torch.nn.Parameter(torch.zeros(()))

    def merged(self, base: MiniLMEmbedder) -> list[_Layer]:
        """The adapted layers' weights (differentiable in the adapters)."""
        out = []
        for i, layer in enumerate(base.layers[:self.num_layers]):
            m = _Layer()
            for name in DENSE:
                delta = self.lora[f"{i}_{name}_a"] @ self.lora[f"{i}_{name}_b"] * (self.alpha / self.rank)
                setattr(m, f"{name}_w", getattr(layer, f"{name}_w") + delta)
            for name in ("qkv_b", "o_b", "up_b", "down_b"):
                setattr(m, name, getattr(layer, name))
            for name in NORMS:
                setattr(m, name, self.norms[f"{i}_{name}"])
            out.append(m)
        return out

    def logits(self, base: MiniLMEmbedder, ids: list[list[int]], types: list[list[int]],
               layers: list[_Layer] | None = None, dropout: float = 0.0) -> torch.Tensor:
        x, lens = base.encode(ids, types, self.merged(base) if layers is None else layers, dropout)
        pooled = base.mean_pool(x, lens)
        return (torch.nn.functional.dropout(pooled, dropout) if dropout else pooled) @ self.head_w + self.head_b

    def save(self, path: Path, config: RerankerConfig) -> None:
        from safetensors.torch import save_file

        tensors = {f"lora.{k}": v.detach().half().contiguous() for k, v in self.lora.items()}
        tensors |= {f"norms.{k}": v.detach().half().contiguous() for k, v in self.norms.items()}
        tensors |= {"head_w": self.head_w.detach().float().contiguous(), "head_b": self.head_b.detach().float().reshape(1)}
        cfg = {k: getattr(config, k) for k in RerankerConfig.__slots__ if k != "meta"}
        save_file(tensors, str(path), metadata={"config": json.dumps(cfg), "meta": json.dumps(config.meta)})


def pair_ids(base: MiniLMEmbedder, query: str, cached: str) -> tuple[list[int], list[int]]:
    enc = base.tokenizer.encode(query, cached)          # [CLS] query [SEP] cached [SEP], segments 0 and 1
    ids, types = enc.ids, enc.type_ids
    if len(ids) > MAX_PAIR_TOKENS:
        ids, types = _truncate(base, query, cached)
    return ids, types


def _truncate(base: MiniLMEmbedder, query: str, cached: str) -> tuple[list[int], list[int]]:
    qa = base._counter.encode(query, add_special_tokens=False).ids
    qb = base._counter.encode(cached, add_special_tokens=False).ids
    budget = MAX_PAIR_TOKENS - 3
    while len(qa) + len(qb) > budget:                    # the longer side loses a token
        if len(qa) >= len(qb):
            qa = qa[:-1]
        else:
            qb = qb[:-1]
    cls, sep = base.tokenizer.token_to_id("[CLS]"), base.tokenizer.token_to_id("[SEP]")
    return [cls, *qa, sep, *qb, sep], [0] * (len(qa) + 2) + [1] * (len(qb) + 1)


def frozen_copy(m: _Layer) -> _Layer:
    """A copy of merged layer weights that carries no autograd history (for inference)."""
    out = _Layer()
    for name in _Layer.__slots__:
        setattr(out, name, getattr(m, name).detach().contiguous())
    return out
