"""A Llama-family decoder written for Strata: RMSNorm, RoPE, grouped-query attention over the
paged KV cache, SwiGLU MLP, tied embeddings. Weights come dequantized from a GGUF file."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels import GGUFMatrix, LayerStack, StackLayerWeights, add_rms_norm_, rotary_, silu_and_mul
from kernels import available as kernels_available
from kernels.layers import row_kernels_on
from services.inference.models.attention import AttentionMetadata, paged_attention
from services.inference.models.gguf_file import GGUFFile, LlamaHParams
from services.inference.models.linear import DenseLinear, GGUFLinear, Int8Linear, Int8WeightLinear, Linear

QUANTIZATIONS = ("int8", "gguf")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of Q/K projections (back to HF's rotate-half layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cache(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()                                # [P, D/2] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] with cos/sin [T, D/2], rotate-half (NeoX) layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class LlamaLayer:
    """One block's weights: RMSNorm vectors and projections (see models/linear.py)."""

    __slots__ = ("attn_norm", "qkv", "o", "ffn_norm", "gate_up", "down")

    def __init__(self, attn_norm, qkv, o, ffn_norm, gate_up, down) -> None:
        self.attn_norm, self.qkv, self.o = attn_norm, qkv, o
        self.ffn_norm, self.gate_up, self.down = ffn_norm, gate_up, down


class LlamaModel:
    """Inference-only model; `forward` runs one engine step over flattened tokens."""

    def __init__(self, hp: LlamaHParams, layers: list[LlamaLayer], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: Linear, dtype: torch.dtype) -> None:
        """With tied embeddings lm_head holds a transposed copy of the embedding table."""
        self.hp, self.layers, self.dtype = hp, layers, dtype
        self.device = embed.device
        self.quantization: str | None = None
        self.embed, self.final_norm, self.lm_head = embed, final_norm, lm_head
        self.q_size = hp.num_heads * hp.head_dim
        self.kv_size = hp.num_kv_heads * hp.head_dim
        self.scale = hp.head_dim ** -0.5
        self.cos, self.sin = rope_cache(hp.head_dim, hp.max_position_embeddings, hp.rope_theta)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, dtype: torch.dtype = torch.float32,
                  quantization: str | None = None, device: str | torch.device = "cpu") -> "LlamaModel":
        """quantization=None keeps dense weights; "int8" = W8A8 with SmoothQuant; "gguf" = the file's own
        Q4_1 / Q8_0 blocks for decode (kernels.GGUFMatrix) with float32 copies for prefill. Both run
        float32 activations, on CPU only. `device` "cuda" (or "cuda:N") puts the dense weights on that GPU."""
        if quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"unknown quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
        if quantization and dtype != torch.float32:
            raise ValueError(f"{quantization} quantization runs with float32 activations (dtype float32)")
        device = torch.device(device)
        if quantization and device.type != "cpu":
            raise ValueError(f"{quantization} quantization runs on CPU only (its kernels are CPU kernels); "
                             f"device {device} serves dense weights")
        hp = gguf.hparams
        w = lambda name: torch.from_numpy(gguf.dequantize(name))  # noqa: E731
        cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
        dense = lambda t: DenseLinear(t.t().to(dtype))  # noqa: E731 - [out, in] -> [in, out]
        layers = []
        for i in range(hp.num_layers):
            p = f"blk.{i}."
            q = unpermute_qk(w(p + "attn_q.weight"), hp.num_heads)
            k = unpermute_qk(w(p + "attn_k.weight"), hp.num_kv_heads)
            layers.append(LlamaLayer(
                attn_norm=cast(w(p + "attn_norm.weight")),
                qkv=dense(torch.cat([q, k, w(p + "attn_v.weight")])),
                o=dense(w(p + "attn_output.weight")),
                ffn_norm=cast(w(p + "ffn_norm.weight")),
                gate_up=dense(torch.cat([w(p + "ffn_gate.weight"), w(p + "ffn_up.weight")])),
                down=dense(w(p + "ffn_down.weight")),
            ))
        embed = cast(w("token_embd.weight"))
        lm_head = dense(embed if hp.tie_word_embeddings else w("output.weight"))
        model = cls(hp, layers, embed, cast(w("output_norm.weight")), lm_head, dtype)
        if quantization == "int8":
            model.quantize_int8(gguf)
        elif quantization == "gguf":
            model.use_gguf_blocks(gguf)
        elif device.type != "cpu":
            model.to(device)
        return model

    def to(self, device: torch.device) -> "LlamaModel":
        """Moves the dense weights and the rotary tables to `device` (in place; returns self)."""
        if self.quantization:
            raise ValueError("quantized models run on CPU only")
        move = lambda t: t.to(device)  # noqa: E731
        for layer in self.layers:
            layer.attn_norm, layer.ffn_norm = move(layer.attn_norm), move(layer.ffn_norm)
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(layer, name, DenseLinear(move(getattr(layer, name).weight)))
        self.embed, self.final_norm = move(self.embed), move(self.final_norm)
        self.lm_head = DenseLinear(move(self.lm_head.weight))
        self.cos, self.sin = move(self.cos), move(self.sin)
        self.device = self.embed.device
        return self

    def use_gguf_blocks(self, gguf: GGUFFile) -> None:
        """Every projection (and the LM head) multiplies the file's own blocks for decode-sized inputs:
        rows are reordered and concatenated exactly as the dense weights were (Q/K un-permuted, Q|K|V and
        gate|up fused), so the weights are the same numbers, 5 (Q4_1) or 8.5 (Q8_0) bits each."""
        hp = self.hp

        def blocks(name: str) -> tuple[torch.Tensor, str, int]:
            t = gguf.raw_tensor(name)
            kind = gguf.tensor_type(name)
            if kind not in ("Q4_1", "Q8_0"):
                raise ValueError(f"quantization 'gguf' needs Q4_1 or Q8_0 tensors; {name} is {kind}")
            return torch.from_numpy(np.array(t.data, copy=True)), kind, int(t.shape[0])

        def fused(*parts: tuple[torch.Tensor, str, int]) -> GGUFMatrix:
            kinds = {p[1] for p in parts}
            if len(kinds) != 1:
                raise ValueError(f"fused projections need one block type, got {sorted(kinds)}")
            return GGUFMatrix(torch.cat([p[0] for p in parts]), kinds.pop(), parts[0][2])

        for i, layer in enumerate(self.layers):
            p = f"blk.{i}."
            q, k = blocks(p + "attn_q.weight"), blocks(p + "attn_k.weight")
            q = (unpermute_qk(q[0], hp.num_heads), *q[1:])           # whole rows move: blocks stay intact
            k = (unpermute_qk(k[0], hp.num_kv_heads), *k[1:])
            mats = {"qkv": fused(q, k, blocks(p + "attn_v.weight")), "o": fused(blocks(p + "attn_output.weight")),
                    "gate_up": fused(blocks(p + "ffn_gate.weight"), blocks(p + "ffn_up.weight")),
                    "down": fused(blocks(p + "ffn_down.weight"))}
            for name, mat in mats.items():
                setattr(layer, name, GGUFLinear(mat, getattr(layer, name).weight))
        head = blocks("token_embd.weight" if hp.tie_word_embeddings else "output.weight")
        self.lm_head = GGUFLinear(fused(head), self.lm_head.weight)
        self.quantization = "gguf"

    def quantize_int8(self, gguf: GGUFFile) -> None:
        """Smooth (calibrated on fixed prompts) then quantize every block projection to W8A8, and the LM
        head to weight-only int8 (its activations stay float32: W8A8 there cost more quality than it
        saved time, weight-only keeps the logits close and reads a quarter of the bytes)."""
        from services.inference.models import smoothquant
        from services.inference.models.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(gguf)
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
                   for p in smoothquant.CALIBRATION_PROMPTS]
        smoothquant.smooth(self, smoothquant.activation_maxima(self, prompts))
        for layer in self.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(layer, name, Int8Linear(getattr(layer, name).weight))
        self.lm_head = Int8WeightLinear(self.lm_head.weight)
        self.quantization = "int8"

    def layer_stack(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int) -> LayerStack | None:
        """The quantized layers bound to these KV pools for kernels.LayerStack (one C++ call per step of
        up to 16 paged rows), or None where it does not apply (dense weights, kernels off, non-float32 pools)."""
        if self.quantization not in QUANTIZATIONS or not kernels_available() or kv_caches[0][0].dtype != torch.float32:
            return None
        hp = self.hp
        weights = [StackLayerWeights(layer.attn_norm.contiguous(), layer.ffn_norm.contiguous(),
                                     *(p.kernel for p in (layer.qkv, layer.o, layer.gate_up, layer.down)), k_pool, v_pool)
                   for layer, (k_pool, v_pool) in zip(self.layers, kv_caches)]
        return LayerStack(weights, hidden=hp.hidden_size, heads=hp.num_heads, kv_heads=hp.num_kv_heads,
                              head_dim=hp.head_dim, inter=hp.intermediate_size, block_size=block_size,
                              eps=hp.rms_norm_eps, scale=self.scale)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                stack: LayerStack | None = None) -> torch.Tensor:
        """input_ids/positions [T] -> final hidden states [T, hidden] (before the final norm). With
        `stack` (this model's layer_stack over kv_caches), steps of only paged rows, few enough, run the
        layers in one C++ call."""
        hp = self.hp
        cos, sin = self.cos[positions], self.sin[positions]
        if self.dtype != torch.float32:
            cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        h = F.embedding(input_ids, self.embed)
        if stack is not None and meta.paged_plan is not None and not meta.prefills and h.shape[0] <= stack.MAX_ROWS:
            return stack(h, cos, sin, meta.slot_mapping, meta.paged_plan)
        if self.dtype == torch.float32 and row_kernels_on(h.device):
            return self._forward_fused(h, cos, sin, kv_caches, meta)
        t = h.shape[0]
        for layer, (k_pool, v_pool) in zip(self.layers, kv_caches):
            # attention
            x = rms_norm(h, layer.attn_norm, hp.rms_norm_eps)
            qkv = layer.qkv(x)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(t, hp.num_heads, hp.head_dim), cos, sin)
            k = apply_rope(k.view(t, hp.num_kv_heads, hp.head_dim), cos, sin)
            v = v.view(t, hp.num_kv_heads, hp.head_dim)
            a = paged_attention(q, k, v, k_pool, v_pool, meta, self.scale)
            h = h + layer.o(a.reshape(t, self.q_size))
            # mlp
            x = rms_norm(h, layer.ffn_norm, hp.rms_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        return h

    def _forward_fused(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """forward() with the compiled row kernels (float32; C++ on CPU, CUDA or Triton on a GPU): each residual add is fused into the next
        RMSNorm, Q and K are rotated in place inside the QKV projection's output (its first heads), and
        SiLU-and-mul reads the gate/up projection's output in one pass."""
        hp = self.hp
        t, eps = h.shape[0], hp.rms_norm_eps
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        pending = None                            # the MLP output not yet added to h
        for layer, (k_pool, v_pool) in zip(self.layers, kv_caches):
            x = add_rms_norm_(h, pending, layer.attn_norm, eps)
            qkv = rotary_(layer.qkv(x), hp.num_heads + hp.num_kv_heads, hp.head_dim, cos, sin)
            q = qkv[:, :q_end].view(t, hp.num_heads, hp.head_dim)
            k = qkv[:, q_end:k_end].view(t, hp.num_kv_heads, hp.head_dim)
            v = qkv[:, k_end:].view(t, hp.num_kv_heads, hp.head_dim)
            a = paged_attention(q, k, v, k_pool, v_pool, meta, self.scale)
            x = add_rms_norm_(h, layer.o(a.reshape(t, self.q_size)), layer.ffn_norm, eps)
            pending = layer.down(silu_and_mul(layer.gate_up(x)))
        return h.add_(pending) if pending is not None else h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Selected hidden rows [N, hidden] -> float32 logits [N, vocab]."""
        x = rms_norm(hidden, self.final_norm, self.hp.rms_norm_eps)
        return self.lm_head(x).float()
