"""Batched exact cosine top-k for the semantic cache's index (CPU kernel: int8-screened, float32 re-scored)."""

from __future__ import annotations

import torch

from kernels import reference
from kernels._loader import available, cpu_module

# the int8 error of a row is stored slightly rounded up so its bound always holds
_ERR_SLACK = 1.0001


def quantize_rows_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [n, d], scale float32 [n], err float32 [n]) for `cosine_topk`; see reference."""
    codes, scale, err = reference.quantize_rows_int8(rows)
    return codes, scale, err * _ERR_SLACK


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device.type != "cpu":
        raise NotImplementedError(f"cosine_topk runs on CPU only ({name} is on {t.device})")


def _outputs(m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty((m, k), dtype=torch.int64), torch.empty((m, k), dtype=torch.float32)


def _check_common(rows: torch.Tensor, parts: torch.Tensor, queries: torch.Tensor, query_parts: torch.Tensor,
                  k: int) -> tuple[int, int, int]:
    if rows.dim() != 2 or queries.dim() != 2:
        raise ValueError("rows and queries must be 2-D ([n, d] and [m, d])")
    n, d = rows.shape
    m = queries.shape[0]
    if k < 0:
        raise ValueError("k must be >= 0")
    _check("rows", rows, torch.float32, (n, d))
    _check("parts", parts, torch.int32, (n,))
    _check("queries", queries, torch.float32, (m, d))
    _check("query_parts", query_parts, torch.int32, (m,))
    return n, d, m


def cosine_topk(rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, err: torch.Tensor,
                parts: torch.Tensor, queries: torch.Tensor, query_parts: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query (unit rows of `queries`), the k rows of its own partition with the highest dot
    product, best first, exactly as float32 scores them: (rows int64 [m, k], scores float32 [m, k]); slots
    past the last row of the partition hold -1 and -inf. `codes, scale, err` come from
    `quantize_rows_int8(rows)` and let the kernel skip rows that cannot make the top-k."""
    n, d, m = _check_common(rows, parts, queries, query_parts, k)
    _check("codes", codes, torch.int8, (n, d))
    _check("scale", scale, torch.float32, (n,))
    _check("err", err, torch.float32, (n,))
    if not available() or k == 0 or n == 0 or m == 0:
        return reference.cosine_topk(rows, parts, queries, query_parts, k)
    out_rows, out_scores = _outputs(m, k)
    cpu_module().cosine_topk_int8(rows.data_ptr(), codes.data_ptr(), scale.data_ptr(), err.data_ptr(),
                                  parts.data_ptr(), n, d, queries.data_ptr(), query_parts.data_ptr(), m, k,
                                  out_rows.data_ptr(), out_scores.data_ptr())
    return out_rows, out_scores


def cosine_topk_f32(rows: torch.Tensor, parts: torch.Tensor, queries: torch.Tensor, query_parts: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `cosine_topk` from the float32 rows alone (one full float32 pass; the baseline)."""
    n, d, m = _check_common(rows, parts, queries, query_parts, k)
    if not available() or k == 0 or n == 0 or m == 0:
        return reference.cosine_topk(rows, parts, queries, query_parts, k)
    out_rows, out_scores = _outputs(m, k)
    cpu_module().cosine_topk_f32(rows.data_ptr(), parts.data_ptr(), n, d, queries.data_ptr(),
                                 query_parts.data_ptr(), m, k, out_rows.data_ptr(), out_scores.data_ptr())
    return out_rows, out_scores
