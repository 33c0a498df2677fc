"""In-memory exact search over normalized embeddings, one contiguous matrix per namespace.

Rows carry the entry id, its partition (model + context + answer-changing sampling fields: only
rows of the query's partition are candidates) and its question text (the hit decision reads it).
Removal moves the last row into the hole, so the matrix stays dense. Search is exact: the top-k
kernel (`kernels.cosine_topk`) screens rows by their int8 codes (kept next to the float32 rows, 1.25x
the memory) with an error bound that makes dropping a row safe, then re-scores the survivors in float32,
so it reads a quarter of the bytes of a float32 pass and returns the same rows and scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

import kernels


@dataclass(frozen=True, slots=True)
class Candidate:
    entry_id: str
    question: str
    score: float


class NamespaceIndex:
    def __init__(self, dim: int, initial_capacity: int = 1024) -> None:
        self.dim = dim
        self._vectors = np.zeros((initial_capacity, dim), np.float32)
        self._codes = np.zeros(initial_capacity, np.int32)        # partition code per row
        self._q8 = np.zeros((initial_capacity, dim), np.int8)      # int8 codes of the rows, for screening
        self._scale = np.zeros(initial_capacity, np.float32)
        self._err = np.zeros(initial_capacity, np.float32)
        self._ids: list[str] = []
        self._questions: list[str] = []
        self._row: dict[str, int] = {}
        self._code_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._row

    def ids(self) -> list[str]:
        return list(self._ids)

    def add(self, entry_id: str, partition: str, question: str, vector: np.ndarray) -> None:
        """Insert or replace. `vector` must be unit length (the embedder's output)."""
        self.add_many([entry_id], [partition], [question], vector[None, :] if vector.ndim == 1 else vector)

    def add_many(self, entry_ids: Sequence[str], partitions: Sequence[str], questions: Sequence[str],
                 vectors: np.ndarray) -> None:
        """Insert or replace several rows at once (a rebuild adds thousands: one quantization for all)."""
        if vectors.shape != (len(entry_ids), self.dim) or not len(entry_ids) == len(partitions) == len(questions):
            raise ValueError(f"expected {len(entry_ids)} vectors of {self.dim} floats and as many ids, partitions "
                             f"and questions, got vectors of shape {vectors.shape}")
        rows = []
        for entry_id, partition, question in zip(entry_ids, partitions, questions):
            row = self._row.get(entry_id)
            if row is None:
                row = len(self._ids)
                if row == len(self._vectors):
                    self._grow()
                self._ids.append(entry_id)
                self._questions.append(question)
                self._row[entry_id] = row
            else:
                self._questions[row] = question
            self._codes[row] = self._code_of.setdefault(partition, len(self._code_of))
            rows.append(row)
        q8, scale, err = kernels.quantize_rows_int8(torch.from_numpy(np.require(vectors, np.float32, ["C", "W"])))
        self._vectors[rows] = vectors
        self._q8[rows], self._scale[rows], self._err[rows] = q8.numpy(), scale.numpy(), err.numpy()

    def _grow(self) -> None:
        grow = max(1024, len(self._vectors))
        self._vectors = np.concatenate([self._vectors, np.zeros((grow, self.dim), np.float32)])
        self._codes = np.concatenate([self._codes, np.zeros(grow, np.int32)])
        self._q8 = np.concatenate([self._q8, np.zeros((grow, self.dim), np.int8)])
        self._scale = np.concatenate([self._scale, np.zeros(grow, np.float32)])
        self._err = np.concatenate([self._err, np.zeros(grow, np.float32)])

    def remove(self, entry_id: str) -> bool:
        row = self._row.pop(entry_id, None)
        if row is None:
            return False
        last = len(self._ids) - 1
        if row != last:
            for a in (self._vectors, self._codes, self._q8, self._scale, self._err):
                a[row] = a[last]
            self._ids[row] = self._ids[last]
            self._questions[row] = self._questions[last]
            self._row[self._ids[row]] = row
        self._ids.pop()
        self._questions.pop()
        return True

    def search(self, query: np.ndarray, partition: str, k: int) -> list[Candidate]:
        """The k rows of `partition` most similar to `query` (unit length), best first. Releases the GIL
        while it scans, so callers may run it on a worker thread."""
        code = self._code_of.get(partition)
        n = len(self._ids)
        if code is None or n == 0 or k < 1:
            return []
        t = torch.from_numpy
        rows, scores = kernels.cosine_topk(
            t(self._vectors[:n]), t(self._q8[:n]), t(self._scale[:n]), t(self._err[:n]), t(self._codes[:n]),
            t(np.ascontiguousarray(query, np.float32)[None, :]), torch.tensor([code], dtype=torch.int32), min(k, n))
        return [Candidate(self._ids[r], self._questions[r], s)
                for r, s in zip(rows[0].tolist(), scores[0].tolist()) if r >= 0]
