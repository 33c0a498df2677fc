"""A Llama-family decoder written for Strata: RMSNorm, RoPE, grouped-query attention over the
paged KV cache, SwiGLU MLP, tied embeddings. Dense weights dequantized from a GGUF file; the quantization
passes (models/quantize.py) replace its projections afterwards.

It serves three GGUF architectures, which differ only in what their files hold (read from the tensors
and the metadata, never from a file name):
- `llama` (SmolLM2, Llama, Mistral): llama.cpp's converter permutes the Q and K rows (undone at load);
- `qwen2`: biases on the Q, K and V projections;
- `qwen3`: an RMSNorm over each Q and K head before RoPE, and a head size of its own
  (`attention.key_length`, 128 where hidden / heads is 64).
The layer stack (kernels.LayerStack) has neither biases nor Q/K norms: those models run the row kernels or
torch."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import KernelBackends, LayerStack, StackLayerWeights, add_rms_norm_, rotary_, silu_and_mul
from kernels import available as kernels_available
from services.inference.models.attention import AttentionMetadata, paged_attention
from services.inference.models.compute import ComputePath, StepPath
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.linear import DenseLinear, GGUFEmbedding, Linear
from services.inference.models.ops import apply_rope, rms_norm, rope_cache, unpermute_qk

PROJECTIONS = ("qkv", "o", "gate_up", "down")      # a layer's projections, in the order they run


@dataclass(slots=True, frozen=True)
class LlamaHParams:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False             # qwen2: biases on Q, K and V
    qk_norm: bool = False              # qwen3: RMSNorm over each Q and K head before RoPE
    permuted_qk: bool = True           # llama.cpp permuted the Q/K rows (its `llama` converter only)
    rope_scale: float = 1.0            # linear RoPE scaling (`rope.scaling.type` "linear"): positions / factor
    # per rotary frequency, the divisor of its inverse frequency (the `rope_freqs.weight` tensor): how
    # llama.cpp stores Llama 3.1+'s rope_scaling type "llama3" (factor, low/high_freq_factor, original context)
    rope_freq_factors: tuple[float, ...] | None = None

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "LlamaHParams":
        """Every value from the file's `<architecture>.*` metadata."""
        g = lambda k, d=None: gguf.field(f"{gguf.architecture}.{k}", d)  # noqa: E731
        hidden = int(g("embedding_length"))
        heads = int(g("attention.head_count"))
        scaling = g("rope.scaling.type")
        if scaling not in (None, "none", "linear"):
            raise ValueError(f"unsupported RoPE scaling {scaling!r} in {gguf.path.name}: Strata serves linear "
                             "scaling and per-frequency factors (rope_freqs.weight, Llama 3's \"llama3\" type)")
        head_dim = int(g("attention.key_length", g("rope.dimension_count", hidden // heads)))
        factors = None
        if gguf.has_tensor("rope_freqs.weight"):
            factors = tuple(float(x) for x in gguf.dequantize("rope_freqs.weight").reshape(-1))
            if len(factors) != head_dim // 2 or not all(x > 0 for x in factors):
                raise ValueError(f"rope_freqs.weight holds {len(factors)} factors (positive, one per rotary "
                                 f"frequency: {head_dim // 2} expected)")
        vocab = g("vocab_size")
        if vocab is None:
            vocab = len(gguf.field("tokenizer.ggml.tokens"))
        return cls(
            num_layers=int(g("block_count")),
            hidden_size=hidden,
            intermediate_size=int(g("feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(g("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rope_theta=float(g("rope.freq_base", 10000.0)),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            vocab_size=int(vocab),
            max_position_embeddings=int(g("context_length", 2048)),
            tie_word_embeddings=not gguf.has_tensor("output.weight"),
            qkv_bias=gguf.has_tensor("blk.0.attn_q.bias"),
            qk_norm=gguf.has_tensor("blk.0.attn_q_norm.weight"),
            permuted_qk=gguf.architecture == "llama",
            rope_scale=float(g("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            rope_freq_factors=factors,
        )


class LlamaLayer:
    """One block's weights: RMSNorm vectors and projections (see models/linear.py); qkv_bias [q + 2 kv]
    (qwen2) and q_norm / k_norm [head_dim] (qwen3) where the file has them, else None."""

    __slots__ = ("attn_norm", "qkv", "o", "ffn_norm", "gate_up", "down", "qkv_bias", "q_norm", "k_norm")

    def __init__(self, attn_norm, qkv, o, ffn_norm, gate_up, down, qkv_bias=None, q_norm=None, k_norm=None) -> None:
        self.attn_norm, self.qkv, self.o = attn_norm, qkv, o
        self.ffn_norm, self.gate_up, self.down = ffn_norm, gate_up, down
        self.qkv_bias, self.q_norm, self.k_norm = qkv_bias, q_norm, k_norm


class LlamaModel:
    """Inference-only model; `forward` runs one engine step over flattened tokens."""

    PROJECTIONS = PROJECTIONS
    SMOOTHQUANT = True           # the int8 pass's calibration (models/smoothquant.py) runs this block

    def __init__(self, hp: LlamaHParams, layers: list[LlamaLayer], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: Linear, dtype: torch.dtype) -> None:
        """With tied embeddings lm_head holds a transposed copy of the embedding table."""
        self.hp, self.layers, self.dtype = hp, layers, dtype
        self.device = final_norm.device
        # embed: the float table [vocab, hidden], or after the gguf pass its blocks (linear.GGUFEmbedding)
        self.quantization: str | None = None      # set by the pass that quantized it (models/quantize.py)
        self.architecture = "llama"               # the GGUF's general.architecture (from_gguf sets it)
        self.embed, self.final_norm, self.lm_head = embed, final_norm, lm_head
        self.q_size = hp.num_heads * hp.head_dim
        self.kv_size = hp.num_kv_heads * hp.head_dim
        self.scale = hp.head_dim ** -0.5
        self.cos, self.sin = rope_cache(hp.head_dim, hp.max_position_embeddings, hp.rope_theta, hp.rope_scale,
                                        hp.rope_freq_factors)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  skip: Collection[str] = ()) -> "LlamaModel":
        """Dense weights in `dtype` on `device` (loaded on CPU, then moved). Quantized projections come from
        a pass over the loaded model (models/quantize.py; models/registry.load_model runs it). `skip`: GGUF
        tensors left unloaded (None), because that pass gives them the file's blocks: they are never
        dequantized to float32 (a projection is None when any of its sources is skipped)."""
        hp = cls.hparams_from_gguf(gguf)
        w = lambda name: torch.from_numpy(gguf.dequantize(name))  # noqa: E731
        cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
        dense = lambda t: DenseLinear(t.t().to(dtype))  # noqa: E731 - [out, in] -> [in, out]
        layers = []
        for i in range(hp.num_layers):
            src = cls.projection_sources(hp, i)

            def parts(name: str, src: dict[str, list[tuple[str, int | None]]] = src) -> DenseLinear | None:
                if any(t in skip for t, _ in src[name]):
                    return None
                return dense(torch.cat([w(t) if h is None else unpermute_qk(w(t), h) for t, h in src[name]]))

            p = f"blk.{i}."
            layers.append(LlamaLayer(
                attn_norm=cast(w(p + "attn_norm.weight")),
                qkv=parts("qkv"),
                o=parts("o"),
                ffn_norm=cast(w(p + "ffn_norm.weight")),
                gate_up=parts("gate_up"),
                down=parts("down"),
                qkv_bias=cast(torch.cat([w(p + f"attn_{x}.bias") for x in "qkv"])) if hp.qkv_bias else None,
                q_norm=cast(w(p + "attn_q_norm.weight")) if hp.qk_norm else None,
                k_norm=cast(w(p + "attn_k_norm.weight")) if hp.qk_norm else None,
            ))
        embed = None if "token_embd.weight" in skip else cast(w("token_embd.weight"))
        head = cls.lm_head_source(hp)
        if head in skip:
            lm_head = None
        else:
            lm_head = dense(embed if hp.tie_word_embeddings and embed is not None else w(head))
        model = cls(hp, layers, embed, cast(w("output_norm.weight")), lm_head, dtype)
        model.architecture = gguf.architecture
        if torch.device(device).type != "cpu":
            model.to(torch.device(device))
        return model

    @staticmethod
    def hparams_from_gguf(gguf: GGUFFile) -> LlamaHParams:
        return LlamaHParams.from_gguf(gguf)

    @staticmethod
    def projection_sources(hp: LlamaHParams, layer: int) -> dict[str, list[tuple[str, int | None]]]:
        """Per projection of layer `layer`, the GGUF tensors whose rows it stacks, in order, each with the
        head count to undo llama.cpp's Q/K row permutation with (None: rows as stored)."""
        p = f"blk.{layer}."
        q_heads, kv_heads = (hp.num_heads, hp.num_kv_heads) if hp.permuted_qk else (None, None)
        return {"qkv": [(p + "attn_q.weight", q_heads), (p + "attn_k.weight", kv_heads),
                        (p + "attn_v.weight", None)],
                "o": [(p + "attn_output.weight", None)],
                "gate_up": [(p + "ffn_gate.weight", None), (p + "ffn_up.weight", None)],
                "down": [(p + "ffn_down.weight", None)]}

    @staticmethod
    def lm_head_source(hp: LlamaHParams) -> str:
        """The GGUF tensor of the LM head: the embedding table when tied."""
        return "token_embd.weight" if hp.tie_word_embeddings else "output.weight"

    def to(self, device: torch.device) -> "LlamaModel":
        """Moves the dense weights and the rotary tables to `device` (in place; returns self)."""
        if self.quantization:
            raise ValueError("quantized models run on CPU only")
        move = lambda t: t.to(device)  # noqa: E731
        for layer in self.layers:
            layer.attn_norm, layer.ffn_norm = move(layer.attn_norm), move(layer.ffn_norm)
            layer.qkv_bias, layer.q_norm, layer.k_norm = (None if x is None else move(x)
                                                          for x in (layer.qkv_bias, layer.q_norm, layer.k_norm))
            for name in PROJECTIONS:
                setattr(layer, name, DenseLinear(move(getattr(layer, name).weight)))
        self.embed, self.final_norm = move(self.embed), move(self.final_norm)
        self.lm_head = DenseLinear(move(self.lm_head.weight))
        self.cos, self.sin = move(self.cos), move(self.sin)
        self.device = self.embed.device
        return self

    def layer_stack(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                    layer_groups: Sequence[int] | None = None) -> LayerStack | None:
        """The quantized layers bound to these KV pools for kernels.LayerStack (one C++ call per step of
        up to 16 paged rows), or None where it does not apply (dense weights, kernels off, non-float32 pools).
        layer_groups: each layer's KV layer group (engine/kv_layout.py; all 0 for these models)."""
        if not self._stack_applies(kv_caches):
            return None
        return self._bind_stack([{} for _ in self.layers], kv_caches, block_size, "silu")

    def _stack_applies(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        return self.quantization is not None and kernels_available() and kv_caches[0][0].dtype == torch.float32

    def _bind_stack(self, extra: list[dict], kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                    act: str) -> LayerStack:
        """kernels.LayerStack over these layers and pools, each layer's StackLayerWeights given `extra` fields."""
        hp = self.hp
        weights = [StackLayerWeights(layer.attn_norm.contiguous(), layer.ffn_norm.contiguous(),
                                     *(getattr(layer, name).kernel for name in PROJECTIONS), k_pool, v_pool,
                                     qkv_bias=layer.qkv_bias, q_norm=layer.q_norm, k_norm=layer.k_norm, **more)
                   for layer, (k_pool, v_pool), more in zip(self.layers, kv_caches, extra)]
        return LayerStack(weights, hidden=hp.hidden_size, heads=hp.num_heads, kv_heads=hp.num_kv_heads,
                          head_dim=hp.head_dim, inter=hp.intermediate_size, block_size=block_size,
                          eps=hp.rms_norm_eps, scale=self.scale, act=act)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                compute: ComputePath) -> torch.Tensor:
        """input_ids/positions [T] -> final hidden states [T, hidden] (before the final norm), along the path
        `compute` (models/compute.py: chosen once for this model over kv_caches) gives a step like this one."""
        hp = self.hp
        cos, sin = self.cos[positions], self.sin[positions]
        if self.dtype != torch.float32:
            cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        h = self.embed(input_ids) if isinstance(self.embed, GGUFEmbedding) else F.embedding(input_ids, self.embed)
        path = compute.step_path(h.shape[0], not meta.prefills)
        if path is StepPath.LAYER_STACK:
            return compute.layer_stack(h, cos, sin, meta.slot_mapping, meta.paged_plan)
        if path is StepPath.ROW_KERNELS:
            return self._forward_fused(h, cos, sin, kv_caches, meta, compute.kernels)
        t = h.shape[0]
        for layer, (k_pool, v_pool) in zip(self.layers, kv_caches):
            # attention
            x = rms_norm(h, layer.attn_norm, hp.rms_norm_eps)
            q, k, v = self.project_qkv(layer, x)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            a = paged_attention(q, k, v, k_pool, v_pool, meta, self.scale, compute.kernels)
            h = h + layer.o(a.reshape(t, self.q_size))
            # mlp
            x = rms_norm(h, layer.ffn_norm, hp.rms_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        return h

    def project_qkv(self, layer: LlamaLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] (normed) -> q [T, heads, D], k and v [T, kv_heads, D], before RoPE: the projection,
        its bias (qwen2) and the per-head norms (qwen3). The torch forward and SmoothQuant's calibration run
        this; the row-kernel forward does the same in place."""
        hp, t = self.hp, x.shape[0]
        qkv = layer.qkv(x)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.reshape(t, hp.num_heads, hp.head_dim), k.reshape(t, hp.num_kv_heads, hp.head_dim)
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm, hp.rms_norm_eps), rms_norm(k, layer.k_norm, hp.rms_norm_eps)
        return q, k, v.reshape(t, hp.num_kv_heads, hp.head_dim)

    def _forward_fused(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                       kernels: KernelBackends) -> torch.Tensor:
        """forward() with the compiled row kernels (float32; C++ on CPU, CUDA or Triton on a GPU, as
        `kernels.rows` says): each residual add is fused into the next RMSNorm, Q and K are rotated in place
        inside the QKV projection's output (its first heads), and SiLU-and-mul reads the gate/up projection's
        output in one pass."""
        hp = self.hp
        t, eps, rows = h.shape[0], hp.rms_norm_eps, kernels.rows
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        pending = None                            # the MLP output not yet added to h
        for layer, (k_pool, v_pool) in zip(self.layers, kv_caches):
            x = add_rms_norm_(h, pending, layer.attn_norm, eps, rows)
            qkv = layer.qkv(x)
            if layer.qkv_bias is not None:
                qkv.add_(layer.qkv_bias)
            if layer.q_norm is not None:                  # each Q and K head normalized, before RoPE (the kernel
                d = hp.head_dim                           # the layer stack runs: the same bits)
                qkv[:, :q_end] = add_rms_norm_(qkv[:, :q_end].reshape(t * hp.num_heads, d), None, layer.q_norm, eps,
                                               rows).view(t, q_end)
                qkv[:, q_end:k_end] = add_rms_norm_(qkv[:, q_end:k_end].reshape(t * hp.num_kv_heads, d), None,
                                                    layer.k_norm, eps, rows).view(t, k_end - q_end)
            qkv = rotary_(qkv, hp.num_heads + hp.num_kv_heads, hp.head_dim, cos, sin, rows)
            q = qkv[:, :q_end].view(t, hp.num_heads, hp.head_dim)
            k = qkv[:, q_end:k_end].view(t, hp.num_kv_heads, hp.head_dim)
            v = qkv[:, k_end:].view(t, hp.num_kv_heads, hp.head_dim)
            a = paged_attention(q, k, v, k_pool, v_pool, meta, self.scale, kernels)
            x = add_rms_norm_(h, layer.o(a.reshape(t, self.q_size)), layer.ffn_norm, eps, rows)
            pending = layer.down(silu_and_mul(layer.gate_up(x), rows))
        return h.add_(pending) if pending is not None else h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Selected hidden rows [N, hidden] -> float32 logits [N, vocab] (the final norm in one kernel call
        where the row kernels run)."""
        x = add_rms_norm_(hidden.contiguous(), None, self.final_norm, self.hp.rms_norm_eps)
        return self.lm_head(x).float()
