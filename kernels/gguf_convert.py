"""GGUF block types the GEMV kernels do not multiply, rewritten at load into the two they do (kernels.gguf:
Q4_1 and Q8_0), one 32-weight block for each 32 weights, so the same products run:

- Q5_0 -> Q8_0, exactly: a Q5_0 block is an fp16 scale and 32 codes of 5 bits (weight = d * (q - 16)); the
  codes q - 16 widened to int8 with the same scale are the same weights (8.5 bits a weight instead of 5.5).
- Q4_K -> Q4_1: a Q4_K super-block of 256 holds 8 sub-blocks of 32 with 4-bit codes, weight = d * sc * q -
  dmin * m (6-bit sc and m, fp16 d and dmin). Each sub-block becomes a Q4_1 block with the same codes, scale
  fp16(d * sc) and offset fp16(-dmin * m): the two products rounded to fp16 (11 significant bits), at most
  2^-11 of the sub-block's scale and offset; 5 bits a weight instead of 4.5.
- Q6_K -> Q8_0: a Q6_K super-block has 16 sub-blocks of 16 with their own int8 scales, which no 32-weight
  block holds, so its weights (as ggml dequantizes them) are quantized again to Q8_0: 8 bits over each 32
  weights' largest, at most half a step off plus the fp16 rounding of the scale (0.56 of largest / 127);
  8.5 bits a weight instead of 6.56.

llama.cpp's own kernels multiply these types directly; writing kernels for them is the next step where the
bytes matter (Gemma 3 270M: its Q5_0 and Q6_K projections read 1.4x their file's bytes this way)."""

from __future__ import annotations

import numpy as np

CONVERTED = {"Q5_0": "Q8_0", "Q4_K": "Q4_1", "Q6_K": "Q8_0"}     # file type -> the kernel type it becomes
EXACT = frozenset({"Q5_0"})                                     # converted without any rounding


def kernel_type(file_type: str) -> str:
    """The block type a file tensor of `file_type` is multiplied as (itself for Q4_1 and Q8_0)."""
    return CONVERTED.get(file_type, file_type)


def kernel_bytes(file_type: str, n_bytes: int, n_elements: int) -> int:
    """Bytes the kernels read for a tensor stored as `file_type` in `n_bytes`: its converted blocks' where it
    is converted (Q4_1: 20 bytes a 32 weights, Q8_0: 34), else the file's."""
    if file_type not in CONVERTED:
        return n_bytes
    return n_elements // 32 * {"Q4_1": 20, "Q8_0": 34}[CONVERTED[file_type]]


def convert(raw: np.ndarray, file_type: str, k: int) -> tuple[np.ndarray, str]:
    """A tensor's file bytes uint8 [N, row bytes] (rows of K weights) -> (uint8 [N, K / 32 * block bytes],
    kernel type): the blocks of kernel_type(file_type) for the same weights (see the module's note)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    if file_type in ("Q4_1", "Q8_0"):
        return raw, file_type
    if file_type == "Q5_0":
        blocks = raw.reshape(n * (k // 32), 22)
        qh = blocks[:, 2:6].copy().view("<u4")[:, 0]                        # bit j: code j's fifth bit
        qs = blocks[:, 6:22]
        low = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16)  # codes 0..15 and 16..31, low bits
        high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
        codes = (low | high) - 16
        out = np.concatenate([blocks[:, :2], codes.astype(np.int8).view(np.uint8)], axis=1)
        return out.reshape(n, -1), "Q8_0"
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
