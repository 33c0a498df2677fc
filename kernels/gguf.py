"""Matrix-vector products straight from a GGUF file's quantized blocks (Q4_1, Q8_0, Q5_0, Q4_K and Q6_K,
llama.cpp's layouts, regrouped at load with the same bytes): the C++ kernel for the few rows of a decode step
and the many of a prefill chunk (activations quantized to int8 per 32-value block as llama.cpp's Q8_1, +0.5%
perplexity on SmolLM2; exact integer block sums), the torch reference elsewhere or when
STRATA_KERNELS=reference. Weights keep the file's bytes: SmolLM2's projections are Q4_1 (5 bits a weight),
its embedding / tied LM head Q8_0, so a decode step reads ~85 MB instead of 540 MB in float32, and the
weights are exactly the file's."""

from __future__ import annotations

import torch

from kernels import reference
from kernels._loader import available, cpu_module

BLOCK = 32
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34, "Q5_0": 22, "Q4_K": 18, "Q6_K": 26.25}   # per 32 weights (K: a 256's / 8)
SUPER_BYTES = {"Q4_K": 144, "Q6_K": 210}  # a K-quant super-block's bytes
_TYPE_CODE = {"Q4_1": 0, "Q8_0": 1, "Q5_0": 2, "Q4_K": 3, "Q6_K": 4}       # csrc/cpu/gguf_gemv.h BlockType
SUPER = 256                               # a K-quant super-block's weights


GROUP = 8                                 # blocks per group: one 32-bit SIMD lane each


def _transpose_groups(codes: torch.Tensor) -> torch.Tensor:
    """Blocks' codes [N, nb, bytes] as the file orders them → [N, nb * bytes] with each group of 8 blocks
    (the last may be shorter) stored word-major: word 0 of each of its blocks, then word 1, ..."""
    n, nb, words = codes.shape[0], codes.shape[1], codes.shape[2] // 4
    full = nb // GROUP * GROUP
    parts = [codes[:, :full].reshape(n, full // GROUP, GROUP, words, 4).transpose(2, 3)]
    if full < nb:
        parts.append(codes[:, full:].reshape(n, nb - full, words, 4).transpose(1, 2))
    return torch.cat([p.reshape(n, -1) for p in parts], dim=1).contiguous()


def _untranspose_groups(qs: torch.Tensor, nb: int) -> torch.Tensor:
    """The inverse of _transpose_groups: [N, nb * bytes] → [N, nb, bytes]."""
    n, words = qs.shape[0], qs.shape[1] // nb // 4
    full = nb // GROUP * GROUP
    split = full * words * 4
    parts = [qs[:, :split].reshape(n, full // GROUP, words, GROUP, 4).transpose(2, 3).reshape(n, full, words * 4)]
    if full < nb:
        parts.append(qs[:, split:].reshape(n, words, nb - full, 4).transpose(1, 2).reshape(n, nb - full, words * 4))
    return torch.cat(parts, dim=1)


def _q4k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes of 6-bit fields [..., 12] → its 8 scales and 8 mins [..., 8] each (ggml's get_scale_min_k4)."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4k_pack_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """The inverse of _q4k_scales: 8 scales and 8 mins (6-bit) → the 12 packed bytes."""
    d = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    m = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    md = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    return torch.cat([d, m, md], dim=-1)


def _vector_bytes(in_group: int) -> int:
    """Bytes of a group's Q4 codes one kernel vector holds (csrc/cpu/gguf_gemv.h): 32 for groups of 8, 4 or 2
    blocks, else one 4-byte word of each of its blocks."""
    return 32 if in_group in (2, 4, 8) else in_group * 4


def _pack_fifth_bits(bits: torch.Tensor, nb: int) -> torch.Tensor:
    """Q5_0's fifth bits, one per regrouped code byte and nibble (uint8 0/1 [N, nb * 16, 2]: low, high
    nibble) → qh [N, nbp * 4] bytes: per group 32 bytes, per vector of its codes two 32-bit masks (low
    nibbles', high nibbles'), bit p for the vector's byte p."""
    n, full = bits.shape[0], nb // GROUP * GROUP
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    groups = -(-nb // GROUP)
    out = torch.zeros(n, groups, 4, 2, dtype=torch.int64)
    if full:                                           # whole groups: 4 vectors of 32 bytes
        whole = bits[:, :full * 16].reshape(n, full // GROUP, 4, 32, 2).long()
        out[:, :full // GROUP] = (whole * weights[:, None]).sum(dim=3)
    if full < nb:
        in_group = nb - full
        width = _vector_bytes(in_group)
        last = bits[:, full * 16:].reshape(n, -1, width, 2).long()
        out[:, -1, :last.shape[1]] = (last * weights[:width, None]).sum(dim=2)
    return out.to(torch.int32).view(torch.uint8).reshape(n, groups * 32).contiguous()


def _unpack_fifth_bits(qh: torch.Tensor, nb: int) -> torch.Tensor:
    """The inverse of _pack_fifth_bits: qh [N, nbp * 4] → uint8 0/1 [N, nb * 16, 2]."""
    n, full = qh.shape[0], nb // GROUP * GROUP
    masks = qh.view(torch.int32).reshape(n, -1, 4, 2)
    shifts = torch.arange(32, dtype=torch.int32)
    parts = []
    if full:
        parts.append(((masks[:, :full // GROUP, :, None, :] >> shifts[:, None]) & 1).reshape(n, full * 16, 2))
    if full < nb:
        in_group = nb - full
        width = _vector_bytes(in_group)
        vectors = in_group * 16 // width
        parts.append(((masks[:, -1, :vectors, None, :] >> shifts[:width, None]) & 1).reshape(n, in_group * 16, 2))
    return torch.cat(parts, dim=1).to(torch.uint8)


class GGUFMatrix:
    """Weights [N, K] from GGUF blocks: `blocks` uint8 [N, K / 32 * block bytes] (row n = output channel
    n's blocks in order along K, as the file stores them), block_type "Q4_1", "Q8_0", "Q5_0" or "Q4_K".
    Regrouped once for the kernel (csrc/cpu/gguf_gemv.h): the codes `qs` [N, K/32 * 16 or 32] as 32-bit
    words transposed per group of 8 blocks (one block per SIMD lane), the fp16 scales `d` (and Q4_1 offsets
    `m`) [N, nbp] with nbp = K/32 rounded up to 8, zero-padded, and Q5_0's fifth bits `qh` [N, nbp * 4] as
    bit masks per kernel vector; Q4_K: its codes as Q4_1's, `d` and `m` its super-blocks' d and dmin
    [N, K/256], `sc` [N, K/32 * 2] its blocks' 6-bit scales and mins unpacked. Call with float32 x [M, K]."""

    __slots__ = ("qs", "d", "m", "qh", "sc", "block_type", "n", "k", "_file_order")

    def __init__(self, blocks: torch.Tensor, block_type: str, k: int) -> None:
        if block_type not in BLOCK_BYTES:
            raise ValueError(f"block_type must be one of {sorted(BLOCK_BYTES)}, got {block_type!r}")
        if k % BLOCK or k == 0:
            raise ValueError(f"K must be a positive multiple of {BLOCK}, got {k}")
        if block_type in SUPER_BYTES and k % SUPER:
            raise ValueError(f"{block_type} rows are whole super-blocks: K must be a multiple of {SUPER}, got {k}")
        row_bytes = int(k // BLOCK * BLOCK_BYTES[block_type])
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes:
            raise ValueError(f"blocks must be uint8 [N, {row_bytes}] for K = {k}, got {blocks.dtype} {tuple(blocks.shape)}")
        n, nb = blocks.shape[0], k // BLOCK
        self.block_type, self.n, self.k = block_type, n, k
        self._file_order: torch.Tensor | None = None      # dequantize_rows' gather index, made on first use
        self.qh = self.sc = None
        if block_type == "Q6_K":
            self._init_q6k(blocks.reshape(n, k // SUPER, 210))
            return
        if block_type == "Q4_K":
            raw = blocks.reshape(n, k // SUPER, 144)
            self.d = raw[..., 0:2].contiguous().view(torch.int16).squeeze(-1).contiguous()
            self.m = raw[..., 2:4].contiguous().view(torch.int16).squeeze(-1).contiguous()
            sc, mn = _q4k_scales(raw[..., 4:16])
            self.sc = torch.cat([sc, mn], dim=-1).reshape(n, nb * 2).contiguous()
            # 4 chunks of 64 weights: 32 bytes, low nibbles the chunk's first 32 weights, high ones the next
            chunks = raw[..., 16:].reshape(n, k // SUPER, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(2, 1)
            codes = (chunks & 15).reshape(n, nb, 32)
            self.qs = _transpose_groups(codes[..., :16] | (codes[..., 16:] << 4))      # Q4_1's nibble order
            return
        nbp = -(-nb // 8) * 8
        raw = blocks.reshape(n, nb, BLOCK_BYTES[block_type])

        def halves(lo: int) -> torch.Tensor:              # fp16 fields at byte lo of each block → [N, nbp] int16 bits
            out = torch.zeros(n, nbp, dtype=torch.int16)
            out[:, :nb] = raw[..., lo:lo + 2].contiguous().view(torch.int16).squeeze(-1)
            return out

        self.d = halves(0)
        self.m = halves(2) if block_type == "Q4_1" else None
        self.qs = _transpose_groups(raw[..., {"Q4_1": 4, "Q8_0": 2, "Q5_0": 6}[block_type]:])
        if block_type == "Q5_0":                          # bit i of a block's qh: code i's fifth bit
            qh = raw[..., 2:6].flatten().clone().view(torch.int32).view(n, nb, 1)
            bits = ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)          # [N, nb, 32]
            # each code byte's two bits (value i low, i + 16 high), moved as the bytes are
            by_byte = torch.stack([_transpose_groups(bits[..., :16].contiguous()),
                                   _transpose_groups(bits[..., 16:].contiguous())], dim=-1)
            self.qh = _pack_fifth_bits(by_byte, nb)

    def _init_q6k(self, raw: torch.Tensor) -> None:
        """Q6_K super-blocks [N, K/256, 210] (ql 128, qh 64, int8 scales 16, fp16 d) → csrc/cpu/gguf_gemv.h's layout."""
        n, nsb, nb = raw.shape[0], raw.shape[1], self.k // BLOCK
        codes = (reference._q6k_fields(raw.reshape(n, -1), self.k)[0] + 32).to(torch.uint8)  # [N, K/16, 16] 0..63
        blocks = codes.reshape(n, nb, 32)
        low, high = blocks & 15, blocks >> 4
        self.qs = _transpose_groups(low[..., :16] | (low[..., 16:] << 4))           # Q4_1's nibble order
        # per code byte: the high 2 bits of its low nibble's value, then of its high nibble's (4 bits)
        per_byte = _transpose_groups(high[..., :16] | (high[..., 16:] << 2))        # [N, nb * 16]
        vectors = per_byte.reshape(n, nb // 8, 4, 2, 16)                             # group, vector, half, byte
        self.qh = (vectors[..., 0, :] | (vectors[..., 1, :] << 4)).reshape(n, nb * 8).contiguous()
        sc = raw[..., 192:208].reshape(n, nsb, 8, 2)                                 # blocks' (sc_a, sc_b)
        self.sc = torch.cat([sc[..., 0], sc[..., 1]], dim=-1).reshape(n, nb * 2).contiguous()
        self.d = raw[..., 208:210].contiguous().view(torch.int16).squeeze(-1).contiguous()
        self.m = None

    def _q6k_blocks(self) -> torch.Tensor:
        """The inverse of _init_q6k: the file's 210-byte super-blocks."""
        n, nb = self.n, self.k // BLOCK
        nsb = nb // 8
        packed = _untranspose_groups(self.qs, nb)                                    # [N, nb, 16]
        low = torch.cat([packed & 15, packed >> 4], dim=-1)                          # [N, nb, 32]
        v = self.qh.reshape(n, nb // 8, 4, 16)
        per_byte = torch.stack([v & 15, v >> 4], dim=3).reshape(n, nb * 16)
        pb = _untranspose_groups(per_byte, nb)                                       # [N, nb, 16]
        high = torch.cat([pb & 3, pb >> 2], dim=-1)
        codes = (low | (high << 4)).reshape(n, nsb, 2, 128)                           # halves of 128
        ql = (codes[..., :64] & 15) | ((codes[..., 64:] & 15) << 4)                  # [N, nsb, 2, 64]
        top = (codes >> 4).reshape(n, nsb, 2, 4, 32)
        qh = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
        sc = self.sc.reshape(n, nsb, 2, 8).transpose(2, 3).reshape(n, nsb, 16)
        return torch.cat([ql.reshape(n, nsb, 128), qh.reshape(n, nsb, 64), sc,
                          self.d[..., None].contiguous().view(torch.uint8)], dim=-1).reshape(n, -1)

    @property
    def type_code(self) -> int:
        return _TYPE_CODE[self.block_type]

    def blocks(self) -> torch.Tensor:
        """The file's blocks again, uint8 [N, K / 32 * block bytes]."""
        nb = self.k // BLOCK
        if self.block_type == "Q6_K":
            return self._q6k_blocks()
        if self.block_type == "Q4_K":
            nsb = self.k // SUPER
            packed = _untranspose_groups(self.qs, nb)                                   # [N, nb, 16]
            codes = torch.cat([packed & 15, packed >> 4], dim=-1).reshape(self.n, nsb, 4, 2, 32)
            qs = codes[..., 0, :] | (codes[..., 1, :] << 4)                              # [N, nsb, 4, 32]
            scm = self.sc.reshape(self.n, nsb, 16)
            return torch.cat([self.d[..., None].contiguous().view(torch.uint8),
                              self.m[..., None].contiguous().view(torch.uint8),
                              _q4k_pack_scales(scm[..., :8], scm[..., 8:]), qs.reshape(self.n, nsb, 128)],
                             dim=-1).reshape(self.n, -1)
        fields = [self.d[:, :nb, None].contiguous().view(torch.uint8)]
        if self.m is not None:
            fields.append(self.m[:, :nb, None].contiguous().view(torch.uint8))
        if self.qh is not None:
            by_byte = _unpack_fifth_bits(self.qh, nb)
            bits = torch.cat([_untranspose_groups(by_byte[..., 0].contiguous(), nb),
                              _untranspose_groups(by_byte[..., 1].contiguous(), nb)], dim=-1)   # [N, nb, 32]
            qh = (bits.to(torch.int64) << torch.arange(32)).sum(-1).to(torch.int32)  # wraps bit 31 as the file has it
            fields.append(qh[..., None].contiguous().view(torch.uint8))
        return torch.cat([*fields, _untranspose_groups(self.qs, nb)], dim=-1).reshape(self.n, -1)

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + sum(x.nbytes for x in (self.m, self.qh, self.sc) if x is not None)

    def _pointers(self) -> tuple[int, int, int, int, int]:
        """qs, d, m, qh, sc (0 for those it has not): the kernel's arrays."""
        return (self.qs.data_ptr(), self.d.data_ptr(), *(x.data_ptr() if x is not None else 0
                                                          for x in (self.m, self.qh, self.sc)))

    def dequantize(self) -> torch.Tensor:
        """The weights as float32 [N, K], exactly as ggml dequantizes them."""
        return reference.gguf_dequantize(self.blocks(), self.block_type, self.k)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (int64 [T]) of the weights as float32 [T, K], as ggml dequantizes them: an embedding
        lookup straight from a quantized table: one C++ call, or where the kernels are off a few small torch
        ops (one gather puts the codes back in the file's order)."""
        if available() and ids.device.type == "cpu":
            ids = ids.to(torch.int64).contiguous()         # checked in C++: IndexError outside [0, N)
            out = torch.empty(len(ids), self.k, dtype=torch.float32)
            qs, d, m, qh, sc = self._pointers()
            cpu_module().gguf_dequantize_rows(self.type_code, qs, d, m, self.n, self.k, ids.data_ptr(), len(ids),
                                              out.data_ptr(), qh, sc)
            return out
        if self.block_type in ("Q5_0", "Q4_K", "Q6_K"):    # rare (such an embedding): from the file's blocks
            return reference.gguf_dequantize(self.blocks()[ids], self.block_type, self.k)
        nb = self.k // BLOCK
        if self._file_order is None:                        # codes position in a regrouped row, in file order
            row_bytes = self.qs.shape[1]
            regrouped = _transpose_groups(torch.arange(row_bytes, dtype=torch.int32).view(1, nb, row_bytes // nb))
            self._file_order = torch.argsort(regrouped[0])
        codes = self.qs[ids][:, self._file_order].view(len(ids), nb, -1)
        if self.block_type == "Q4_1":
            q = torch.cat([codes & 15, codes >> 4], dim=-1).float()
        else:
            q = codes.view(torch.int8).float()
        d = self.d[ids, :nb].view(torch.float16).float()
        w = q * d[..., None]
        if self.m is not None:
            w += self.m[ids, :nb].view(torch.float16).float()[..., None]
        return w.view(len(ids), self.k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"x must be float32 [M, {self.k}], got {x.dtype} {tuple(x.shape)}")
        if x.device.type != "cpu" or not available():
            return reference.gguf_gemv(x, self.blocks(), self.block_type, self.k)
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        qs, d, m, qh, sc = self._pointers()
        cpu_module().gguf_gemv(self.type_code, qs, d, m, self.n, self.k, x.data_ptr(), x.shape[0], y.data_ptr(), qh, sc)
        return y


def gguf_gemv(x: torch.Tensor, blocks: torch.Tensor, block_type: str) -> torch.Tensor:
    """y [M, N] = x [M, K] · Wᵀ for W in GGUF blocks (see GGUFMatrix)."""
    return GGUFMatrix(blocks, block_type, x.shape[1])(x)
