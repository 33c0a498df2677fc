"""Gemma 3 (GGUF architecture `gemma3`): the Llama block of models/llama.py with Gemma's changes, each read
from the file's tensors and metadata:
- interleaved local and global attention: every `sliding_window_pattern`-th layer (6; llama.cpp's and
  transformers' default, as the file does not say) attends to the whole context with RoPE base
  `rope.freq_base`, the others only to the last `attention.sliding_window` positions with base
  `rope.freq_base_swa` (10,000 where absent);
- an RMSNorm over each Q and K head before RoPE (as qwen3), and RMSNorms after attention and after the MLP
  as well as before them ("sandwich" norms; llama.cpp's converter stored every Gemma norm weight as 1 + w);
- a GELU (tanh approximation) gated MLP;
- embeddings scaled by sqrt(hidden); the LM head tied to them;
- attention scaled by 1/sqrt(head_dim) (llama.cpp's query_pre_attn_scalar for every size but 27B, and
  transformers' default of 256 for the head size of 256 these files have).
Each layer reads its own metadata (`AttentionMetadata.per_layer`: its group's block table, the local layers'
masks cut to their window; engine/kv_layout.py)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import KernelBackends, LayerStack, add_rms_norm_, gelu_tanh_and_mul, rotary_
from services.inference.models.attention import AttentionMetadata, paged_attention
from services.inference.models.compute import ComputePath, StepPath
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.linear import GGUFEmbedding
from services.inference.models.llama import LlamaHParams, LlamaLayer, LlamaModel
from services.inference.models.ops import apply_rope, rope_cache

DEFAULT_SLIDING_WINDOW_PATTERN = 6
DEFAULT_LOCAL_ROPE_BASE = 10000.0


@dataclass(slots=True, frozen=True)
class Gemma3HParams(LlamaHParams):
    sliding_window: int = 0                      # positions a local layer attends to (itself included)
    sliding_layers: tuple[bool, ...] = ()        # per layer: local (sliding-window) attention
    rope_theta_local: float = DEFAULT_LOCAL_ROPE_BASE
    final_logit_softcap: float | None = None

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "Gemma3HParams":
        base = LlamaHParams.from_gguf(gguf)
        g = lambda k, d=None: gguf.field(f"{gguf.architecture}.{k}", d)  # noqa: E731
        n = base.num_layers
        pattern = g("attention.sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN)
        if isinstance(pattern, list):                 # newer files: one flag per layer (True: local)
            sliding = tuple(bool(x) for x in pattern)
        else:
            sliding = tuple(bool((i + 1) % int(pattern)) for i in range(n))
        if len(sliding) != n:
            raise ValueError(f"sliding_window_pattern has {len(sliding)} entries for {n} layers")
        window = int(g("attention.sliding_window", 0))
        if window <= 0 and any(sliding):
            raise ValueError("gemma3 file without attention.sliding_window")
        if base.rope_freq_factors is not None:
            raise ValueError("gemma3 file with rope_freqs.weight: per-frequency RoPE factors are not a Gemma 3 feature")
        softcap = g("final_logit_softcapping")
        fields = {f: getattr(base, f) for f in LlamaHParams.__dataclass_fields__}
        fields.update(permuted_qk=False)             # the Gemma converter keeps HF's rotate-half rows
        return cls(**fields, sliding_window=window, sliding_layers=sliding,
                   rope_theta_local=float(g("rope.freq_base_swa", DEFAULT_LOCAL_ROPE_BASE)),
                   final_logit_softcap=None if softcap is None else float(softcap))


class Gemma3Layer(LlamaLayer):
    """A Llama layer's weights plus the norms after attention and after the MLP."""

    __slots__ = ("post_attn_norm", "post_ffn_norm")

    def __init__(self, *args, post_attn_norm, post_ffn_norm, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.post_attn_norm, self.post_ffn_norm = post_attn_norm, post_ffn_norm


class Gemma3Model(LlamaModel):
    """Inference-only Gemma 3; `forward` runs one engine step over flattened tokens (torch, with the row
    kernels' RMSNorm where they run)."""

    hp: Gemma3HParams
    SMOOTHQUANT = False          # its calibration runs the Llama block: int8 is refused

    def __init__(self, hp: Gemma3HParams, *args, **kwargs) -> None:
        super().__init__(hp, *args, **kwargs)
        positions = hp.max_position_embeddings
        self.cos, self.sin = rope_cache(hp.head_dim, positions, hp.rope_theta, hp.rope_scale)
        self.cos_local, self.sin_local = rope_cache(hp.head_dim, positions, hp.rope_theta_local)
        self.embed_scale = hp.hidden_size ** 0.5

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  skip: Collection[str] = ()) -> "Gemma3Model":
        """LlamaModel.from_gguf, then the post-attention and post-MLP norms of each layer."""
        base = super().from_gguf(gguf, dtype, "cpu", skip)
        w = lambda name: torch.from_numpy(gguf.dequantize(name)).to(dtype).contiguous()  # noqa: E731
        base.layers = [
            Gemma3Layer(*(getattr(layer, s) for s in LlamaLayer.__slots__),
                        post_attn_norm=w(f"blk.{i}.post_attention_norm.weight"),
                        post_ffn_norm=w(f"blk.{i}.post_ffw_norm.weight"))
            for i, layer in enumerate(base.layers)]
        if torch.device(device).type != "cpu":
            base.to(torch.device(device))
        return base

    @staticmethod
    def hparams_from_gguf(gguf: GGUFFile) -> Gemma3HParams:
        return Gemma3HParams.from_gguf(gguf)

    def to(self, device: torch.device) -> "Gemma3Model":
        super().to(device)
        for layer in self.layers:
            layer.post_attn_norm, layer.post_ffn_norm = layer.post_attn_norm.to(device), layer.post_ffn_norm.to(device)
        self.cos_local, self.sin_local = self.cos_local.to(device), self.sin_local.to(device)
        return self

    def layer_stack(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                    layer_groups: Sequence[int] | None = None) -> LayerStack | None:
        """The Llama stack with Gemma's parts: Q/K head norms, norms after attention and MLP, GELU-tanh, and per
        layer its rotary table (0 global, 1 local), window and KV layer group (`layer_groups`, required: the
        engine's layout, engine/kv_layout.py)."""
        if not self._stack_applies(kv_caches) or layer_groups is None:
            return None
        hp = self.hp
        extra = [dict(post_attn_norm=layer.post_attn_norm, post_ffn_norm=layer.post_ffn_norm, group=group,
                      rope=int(local), window=hp.sliding_window if local else 0)
                 for layer, local, group in zip(self.layers, hp.sliding_layers, layer_groups)]
        return self._bind_stack(extra, kv_caches, block_size, "gelu_tanh")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                compute: ComputePath) -> torch.Tensor:
        hp, kernels = self.hp, compute.kernels
        eps, rows = hp.rms_norm_eps, kernels.rows
        norm = lambda x, w: add_rms_norm_(x.contiguous(), None, w, eps, rows)  # noqa: E731
        rope = {False: (self.cos[positions], self.sin[positions]),
                True: (self.cos_local[positions], self.sin_local[positions])}
        if self.dtype != torch.float32:
            rope = {k: (c.to(self.dtype), s.to(self.dtype)) for k, (c, s) in rope.items()}
        h = self.embed(input_ids) if isinstance(self.embed, GGUFEmbedding) else F.embedding(input_ids, self.embed)
        h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        layer_meta = meta.per_layer or [meta] * hp.num_layers
        if compute.step_path(h.shape[0], not meta.prefills) is StepPath.LAYER_STACK:
            stack = compute.layer_stack
            layouts = [(layer_meta[i].slot_mapping, layer_meta[i].paged_plan) for i in stack.first_layers]
            return stack.run(h, [rope[False], rope[True]], layouts)
        if compute.row_kernels:
            return self._forward_fused(h, rope, kv_caches, layer_meta, kernels)
        t = h.shape[0]
        for i, (layer, local, (k_pool, v_pool)) in enumerate(zip(self.layers, hp.sliding_layers, kv_caches)):
            cos, sin = rope[local]
            q, k, v = self.project_qkv(layer, norm(h, layer.attn_norm))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            a = paged_attention(q, k, v, k_pool, v_pool, layer_meta[i], self.scale, kernels)
            h = h + norm(layer.o(a.reshape(t, self.q_size)), layer.post_attn_norm)
            gate, up = layer.gate_up(norm(h, layer.ffn_norm)).chunk(2, dim=-1)
            h = h + norm(layer.down(F.gelu(gate, approximate="tanh") * up), layer.post_ffn_norm)
        return h

    def _forward_fused(self, h: torch.Tensor, rope: dict[bool, tuple[torch.Tensor, torch.Tensor]],
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], layer_meta: list[AttentionMetadata],
                       kernels: KernelBackends) -> torch.Tensor:
        """forward() with the compiled row kernels (float32): every RMSNorm one kernel call (the Q and K head
        norms over [T * heads, D] rows), each residual add fused into the norm that follows it, RoPE in place on
        the normed heads."""
        hp = self.hp
        t, eps, rows, d = h.shape[0], hp.rms_norm_eps, kernels.rows, hp.head_dim
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        pending = None                            # the post-MLP-normed output not yet added to h
        for i, (layer, local, (k_pool, v_pool)) in enumerate(zip(self.layers, hp.sliding_layers, kv_caches)):
            cos, sin = rope[local]
            qkv = layer.qkv(add_rms_norm_(h, pending, layer.attn_norm, eps, rows))
            q = add_rms_norm_(qkv[:, :q_end].reshape(t * hp.num_heads, d), None, layer.q_norm, eps, rows)
            k = add_rms_norm_(qkv[:, q_end:k_end].reshape(t * hp.num_kv_heads, d), None, layer.k_norm, eps, rows)
            q = rotary_(q.view(t, q_end), hp.num_heads, d, cos, sin, rows).view(t, hp.num_heads, d)
            k = rotary_(k.view(t, self.kv_size), hp.num_kv_heads, d, cos, sin, rows).view(t, hp.num_kv_heads, d)
            v = qkv[:, k_end:].view(t, hp.num_kv_heads, d)
            a = paged_attention(q, k, v, k_pool, v_pool, layer_meta[i], self.scale, kernels)
            attn = add_rms_norm_(layer.o(a.reshape(t, q_end)), None, layer.post_attn_norm, eps, rows)
            gate_up = layer.gate_up(add_rms_norm_(h, attn, layer.ffn_norm, eps, rows))
            pending = add_rms_norm_(layer.down(gelu_tanh_and_mul(gate_up, rows)), None, layer.post_ffn_norm, eps, rows)
        return h.add_(pending) if pending is not None else h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.hp.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

