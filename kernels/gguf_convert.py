"""GGUF block types the GEMV kernels do not multiply, rewritten at load into two they do (kernels.gguf:
Q4_1, Q8_0 and Q5_0 natively), one 32-weight block for each 32 weights, so the same products run:

- Q4_K -> Q4_1: a Q4_K super-block of 256 holds 8 sub-blocks of 32 with 4-bit codes, weight = d * sc * q -
  dmin * m (6-bit sc and m, fp16 d and dmin). Each sub-block becomes a Q4_1 block with the same codes, scale
  fp16(d * sc) and offset fp16(-dmin * m): the two products rounded to fp16 (11 significant bits), at most
  2^-11 of the sub-block's scale and offset; 5 bits a weight instead of 4.5.
- Q6_K -> Q8_0: a Q6_K super-block has 16 sub-blocks of 16 with their own int8 scales, which no 32-weight
  block holds, so its weights (as ggml dequantizes them) are quantized again to Q8_0: 8 bits over each 32
  weights' largest, at most half a step off plus the fp16 rounding of the scale (0.56 of largest / 127);
  8.5 bits a weight instead of 6.56.

llama.cpp's own kernels multiply these types directly; writing kernels for them is the next step where the
bytes matter (Gemma 3 270M: its Q6_K projections read 1.3x their file's bytes this way, its Q4_K 1.1x).

- Q5_0 -> Q8_0, only where a fused projection joins Q5_0 and Q8_0 tensors (Gemma 3's Q|K|V: Q and K Q5_0,
  V Q8_0), exactly: codes q - 16 widened to int8 with the same scale are the same weights (8.5 bits a
  weight instead of 5.5). Elsewhere Q5_0 runs on its own kernel (csrc/cpu/gguf_gemv.h)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NATIVE = ("Q4_1", "Q8_0", "Q5_0")                               # the types kernels.GGUFMatrix multiplies
CONVERTED = {"Q4_K": "Q4_1", "Q6_K": "Q8_0"}                    # file type -> the kernel type it becomes


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
    if file_type == "Q4_K":
        from gguf.quants import Q4_K

        blocks = raw.reshape(n * (k // 256), 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)       # [B, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])                         # [B, 8] each, sub-block order
        scale = (d * sc.astype(np.float32)).astype(np.float16)              # the one rounding
        offset = (-(dmin * mn.astype(np.float32))).astype(np.float16)
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 15).reshape(-1, 8, 32)                                 # sub-block 2c: low nibbles of chunk c
        packed = codes[..., :16] | (codes[..., 16:] << 4)                    # Q4_1: value i low, i + 16 high
        out = np.concatenate([scale.reshape(-1, 8, 1).view(np.uint8).reshape(-1, 8, 2),
                              offset.reshape(-1, 8, 1).view(np.uint8).reshape(-1, 8, 2), packed], axis=2)
        return out.reshape(n, -1), "Q4_1"
    if file_type == "Q6_K":
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize

        weights = dequantize(raw, GGMLQuantizationType.Q6_K).reshape(n, k)
        return np.ascontiguousarray(quantize(weights, GGMLQuantizationType.Q8_0)).reshape(n, -1), "Q8_0"
    raise ValueError(f"no kernel form for GGUF type {file_type}")
