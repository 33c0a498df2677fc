"""Pure-torch references for every kernel: the tests compare against these, and STRATA_KERNELS=reference
runs them instead of the compiled kernels."""

from __future__ import annotations

import torch


def cosine_topk(rows: torch.Tensor, parts: torch.Tensor, queries: torch.Tensor, query_parts: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k dot products of each query with the rows of its own partition, best first (ties: lower row).
    Missing slots: row -1, score -inf. rows [n, d], parts [n], queries [m, d], query_parts [m]."""
    m, n = queries.shape[0], rows.shape[0]
    out_rows = torch.full((m, k), -1, dtype=torch.int64)
    out_scores = torch.full((m, k), float("-inf"), dtype=torch.float32)
    if n == 0 or k == 0:
        return out_rows, out_scores
    scores = (queries.float() @ rows.float().T).masked_fill(parts[None, :] != query_parts[:, None], float("-inf"))
    for j in range(m):
        # stable sort on -score keeps lower rows first among equal scores
        order = torch.sort(-scores[j], stable=True).indices[:k]
        keep = order[torch.isfinite(scores[j, order])]
        out_rows[j, :len(keep)] = keep
        out_scores[j, :len(keep)] = scores[j, keep]
    return out_rows, out_scores


def quantize_rows_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: rows ≈ scale * codes, codes in [-127, 127]; err = ||row - scale * codes||."""
    rows = rows.float()
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(rows / scale[:, None]).clamp(-127, 127)
    err = (rows.double() - scale.double()[:, None] * codes.double()).norm(dim=1)
    return codes.to(torch.int8), scale, err.float()
