"""In-memory exact search over normalized embeddings, one contiguous matrix per namespace.

Rows carry the entry id, its partition (model + context + answer-changing sampling fields: only
rows of the query's partition are candidates) and its question text (the hit decision reads it).
Removal moves the last row into the hole, so the matrix stays dense. Brute-force cosine top-k is
exact; at 384 dimensions it stays in the millisecond range up to ~10^5 rows per namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
        if vector.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} floats, got shape {vector.shape}")
        code = self._code_of.setdefault(partition, len(self._code_of))
        row = self._row.get(entry_id)
        if row is None:
            row = len(self._ids)
            if row == len(self._vectors):
                grow = max(1024, len(self._vectors))
                self._vectors = np.concatenate([self._vectors, np.zeros((grow, self.dim), np.float32)])
                self._codes = np.concatenate([self._codes, np.zeros(grow, np.int32)])
            self._ids.append(entry_id)
            self._questions.append(question)
            self._row[entry_id] = row
        else:
            self._questions[row] = question
        self._vectors[row] = vector
        self._codes[row] = code

    def remove(self, entry_id: str) -> bool:
        row = self._row.pop(entry_id, None)
        if row is None:
            return False
        last = len(self._ids) - 1
        if row != last:
            self._vectors[row] = self._vectors[last]
            self._codes[row] = self._codes[last]
            self._ids[row] = self._ids[last]
            self._questions[row] = self._questions[last]
            self._row[self._ids[row]] = row
        self._ids.pop()
        self._questions.pop()
        return True

    def search(self, query: np.ndarray, partition: str, k: int) -> list[Candidate]:
        """The k rows of `partition` most similar to `query` (unit length), best first."""
        code = self._code_of.get(partition)
        n = len(self._ids)
        if code is None or n == 0 or k < 1:
            return []
        scores = self._vectors[:n] @ query.astype(np.float32, copy=False)
        scores[self._codes[:n] != code] = -np.inf
        k = min(k, n)
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Candidate(self._ids[r], self._questions[r], float(scores[r])) for r in top if scores[r] > -np.inf]
