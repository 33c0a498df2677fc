"""What a fused projection multiplies when its GGUF tensors are of different block types (the kernels
multiply Q4_1, Q8_0, Q5_0, Q4_K and Q6_K as stored: kernels.gguf): one block type, Q8_0, that every part is
rewritten into at load, one 32-weight block for each 32 weights:

- Q5_0 -> Q8_0 exactly (Gemma 3's Q|K|V: Q and K Q5_0, V Q8_0): codes q - 16 widened to int8 with the same
  scale are the same weights (8.5 bits a weight instead of 5.5).
- Q4_1, Q4_K, Q6_K -> Q8_0 (a Llama or Qwen Q4_K_M file's Q|K|V: Q and K Q4_K, V Q6_K): the weights as ggml
  dequantizes them quantized again to 8 bits over each 32, at most half a step of the 32's largest / 127 off
  plus the fp16 rounding of the scale (0.56 of largest / 127).

Q5_0, Q4_K and Q6_K were converted this way everywhere until their own kernels."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NATIVE = ("Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K")               # the types kernels.GGUFMatrix multiplies
EXACT_TO_Q8_0 = frozenset({"Q8_0", "Q5_0"})                     # rewritten into Q8_0 without rounding


def kernel_type(file_type: str) -> str:
    """The block type a file tensor of `file_type` is multiplied as on its own (itself: the kernels multiply
    every NATIVE type as stored)."""
    return file_type


def fused_kernel_type(file_types: Iterable[str]) -> str | None:
    """The one block type tensors of these file types are multiplied as when fused into one projection: their
    own where they agree, Q8_0 where they are different NATIVE types, None where one is not NATIVE."""
    kinds = set(file_types)
    if not kinds <= set(NATIVE):
        return None
    return kinds.pop() if len(kinds) == 1 else "Q8_0"


def kernel_bytes(file_type: str, n_bytes: int, n_elements: int, to: str | None = None) -> int:
    """Bytes the kernels read for a tensor stored as `file_type` in `n_bytes`, multiplied as `to` (default
    its own type): the file's, or Q8_0's 34 bytes a 32 weights where it is rewritten into Q8_0."""
    if to is None or to == file_type:
        return n_bytes
    return n_elements // 32 * 34


def convert(raw: np.ndarray, file_type: str, k: int, to: str | None = None) -> tuple[np.ndarray, str]:
    """A tensor's file bytes uint8 [N, row bytes] (rows of K weights) -> (its blocks as `to` (default its own
    type), that type): the file's bytes, or Q8_0 blocks of the same weights (see the module's note)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    to = to or file_type
    if to == file_type and file_type in NATIVE:
        return raw, file_type
    if to != "Q8_0" or file_type not in NATIVE:
        raise ValueError(f"GGUF type {file_type} cannot be converted to {to}")
    if file_type == "Q5_0":
        blocks = raw.reshape(n * (k // 32), 22)
        qh = blocks[:, 2:6].copy().view("<u4")[:, 0]                        # bit j: code j's fifth bit
        qs = blocks[:, 6:22]
        low = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16)  # codes 0..15 and 16..31, low bits
        high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
        codes = (low | high) - 16
        out = np.concatenate([blocks[:, :2], codes.astype(np.int8).view(np.uint8)], axis=1)
        return out.reshape(n, -1), "Q8_0"
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    weights = dequantize(raw, GGMLQuantizationType[file_type]).reshape(n, k)
    return np.ascontiguousarray(quantize(weights, GGMLQuantizationType.Q8_0)).reshape(n, -1), "Q8_0"
