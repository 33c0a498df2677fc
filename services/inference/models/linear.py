"""Projection weights and how they multiply: dense (float32/bfloat16), int8 W8A8, or a GGUF file's own
quantized blocks (Q4_1 / Q8_0)."""

from __future__ import annotations

import functools
import logging
import time

import torch

from kernels import MAX_DECODE_ROWS, GGUFMatrix, Int8Matrix
from kernels import available as kernels_available

log = logging.getLogger(__name__)


def decode_sized(x2: torch.Tensor) -> bool:
    """Rows few enough for the compiled GEMV kernels (a decode step's batch)."""
    return x2.shape[0] <= MAX_DECODE_ROWS


@functools.cache
def int8_matmul_is_fast() -> bool:
    """Whether torch._int_mm beats a float32 matmul here, measured once on a decode-sized product.

    oneDNN multiplies int8 fast only with VNNI or AMX; on a CPU with AVX2 alone (many AMD EPYC
    machines) _int_mm falls to a reference loop about 100x slower than float32."""
    m, k, n = 32, 576, 1536
    a8, b8 = torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    a32, b32 = a8.float(), b8.t().float().contiguous()

    def best_of(fn, repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_int8 = best_of(lambda: torch._int_mm(a8, b8.t()))
    t_fp32 = best_of(lambda: a32 @ b32)
    fast = t_int8 < t_fp32
    if not fast:
        log.warning("int8 matmul is not accelerated on this CPU (%.1f GOP/s against %.1f GFLOP/s in float32; "
                    "it needs VNNI or AMX): int8 runs emulated in float32, same results, no speed-up",
                    2 * m * k * n / t_int8 / 1e9, 2 * m * k * n / t_fp32 / 1e9)
    return fast


def row_bucket(rows: int) -> int:
    """The row count a oneDNN product of `rows` rows runs at: exact up to 16 (decode steps), multiples of 8 up
    to 64, then 4 buckets per doubling (at most 25% padding rows there): 42 shapes up to 2,048 rows, so a
    long-running engine meets a few dozen shapes per weight rather than one per step size."""
    if rows <= 16:
        return rows
    if rows <= 64:
        return -(-rows // 8) * 8
    step = 1 << (rows - 1).bit_length() - 3          # an eighth of the next power of two
    return -(-rows // step) * step


def bucketed_rows(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 @ weight for a 2-D x2, run on x2's rows zero-padded to row_bucket(rows) and cut back.

    oneDNN (bf16 and int8 products on CPU) keeps state for every shape it multiplies, about 0.6 MiB each
    here, partly outside its primitive cache's capacity: with the step's token count as M, a serving replica
    grew by 10-15 MiB a minute for as long as new step sizes appeared. Padding bounds the shapes."""
    rows = x2.shape[0]
    bucket = row_bucket(rows)
    if bucket == rows:
        return x2 @ weight
    padded = x2.new_zeros(bucket, x2.shape[1])
    padded[:rows] = x2
    return (padded @ weight)[:rows]


class DenseLinear:
    """y = x @ w with w stored [in, out] contiguous (2-4x faster than F.linear's [out, in] layout at
    decode batch sizes with MKL on this class of CPU). bfloat16 products on CPU run at bucketed row counts
    (bucketed_rows: oneDNN's per-shape state stays bounded); float32 ones (MKL) keep none."""

    __slots__ = ("weight",)

    def __init__(self, weight_t: torch.Tensor) -> None:
        self.weight = weight_t.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32 or x.device.type != "cpu":
            return x @ self.weight
        shape = x.shape
        y = bucketed_rows(x.reshape(-1, shape[-1]), self.weight)
        return y.reshape(*shape[:-1], y.shape[-1])

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]


def quantize_per_channel(weight_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights stored [in, out] -> (int8 codes [out, in] in [-127, 127], float32 scale per output channel [out])."""
    w = weight_t.float()
    scale = w.abs().amax(dim=0).clamp_min(1e-8) / 127.0
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8).t().contiguous(), scale


class QuantizedLinear:
    """A quantized projection's call, float32 inside: a decode-sized batch (up to kernels.MAX_DECODE_ROWS rows)
    runs the compiled GEMV `_gemv` where the kernels are built and on (decided when the layer is made:
    `gemv`), larger ones `_matmul`; the output comes back in the input's dtype."""

    __slots__ = ("kernel", "gemv")

    def __init__(self, kernel: Int8Matrix | GGUFMatrix) -> None:
        self.kernel, self.gemv = kernel, kernels_available()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        y = self._gemv(x2) if self.gemv and decode_sized(x2) else self._matmul(x2)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """W8A8: int8 weights with one scale per output channel, activations quantized per token at
    run time, int8 x int8 -> int32 products (VNNI/AMX through oneDNN), rescaled to float32.

    y[m, n] ~= sum_k x[m, k] w[k, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] q_w[k, n].

    A decode step runs the C++ int8 GEMV (kernels.Int8Matrix.linear, as kernels.int8_linear: AVX2, exact
    integer sums, fast on every x86-64; it quantizes the rows the same way). Larger batches go through
    oneDNN; where int8 products are not accelerated there (`int8_matmul_is_fast()` is False) the same integer
    values are multiplied as float32 (exact up to float32 rounding of sums above 2^24): the model's numbers
    do not depend on the CPU, only its speed does."""

    __slots__ = ("qweight", "scale", "emulated_weight")

    def __init__(self, weight_t: torch.Tensor, emulate: bool | None = None) -> None:
        # stored [out, in]; passed to _int_mm as a transposed view, its fastest layout here
        self.qweight, self.scale = quantize_per_channel(weight_t)
        if emulate is None:
            emulate = not int8_matmul_is_fast()
        self.emulated_weight = self.qweight.t().float().contiguous() if emulate else None   # [in, out]
        super().__init__(Int8Matrix(self.qweight, self.scale))

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x2)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-8).div_(127.0)   # [M, 1]
        if self.emulated_weight is not None:
            return torch.round(x2 / x_scale).matmul(self.emulated_weight).mul_(x_scale).mul_(self.scale)
        xq = torch.round(x2 / x_scale).to(torch.int8)
        return torch._int_mm(xq, self.qweight.t()).float().mul_(x_scale).mul_(self.scale)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]


class Int8WeightLinear(QuantizedLinear):
    """Weight-only int8 (one scale per output channel), float32 activations: for the LM head, whose
    logits lose more to quantized activations than the other projections do, while its 49152 x 576
    weights are the largest single read of a decode step (113 MB in float32, 28 MB here). A decode step
    runs the C++ kernel (kernels.Int8Matrix.weight_only); more rows (prefill, perplexity) multiply a
    dequantized copy made for the call."""

    __slots__ = ("qweight", "scale")

    def __init__(self, weight_t: torch.Tensor) -> None:
        self.qweight, self.scale = quantize_per_channel(weight_t)
        super().__init__(Int8Matrix(self.qweight, self.scale))

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernel.weight_only(x2)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 @ (self.qweight.float() * self.scale[:, None]).t()

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]


class GGUFLinear(QuantizedLinear):
    """The GGUF file's own blocks (kernels.GGUFMatrix, activations quantized per 32-value block as llama.cpp
    does) for every row count: decode steps, large batches and prefill chunks alike. No float32 copy is
    kept (it was 540 MB for SmolLM2's 98 MB file). At 32 and 128 rows the block products run 1.0-4x and
    0.7-1.4x the float32 matmul's speed on AVX2 (bench.kernels), and the LM head's 4x at 32 rows is most of
    a 32-stream step. Without the compiled kernels a call dequantizes the blocks it multiplies."""

    __slots__ = ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        y = self._gemv(x2) if self.gemv else self._matmul(x2)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernel(x2)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 @ self.kernel.dequantize().t()

    @property
    def in_features(self) -> int:
        return self.kernel.k

    @property
    def weight(self) -> torch.Tensor:
        """The weights dequantized, [in, out] as DenseLinear stores them (made on each call)."""
        return self.kernel.dequantize().t()


class GGUFEmbedding:
    """A token embedding table read from the file's blocks (kernels.GGUFMatrix): each step dequantizes only
    the rows of its tokens, so the table is not held in float32 (113 MB for SmolLM2's Q8_0 table). With
    tied embeddings it is the LM head's own matrix."""

    __slots__ = ("matrix",)

    def __init__(self, matrix: GGUFMatrix) -> None:
        self.matrix = matrix

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.matrix.dequantize_rows(ids)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


Linear = DenseLinear | Int8Linear | Int8WeightLinear | GGUFLinear
