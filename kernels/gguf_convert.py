"""GGUF block types the GEMV kernels do not multiply as stored (kernels.gguf: Q4_1, Q8_0, Q5_0 and Q4_K are),
rewritten at load into one they do, one 32-weight block for each 32 weights, so the same products run:

- Q6_K -> Q8_0: a Q6_K super-block has 16 sub-blocks of 16 with their own int8 scales, which no 32-weight
  block holds, so its weights (as ggml dequantizes them) are quantized again to Q8_0: 8 bits over each 32
  weights' largest, at most half a step off plus the fp16 rounding of the scale (0.56 of largest / 127);
  8.5 bits a weight instead of 6.56. llama.cpp multiplies Q6_K directly (a kernel of its own is what is
  left: Gemma 3 270M's Q6_K projections read 1.3x their file's bytes this way).
- Q5_0 -> Q8_0, only where a fused projection joins Q5_0 and Q8_0 tensors (Gemma 3's Q|K|V: Q and K Q5_0,
  V Q8_0), exactly: codes q - 16 widened to int8 with the same scale are the same weights (8.5 bits a
  weight instead of 5.5). Elsewhere Q5_0 runs on its own kernel (csrc/cpu/gguf_gemv.h).

Q4_K was converted to Q4_1 (its sub-block scale and offset rounded to fp16) until its own kernel."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NATIVE = ("Q4_1", "Q8_0", "Q5_0", "Q4_K")                       # the types kernels.GGUFMatrix multiplies
CONVERTED = {"Q6_K": "Q8_0"}                                    # file type -> the kernel type it becomes


def kernel_type(file_type: str) -> str:
    """The block type a file tensor of `file_type` is multiplied as (itself for the NATIVE ones)."""
    return CONVERTED.get(file_type, file_type)


def fused_kernel_type(file_types: Iterable[str]) -> str | None:
    """The one block type tensors of these file types are multiplied as when fused into one projection:
    their common kernel_type; Q8_0 for Q5_0 with Q8_0 (widened exactly); None where there is none."""
    kinds = {kernel_type(t) for t in file_types}
    if kinds == {"Q5_0", "Q8_0"}:
        return "Q8_0"
    return kinds.pop() if len(kinds) == 1 and kinds <= set(NATIVE) else None


def kernel_bytes(file_type: str, n_bytes: int, n_elements: int, to: str | None = None) -> int:
    """Bytes the kernels read for a tensor stored as `file_type` in `n_bytes`, multiplied as `to` (default
    kernel_type(file_type)): its converted blocks' where it is converted (Q4_1: 20 bytes a 32 weights, Q8_0:
    34), else the file's."""
    to = to or kernel_type(file_type)
    if to == file_type:
        return n_bytes
    return n_elements // 32 * {"Q4_1": 20, "Q8_0": 34}[to]


def convert(raw: np.ndarray, file_type: str, k: int, to: str | None = None) -> tuple[np.ndarray, str]:
    """A tensor's file bytes uint8 [N, row bytes] (rows of K weights) -> (uint8 [N, K / 32 * block bytes],
    kernel type): the blocks of `to` (default kernel_type(file_type)) for the same weights (see the module's
    note; `to` may only widen Q5_0 to Q8_0)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    to = to or kernel_type(file_type)
    if file_type == "Q5_0" and to == "Q8_0":
        blocks = raw.reshape(n * (k // 32), 22)
        qh = blocks[:, 2:6].copy().view("<u4")[:, 0]                        # bit j: code j's fifth bit
        qs = blocks[:, 6:22]
        low = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16)  # codes 0..15 and 16..31, low bits
        high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
        codes = (low | high) - 16
        out = np.concatenate([blocks[:, :2], codes.astype(np.int8).view(np.uint8)], axis=1)
        return out.reshape(n, -1), "Q8_0"
    if to != kernel_type(file_type):
        raise ValueError(f"GGUF type {file_type} cannot be converted to {to}")
    if file_type in NATIVE:
        return raw, file_type
    if file_type == "Q6_K":
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize

        weights = dequantize(raw, GGMLQuantizationType.Q6_K).reshape(n, k)
        return np.ascontiguousarray(quantize(weights, GGMLQuantizationType.Q8_0)).reshape(n, -1), "Q8_0"
    raise ValueError(f"no kernel form for GGUF type {file_type}")
