"""Labelled question pairs, retrieval over them, and precision/recall of a hit decision.

The protocol of `strata cache eval` (and of the decision's training): every `text_a` is a cached
question in one namespace, so all entries compete; every `text_b` is looked up. A hit is correct
when it returned the pair's own `text_a` and the pair is labelled a duplicate. precision = correct
hits / hits; recall = correct hits / duplicate pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from services.cache.decision import HitDecider
from services.cache.keys import normalize_text


@dataclass(frozen=True, slots=True)
class Pairs:
    text_a: list[str]
    text_b: list[str]
    label: np.ndarray          # [n] bool

    def __len__(self) -> int:
        return len(self.text_a)

    @classmethod
    def load(cls, path: Path | str, limit: int | None = None) -> "Pairs":
        """JSONL of {"text_a", "text_b", "label"}, or GPTCache's benchmark file (a JSON list of
        {"origin", "similar"}: each origin cached, each similar looked up, every pair the same question)."""
        with open(path, encoding="utf-8") as f:
            head = f.read(1)
        if head == "[":
            return cls._load_gptcache(path, limit)
        a, b, y = [], [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    a.append(str(d["text_a"]))
                    b.append(str(d["text_b"]))
                    y.append(bool(int(d["label"])))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: expected {{\"text_a\", \"text_b\", \"label\"}}: {exc}") from exc
                if limit and len(a) >= limit:
                    break
        if not a:
            raise ValueError(f"{path}: no pairs")
        return cls(a, b, np.array(y, dtype=bool))

    @classmethod
    def _load_gptcache(cls, path: Path | str, limit: int | None) -> "Pairs":
        try:
            items = json.loads(Path(path).read_text(encoding="utf-8"))[:limit]
            a, b = [str(d["origin"]) for d in items], [str(d["similar"]) for d in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: expected a JSON list of {{\"origin\", \"similar\"}}: {exc}") from exc
        if not a:
            raise ValueError(f"{path}: no pairs")
        return cls(a, b, np.ones(len(a), dtype=bool))


@dataclass(frozen=True, slots=True)
class Retrieval:
    """For each lookup (text_b): the top-k cached questions by cosine."""

    entries: list[str]               # the distinct cached questions (normalized text_a)
    entry_of_pair: np.ndarray        # [n] index into entries of each pair's own text_a
    cand: np.ndarray                 # [n, k] entry indices, best cosine first
    cos: np.ndarray                  # [n, k]
    queries: list[str]               # normalized text_b


def retrieve(pairs: Pairs, embed: Callable[[Sequence[str]], np.ndarray], k: int = 5,
             chunk: int = 1024) -> Retrieval:
    norm_a = [normalize_text(t) for t in pairs.text_a]
    entries = list(dict.fromkeys(norm_a))               # one entry per distinct question, as the cache stores it
    index = {t: i for i, t in enumerate(entries)}
    entry_of_pair = np.array([index[t] for t in norm_a])
    queries = [normalize_text(t) for t in pairs.text_b]
    e = embed(entries).astype(np.float32)
    q = embed(queries).astype(np.float32)
    k = min(k, len(entries))
    cand = np.empty((len(queries), k), np.int64)
    cos = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), chunk):
        sims = q[s:s + chunk] @ e.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(np.arange(k), (len(sims), 1))
        top_s = np.take_along_axis(sims, top, 1)
        order = np.argsort(-top_s, axis=1)
        cand[s:s + chunk] = np.take_along_axis(top, order, 1)
        cos[s:s + chunk] = np.take_along_axis(top_s, order, 1)
    return Retrieval(entries, entry_of_pair, cand, cos, queries)


class Judge:
    """Whether the entry a lookup returned is right.

    strict: the pair's own text_a, and the pair is labelled a duplicate (the issue's definition).
    closure: strict, or the returned question is the lookup's very text, or the two are joined by a
    chain of duplicate-labelled pairs in the file. QQP repeats questions across pairs: a text_b is
    often another pair's text_a, so the exact layer rightly returns it and strict counts that hit
    wrong; closure counts only what the labels themselves say is the same question."""

    def __init__(self, pairs: Pairs, r: Retrieval) -> None:
        self.pairs, self.r = pairs, r
        parent: dict[str, str] = {}

        def find(x: str) -> str:
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b, y in zip(pairs.text_a, pairs.text_b, pairs.label):
            if y:
                parent[find(normalize_text(a))] = find(normalize_text(b))
        self._find = find

    def strict(self, rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        return (chosen == self.r.entry_of_pair[rows]) & self.pairs.label[rows]

    def closure(self, rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        out = self.strict(rows, chosen)
        for n, (i, e) in enumerate(zip(rows, chosen)):
            if not out[n] and e >= 0:
                q, t = self.r.queries[i], self.r.entries[e]
                out[n] = q == t or self._find(q) == self._find(t)
        return out


def lookup_decisions(r: Retrieval, rows: np.ndarray, decider: HitDecider, min_similarity: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per lookup: the chosen entry (-1: none) and its confidence, as the service decides: the exact
    layer first (the same normalized text: confidence +inf, a hit at any threshold), then the decider
    over the top-k candidates."""
    chosen = np.full(len(rows), -1)
    conf = np.zeros(len(rows))
    for n, i in enumerate(rows):
        if r.entries[r.cand[i, 0]] == r.queries[i]:
            chosen[n], conf[n] = r.cand[i, 0], np.inf
            continue
        cands = [(r.entries[r.cand[i, j]], float(r.cos[i, j])) for j in range(r.cand.shape[1])]
        idx, d = decider.choose(r.queries[i], cands, min_similarity)
        if idx >= 0:
            chosen[n], conf[n] = r.cand[i, idx], d.confidence
    return chosen, conf


def rerank_pool(r: Retrieval, i: int, min_cosine: float, top: int) -> list[int]:
    """Positions in r.cand[i] the cross-encoder reads for lookup i, as the service picks them: its best `top`
    candidates at or above `min_cosine`; none when the exact layer answers the lookup."""
    if r.entries[r.cand[i, 0]] == r.queries[i]:
        return []
    return [j for j in range(min(top, r.cand.shape[1])) if r.cos[i, j] >= min_cosine]


def rerank_decisions(r: Retrieval, rows: np.ndarray, score: Callable[[list[tuple[str, str]]], np.ndarray],
                     min_cosine: float, top: int, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per lookup, as the service decides with the cross-encoder: the exact layer first, else the pooled
    candidate with the highest probability (`score` of (lookup, cached question) pairs) is the choice and
    its probability the confidence."""
    keys = [(i, j) for i in rows for j in rerank_pool(r, i, min_cosine, top)]
    texts = [(r.queries[i], r.entries[r.cand[i, j]]) for i, j in keys]
    probs = np.empty(len(keys))
    order = sorted(range(len(keys)), key=lambda k: len(texts[k][0]) + len(texts[k][1]))   # little padding
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        probs[idx] = score([texts[k] for k in idx])
    by_key = dict(zip(keys, probs))
    chosen, conf = np.full(len(rows), -1), np.zeros(len(rows))
    for n, i in enumerate(rows):
        if r.entries[r.cand[i, 0]] == r.queries[i]:
            chosen[n], conf[n] = r.cand[i, 0], np.inf
            continue
        js = rerank_pool(r, i, min_cosine, top)
        if js:
            best = max(js, key=lambda j: by_key[(i, j)])
            chosen[n], conf[n] = r.cand[i, best], by_key[(i, best)]
    return chosen, conf


def oracle_decisions(r: Retrieval, rows: np.ndarray, judge: Judge) -> tuple[np.ndarray, np.ndarray]:
    """A decision that knows the labels: it hits on the best-ranked candidate the label closure calls the
    same question, and misses otherwise. No label-free decision does better under the closure; its
    strict precision shows how many right answers the issue's strict definition counts as wrong (QQP
    asks many questions several times, so another copy often ranks above the pair's own text_a)."""
    chosen = np.full(len(rows), -1)
    for n, i in enumerate(rows):
        same = np.nonzero(judge.closure(np.full(r.cand.shape[1], i), r.cand[i]))[0]
        if len(same):
            chosen[n] = r.cand[i, same[0]]
    return chosen, np.where(chosen >= 0, np.inf, 0.0)


def sweep(judge: Judge, rows: np.ndarray, chosen: np.ndarray, conf: np.ndarray, thresholds: np.ndarray) -> list[dict]:
    """Per threshold: hits, strict precision and recall, and precision under the label closure."""
    strict, closure = judge.strict(rows, chosen), judge.closure(rows, chosen)
    num_pos = int(judge.pairs.label[rows].sum())
    out = []
    for t in thresholds:
        hit = conf >= t
        hits = int(hit.sum())
        good = int((hit & strict).sum())
        good_c = int((hit & closure).sum())
        out.append({"threshold": round(float(t), 4), "hits": hits, "correct_hits": good,
                    "precision": good / hits if hits else 1.0, "recall": good / num_pos if num_pos else 0.0,
                    "precision_closure": good_c / hits if hits else 1.0})
    return out


def lowest_threshold_with_precision(points: list[dict], target: float, key: str = "precision_closure",
                                    min_hits: int = 20) -> dict | None:
    ok = [p for p in points if p[key] >= target and p["hits"] >= min_hits]
    return min(ok, key=lambda p: p["threshold"]) if ok else None
