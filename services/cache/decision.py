"""The semantic hit decision: is a cached question close enough to answer a new one?

A bare cosine threshold is the baseline. It fails on pairs that share most words but ask different
things ("... in India?" / "... in China?", "A to B" / "B to A", "how to" / "why"). The decision
here is a small logistic model over pair features (cosine, its margin over the next candidate, word
and content-word overlap, words present on one side only, numbers, negations, question word, word
order) trained on labelled pairs by `tools/train_cache_decision.py`; its weights ship as
`hit_model.json` next to this file. No torch, no grpc: numpy only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

MODEL_PATH = Path(__file__).with_name("hit_model.json")

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_NEGATIONS = frozenset({"not", "no", "never", "none", "nothing", "nobody", "without", "cannot", "can't", "don't",
                        "doesn't", "didn't", "isn't", "aren't", "wasn't", "weren't", "won't", "wouldn't",
                        "shouldn't", "couldn't", "haven't", "hasn't", "hadn't"})
_QUESTION_WORDS = ("what", "how", "why", "when", "where", "who", "which", "whom", "whose", "is", "are", "can",
                   "do", "does", "should", "will", "would", "could")
_STOPWORDS = frozenset("""a an the of to in on at for by with from as and or but if then than so that this these
those there here it its it's be is are was were been being am do does did doing have has had having i me my
mine we us our you your he him his she her they them their what which who whom whose when where why how can
could should would will shall may might must about into over under up down out off just very really more most
some any all each every other such own same too also only not no nor get got best good way ways""".split())

FEATURE_NAMES = (
    "cosine", "cosine_sq", "margin", "word_jaccard", "content_jaccard", "only_in_query", "only_in_cached",
    "number_mismatch", "negation_mismatch", "question_word_differs", "length_ratio", "bigram_jaccard",
    "order_swapped", "cosine_x_content_jaccard",
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _question_word(words: Sequence[str]) -> str:
    for w in words[:3]:
        if w in _QUESTION_WORDS:
            return w
    return ""


def pair_features(query: str, cached: str, cosine: float, next_cosine: float) -> np.ndarray:
    """Features of one (new question, cached question) pair; `next_cosine` is the best cosine of any
    other candidate (0 when there is none): a clear winner is more trustworthy than one of many."""
    wq, wc = _words(query), _words(cached)
    sq, sc = set(wq), set(wc)
    cq, cc = sq - _STOPWORDS, sc - _STOPWORDS
    content_j = _jaccard(cq, cc)
    only_q = len(cq - cc) / max(len(cq), 1)
    only_c = len(cc - cq) / max(len(cc), 1)
    nq, nc = set(_NUMBER.findall(query)), set(_NUMBER.findall(cached))
    bq, bc = set(zip(wq, wq[1:])), set(zip(wc, wc[1:]))
    # the same content words in another order ("from A to B" / "from B to A")
    ordered_q = [w for w in wq if w in cc]
    ordered_c = [w for w in wc if w in cq]
    swapped = float(len(ordered_q) >= 2 and sorted(ordered_q) == sorted(ordered_c) and ordered_q != ordered_c)
    return np.array([
        cosine, cosine * cosine, cosine - next_cosine, _jaccard(sq, sc), content_j, only_q, only_c,
        float(nq != nc), float(bool(sq & _NEGATIONS) != bool(sc & _NEGATIONS)),
        float(_question_word(wq) != _question_word(wc)),
        min(len(wq), len(wc)) / max(len(wq), len(wc), 1), _jaccard(bq, bc), swapped, cosine * content_j,
    ], dtype=np.float64)


@dataclass(frozen=True, slots=True)
class HitModel:
    """Logistic model over standardized pair features; `threshold` is the default operating point."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float
    min_cosine: float          # candidates below this cosine are never scored (and never hit)
    meta: dict

    def probability(self, features: np.ndarray) -> np.ndarray:
        z = ((np.atleast_2d(features) - self.mean) / self.std) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def to_json(self) -> str:
        return json.dumps({
            "features": list(FEATURE_NAMES), "mean": self.mean.tolist(), "std": self.std.tolist(),
            "weights": self.weights.tolist(), "bias": self.bias, "threshold": self.threshold,
            "min_cosine": self.min_cosine, "meta": self.meta}, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path | str = MODEL_PATH) -> "HitModel":
        d = json.loads(Path(path).read_text())
        if tuple(d["features"]) != FEATURE_NAMES:
            raise ValueError(f"{path} was trained on other features: retrain with tools/train_cache_decision.py")
        return cls(np.array(d["mean"]), np.array(d["std"]), np.array(d["weights"]), float(d["bias"]),
                   float(d["threshold"]), float(d["min_cosine"]), d.get("meta", {}))


@dataclass(frozen=True, slots=True)
class Decision:
    hit: bool
    confidence: float      # the model's probability (or the cosine itself for a plain threshold)


class HitDecider:
    """Decides a semantic hit for the best of a few candidates.

    Classifier mode (default): every candidate at or above the model's `min_cosine` is scored; the
    best-scoring one hits if its probability reaches the threshold. Cosine mode (`min_similarity`
    given): the top candidate hits if its cosine reaches it (the baseline, and a per-request override)."""

    def __init__(self, model: HitModel | None, threshold: float | None = None) -> None:
        self.model = model
        self.threshold = threshold if threshold is not None else (model.threshold if model else 0.9)

    @classmethod
    def default(cls, threshold: float | None = None) -> "HitDecider":
        """The shipped classifier, at its trained threshold or at `threshold`."""
        return cls(HitModel.load(), threshold)

    def describe(self) -> str:
        if self.model is None:
            return f"cosine>={self.threshold:.3f}"
        return f"classifier p>={self.threshold:.3f} (cosine>={self.model.min_cosine:.2f})"

    def choose(self, query: str, candidates: Sequence[tuple[str, float]],
               min_similarity: float | None = None) -> tuple[int, Decision]:
        """candidates: (cached question, cosine), best cosine first. Returns (index, decision);
        index -1 when there is no candidate."""
        if not candidates:
            return -1, Decision(False, 0.0)
        if min_similarity is not None or self.model is None:
            bar = min_similarity if min_similarity is not None else self.threshold
            cos = candidates[0][1]
            return 0, Decision(cos >= bar, cos)
        scored, probs = self.probabilities(query, candidates)
        if not scored:
            return 0, Decision(False, 0.0)
        best = int(np.argmax(probs))
        p = float(probs[best])
        return scored[best], Decision(p >= self.threshold and not math.isnan(p), p)

    def ranked(self, query: str, candidates: Sequence[tuple[str, float]], min_similarity: float | None = None
               ) -> list[tuple[int, Decision]]:
        """Every candidate that would hit, the most confident first (the next is tried when the first's
        entry is gone)."""
        if min_similarity is not None or self.model is None:
            bar = min_similarity if min_similarity is not None else self.threshold
            return [(i, Decision(True, cos)) for i, (_, cos) in enumerate(candidates) if cos >= bar]
        scored, probs = self.probabilities(query, candidates)
        hits = [(i, Decision(True, float(p))) for i, p in zip(scored, probs) if p >= self.threshold]
        return sorted(hits, key=lambda h: -h[1].confidence)

    def probabilities(self, query: str, candidates: Sequence[tuple[str, float]]) -> tuple[list[int], np.ndarray]:
        """The classifier's probability for each candidate at or above its `min_cosine`: (their indexes, probs)."""
        m = self.model
        assert m is not None
        scored = [i for i, (_, cos) in enumerate(candidates) if cos >= m.min_cosine]
        if not scored:
            return [], np.zeros(0)
        feats = np.stack([pair_features(query, candidates[i][0], candidates[i][1],
                                        max((c for j, (_, c) in enumerate(candidates) if j != i), default=0.0))
                          for i in scored])
        return scored, m.probability(feats)
