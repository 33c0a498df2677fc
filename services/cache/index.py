"""In-memory similarity search over normalized embeddings, one contiguous matrix per namespace.

Rows carry the entry id, its partition (model + context + answer-changing sampling fields: only
rows of the query's partition are candidates) and its question text (the hit decision reads it).
Removal moves the last row into the hole, so the matrix stays dense.

Two searches, by the size of the query's partition:
- Below `ann_min_rows` (50,000 by default), exact: the top-k kernel (`kernels.cosine_topk`) screens rows
  by their int8 codes (kept next to the float32 rows) with an error bound that makes dropping a row safe,
  then re-scores the survivors in float32. It reads a quarter of the bytes of a float32 pass and returns
  the same rows and scores, and below this size it is faster than walking a graph.
- From that size on, approximate then exact: an HNSW graph (usearch, int8 vectors, cosine) per partition
  proposes `ann_candidates` rows and they are re-scored in float32 against the stored rows, so the scores
  are exact and only a row the graph never proposed can be missed (recall@1 against exact search is
  measured in `bench/cache_scale.py`). A partition that reaches the size starts a graph, filled a slice
  at a time (`grow_graphs`, multi-threaded inserts) while the partition is still searched exactly, and
  serving once complete; it is dropped when the partition falls below half of the size.

Not thread-safe: the service runs every call on one thread of its own (`SemanticCacheService`), so the
event loop never waits on a scan or a graph build. A graph slice is bounded in time as well as rows, so a
search waits at most about one bound behind it.

Ids and questions are kept in numpy object arrays, not lists: the garbage collector does not walk a numpy
array, and two lists of a million strings made each full collection 30 ms longer (55 ms at 1M rows, in
every lookup that triggered one).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

import kernels

ANN_MIN_ROWS = 50_000        # rows of one partition from which its graph searches (measured in bench/cache.py)
ANN_CANDIDATES = 100         # rows the graph proposes per query, re-scored exactly
ANN_CONNECTIVITY = 16        # HNSW's M
ANN_EXPANSION_ADD = 40       # efConstruction: a 1M graph builds in about 80 s on 2 cores (measured alone, 2026-12-04)
ANN_EXPANSION_SEARCH = 256   # ef: recall@1 0.995 on real question embeddings, 0.5 ms at 1M (bench/cache_scale.py)
GROW_CHUNK_ROWS = 128        # graph inserts per usearch call within a time-bounded slice (about 10 ms at 1M rows)


@dataclass(slots=True)
class _Build:
    graph: object              # usearch.Index
    keys: np.ndarray           # the partition's keys when the build started
    done: int = 0              # how many of them were inserted


@dataclass(frozen=True, slots=True)
class Candidate:
    entry_id: str
    question: str
    score: float


class NamespaceIndex:
    def __init__(self, dim: int, initial_capacity: int = 1024, ann_min_rows: int = ANN_MIN_ROWS,
                 ann_candidates: int = ANN_CANDIDATES, threads: int | None = None) -> None:
        self.dim = dim
        self.ann_min_rows = ann_min_rows
        self.ann_candidates = ann_candidates
        self.threads = threads or len(os.sched_getaffinity(0))     # for bulk graph inserts
        self._vectors = np.zeros((initial_capacity, dim), np.float32)
        self._codes = np.zeros(initial_capacity, np.int32)        # partition code per row
        self._q8 = np.zeros((initial_capacity, dim), np.int8)      # int8 codes of the rows, for screening
        self._scale = np.zeros(initial_capacity, np.float32)
        self._err = np.zeros(initial_capacity, np.float32)
        self._keys = np.zeros(initial_capacity, np.uint64)         # a row's key in its partition's graph
        self._n = 0                                                # rows in use
        self._ids = np.empty(initial_capacity, object)             # entry id per row
        self._questions = np.empty(initial_capacity, object)       # question text per row
        self._row: dict[str, int] = {}
        self._row_of_key: dict[int, int] = {}
        self._next_key = 0
        self._code_of: dict[str, int] = {}
        self._part_size: dict[int, int] = {}
        self._graphs: dict[int, object] = {}                       # partition code -> usearch.Index
        self._building: dict[int, _Build] = {}                     # graphs being filled, a slice at a time

    def __len__(self) -> int:
        return self._n

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._row

    def ids(self) -> list[str]:
        return self._ids[:self._n].tolist()

    @property
    def graphs(self) -> int:
        """Partitions searched through a graph."""
        return len(self._graphs)

    @property
    def building(self) -> bool:
        """Whether a graph is being filled (`grow_graphs` has work)."""
        return bool(self._building)

    def add(self, entry_id: str, partition: str, question: str, vector: np.ndarray) -> None:
        """Insert or replace. `vector` must be unit length (the embedder's output)."""
        self.add_many([entry_id], [partition], [question], vector[None, :] if vector.ndim == 1 else vector)

    def add_many(self, entry_ids: Sequence[str], partitions: Sequence[str], questions: Sequence[str],
                 vectors: np.ndarray, start_graphs: bool = True) -> None:
        """Insert or replace several rows at once (a rebuild adds thousands: one quantization and one graph
        insert for all). A partition that reaches the size starts a graph, filled by `grow_graphs`; with
        `start_graphs=False` it waits for `start_graphs()` (a rebuild loads every row first)."""
        if vectors.shape != (len(entry_ids), self.dim) or not len(entry_ids) == len(partitions) == len(questions):
            raise ValueError(f"expected {len(entry_ids)} vectors of {self.dim} floats and as many ids, partitions "
                             f"and questions, got vectors of shape {vectors.shape}")
        vectors = np.require(vectors, np.float32, ["C"])
        rows, latest = [], {}
        for n, (entry_id, partition, question) in enumerate(zip(entry_ids, partitions, questions)):
            row = self._row.get(entry_id)
            code = self._code_of.setdefault(partition, len(self._code_of))
            if row is None:
                row = self._n
                if row == len(self._vectors):
                    self._grow()
                self._ids[row] = entry_id
                self._questions[row] = question
                self._n += 1
                self._row[entry_id] = row
            else:                                   # replaced: its old graph node goes, a new key comes
                self._questions[row] = question
                self._unlink(row)
            self._codes[row] = code
            self._part_size[code] = self._part_size.get(code, 0) + 1
            self._keys[row] = self._next_key
            self._row_of_key[self._next_key] = row
            self._next_key += 1
            rows.append(row)
            latest[row] = n                          # the same id twice in one call: the last one stands
        rows_u = list(latest)
        src = list(latest.values())
        q8, scale, err = kernels.quantize_rows_int8(torch.from_numpy(np.ascontiguousarray(vectors[src])))
        self._vectors[rows_u] = vectors[src]
        self._q8[rows_u], self._scale[rows_u], self._err[rows_u] = q8.numpy(), scale.numpy(), err.numpy()
        by_code: dict[int, list[int]] = {}
        for row in rows_u:
            by_code.setdefault(int(self._codes[row]), []).append(row)
        for code, code_rows in by_code.items():
            graph = self._graph_of(code)
            if graph is not None:
                graph.add(self._keys[code_rows], _graph_vectors(self._vectors[code_rows]), threads=self.threads)
            elif start_graphs and self._part_size[code] >= self.ann_min_rows:
                self._start_graph(code)

    def start_graphs(self) -> None:
        """Start the graph of every partition at or past the size that has none."""
        for code, size in self._part_size.items():
            if size >= self.ann_min_rows and code not in self._graphs and code not in self._building:
                self._start_graph(code)

    def grow_graphs(self, max_rows: int = 2_000, max_s: float | None = None) -> bool:
        """Insert up to `max_rows` of a graph being built, and with `max_s` stop once that much time has
        passed (checked every GROW_CHUNK_ROWS rows); a graph that is complete starts serving searches.
        Returns whether work remains. Until its graph is complete a partition is searched exactly, so a
        caller can interleave these slices with searches (the service does, on its index thread)."""
        if not self._building:
            return False
        code, b = next(iter(self._building.items()))
        end = min(len(b.keys), b.done + max_rows)
        chunk = GROW_CHUNK_ROWS if max_s is not None else max_rows
        deadline = time.perf_counter() + (max_s or 0.0)
        while b.done < end:
            keys = b.keys[b.done:min(end, b.done + chunk)]
            b.done += len(keys)
            rows = [self._row_of_key[k] for k in keys.tolist() if k in self._row_of_key]   # not removed meanwhile
            if rows:
                b.graph.add(self._keys[rows], _graph_vectors(self._vectors[rows]), threads=self.threads)
            if max_s is not None and time.perf_counter() >= deadline:
                break
        if b.done >= len(b.keys):
            del self._building[code]
            self._graphs[code] = b.graph
        return bool(self._building)

    def build_graphs(self) -> None:
        """Every graph due, to the end, at once (for callers with no searches to interleave)."""
        self.start_graphs()
        while self.grow_graphs(1_000_000):
            pass

    def _unlink(self, row: int) -> None:
        """Forget a row's key, its graph node and its count in its partition."""
        code, key = int(self._codes[row]), int(self._keys[row])
        self._row_of_key.pop(key, None)
        self._part_size[code] -= 1
        graph = self._graph_of(code)
        if graph is not None:
            graph.remove(key)                        # (a key not inserted yet is skipped when its slice comes)
            if self._part_size[code] < self.ann_min_rows // 2:
                self._graphs.pop(code, None)
                self._building.pop(code, None)

    def _graph_of(self, code: int):
        """The partition's graph, serving or being built (rows inserted or removed go to either), or None."""
        build = self._building.get(code)
        return self._graphs.get(code) or (build.graph if build is not None else None)

    def _start_graph(self, code: int) -> None:
        """An empty graph for the partition and the keys of its rows now; `grow_graphs` fills it."""
        from usearch.index import Index

        n = self._n
        graph = Index(ndim=self.dim, metric="cos", dtype="i8", connectivity=ANN_CONNECTIVITY,
                      expansion_add=ANN_EXPANSION_ADD, expansion_search=ANN_EXPANSION_SEARCH)
        self._building[code] = _Build(graph, self._keys[:n][self._codes[:n] == code].copy())

    def _grow(self) -> None:
        grow = max(1024, len(self._vectors))
        self._vectors = np.concatenate([self._vectors, np.zeros((grow, self.dim), np.float32)])
        self._codes = np.concatenate([self._codes, np.zeros(grow, np.int32)])
        self._q8 = np.concatenate([self._q8, np.zeros((grow, self.dim), np.int8)])
        self._scale = np.concatenate([self._scale, np.zeros(grow, np.float32)])
        self._err = np.concatenate([self._err, np.zeros(grow, np.float32)])
        self._keys = np.concatenate([self._keys, np.zeros(grow, np.uint64)])
        self._ids = np.concatenate([self._ids, np.empty(grow, object)])
        self._questions = np.concatenate([self._questions, np.empty(grow, object)])

    def remove(self, entry_id: str) -> bool:
        row = self._row.pop(entry_id, None)
        if row is None:
            return False
        self._unlink(row)
        last = self._n - 1
        if row != last:
            for a in (self._vectors, self._codes, self._q8, self._scale, self._err, self._keys, self._ids,
                      self._questions):
                a[row] = a[last]
            self._row[self._ids[row]] = row
            self._row_of_key[int(self._keys[row])] = row
        self._ids[last] = self._questions[last] = None
        self._n = last
        return True

    def search(self, query: np.ndarray, partition: str, k: int) -> list[Candidate]:
        """The k rows of `partition` most similar to `query` (unit length), best first, with exact scores."""
        code = self._code_of.get(partition)
        n = self._n
        if code is None or n == 0 or k < 1:
            return []
        query = np.ascontiguousarray(query, np.float32)
        graph = self._graphs.get(code)
        if graph is not None:
            found = graph.search(_graph_vectors(query[None, :])[0], max(self.ann_candidates, k))
            rows = np.array([self._row_of_key[key] for key in found.keys.tolist() if key in self._row_of_key], np.int64)
            scores = self._vectors[rows] @ query
            top = np.argsort(-scores, kind="stable")[:k]
            return [Candidate(self._ids[r], self._questions[r], float(s)) for r, s in zip(rows[top], scores[top])]
        t = torch.from_numpy
        rows, scores = kernels.cosine_topk(
            t(self._vectors[:n]), t(self._q8[:n]), t(self._scale[:n]), t(self._err[:n]), t(self._codes[:n]),
            t(query[None, :]), torch.tensor([code], dtype=torch.int32), min(k, n))
        return [Candidate(self._ids[r], self._questions[r], s)
                for r, s in zip(rows[0].tolist(), scores[0].tolist()) if r >= 0]

    def memory_bytes(self) -> int:
        """What this index holds in memory, by its own count: arrays at capacity, graphs, and an estimate for
        the ids, questions and maps (CPython object sizes)."""
        arrays = sum(a.nbytes for a in (self._vectors, self._codes, self._q8, self._scale, self._err, self._keys,
                                        self._ids, self._questions))
        graphs = sum(int(g.memory_usage) for g in [*self._graphs.values(), *(b.graph for b in self._building.values())])
        strings = sum(len(s) + 49 for s in self._ids[:self._n]) + sum(len(q) + 49 for q in self._questions[:self._n])
        maps = 104 * (len(self._row) + len(self._row_of_key))
        return arrays + graphs + strings + maps


def _graph_vectors(rows: np.ndarray) -> np.ndarray:
    """What the graph stores: each row scaled so its largest component is 1. usearch casts a float to int8 as
    x * 127, so a unit vector's components (mostly under 0.2 in 384 dimensions) would keep 4 or 5 levels;
    scaled, each row uses the whole int8 range, and the graph's cosine is unchanged by the scale."""
    return rows / np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12)
