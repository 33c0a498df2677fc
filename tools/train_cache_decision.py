"""Trains the semantic hit decision (`hit_model.json`) on labelled question pairs.

    python -m tools.train_cache_decision --pairs ../shared/data/qqp_pairs_dev.jsonl

The pairs are split in two by position (even lines train, odd lines are held out). Every text_a of
the file is a cached entry (all compete, as in `strata cache eval`); each training text_b's top-k
candidates by cosine become examples, labelled 1 when the labels say the candidate is the same
question (`cache_pairs.Judge.closure`). A logistic model is fitted on standardized features (Newton's method with
a small L2 penalty); the default threshold is the lowest probability whose precision on the
training half reaches --train-precision (label-closure precision). Precision and recall on the held-out half, and plain
cosine's on the same half, are written into the model's metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from services.cache.decision import FEATURE_NAMES, MODEL_PATH, HitDecider, HitModel, pair_features
from tools.cache_pairs import (Judge, Pairs, Retrieval, lookup_decisions, lowest_threshold_with_precision, retrieve,
                               sweep)

TOP_K = 5
MIN_COSINE = 0.6


def candidate_examples(r: Retrieval, judge: Judge, rows: np.ndarray, min_cosine: float,
                       unlabelled_below: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One example per (lookup, candidate at or above min_cosine); labelled by the label closure. With
    `unlabelled_below`, a candidate the labels say nothing about (not the pair's own text_a, not joined to the
    lookup) at or above that cosine is left out instead of taught as a different question."""
    feats, labels = [], []
    for i in rows:
        cands = r.cand[i]
        right = judge.closure(np.full(len(cands), i), cands)
        for j in range(len(cands)):
            cos = float(r.cos[i, j])
            if cos < min_cosine:
                break
            if (unlabelled_below is not None and cos >= unlabelled_below and not right[j]
                    and cands[j] != r.entry_of_pair[i]):
                continue
            other = max((float(r.cos[i, m]) for m in range(len(cands)) if m != j), default=0.0)
            feats.append(pair_features(r.queries[i], r.entries[cands[j]], cos, other))
            labels.append(bool(right[j]))
    return np.array(feats), np.array(labels, dtype=np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-9] = 1.0
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = l2 * len(x) * np.eye(z.shape[1])
    reg[-1, -1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -40, 40)))
        grad = z.T @ (p - y) + reg @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, std, w[:-1], float(w[-1])


def cached(embed, path: Path | None):
    """`embed` with a text -> vector store in an .npz file (for iterating on features, not for serving)."""
    if path is None:
        return embed
    store: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            store = dict(zip(z["texts"].tolist(), z["vectors"]))

    def run(texts):
        missing = list(dict.fromkeys(t for t in texts if t not in store))
        if missing:
            store.update(zip(missing, embed(missing)))
            np.savez(path, texts=np.array(list(store)), vectors=np.stack(list(store.values())))
        return np.stack([store[t] for t in texts])
    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.train_cache_decision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--out", type=Path, default=MODEL_PATH)
    p.add_argument("--train-precision", type=float, default=0.92,
                   help="precision the default threshold must reach on the training half")
    p.add_argument("--embeddings-cache", type=Path, default=None, help="reuse embeddings saved here (npz)")
    p.add_argument("--unlabelled-below", type=float, default=None,
                   help="leave out training candidates the labels say nothing about from this cosine up (default: "
                        "every candidate is labelled by the closure, as the shipped model was trained)")
    a = p.parse_args(argv)

    from services.embedding.embedder import MiniLMEmbedder

    pairs = Pairs.load(a.pairs)
    embedder = MiniLMEmbedder()
    print(f"embedding and retrieving {len(pairs)} pairs", file=sys.stderr, flush=True)
    r = retrieve(pairs, cached(embedder.embed, a.embeddings_cache), k=TOP_K)
    rows = np.arange(len(pairs))
    train, held = rows[rows % 2 == 0], rows[rows % 2 == 1]

    judge = Judge(pairs, r)
    x, y = candidate_examples(r, judge, train, MIN_COSINE, a.unlabelled_below)
    mean, std, w, b = fit_logistic(x, y)
    grid = np.round(np.arange(0.05, 0.995, 0.01), 3)
    model = HitModel(mean, std, w, b, threshold=0.5, min_cosine=MIN_COSINE, meta={})
    chosen, conf = lookup_decisions(r, train, HitDecider(model))
    op = lowest_threshold_with_precision(sweep(judge, train, chosen, conf, grid), a.train_precision)
    if op is None:
        raise SystemExit(f"no threshold reaches precision {a.train_precision} on the training half")
    chosen_h, conf_h = lookup_decisions(r, held, HitDecider(model))
    held_point = sweep(judge, held, chosen_h, conf_h, np.array([op["threshold"]]))[0]
    cos_grid = np.round(np.arange(0.80, 1.0, 0.01), 3)
    chosen_c, conf_c = lookup_decisions(r, held, HitDecider(None), min_similarity=0.0)
    cos_points = sweep(judge, held, chosen_c, conf_c, cos_grid)
    digest = hashlib.sha256(a.pairs.read_bytes()).hexdigest()[:16]
    meta = {
        "trained_on": a.pairs.name, "sha256_16": digest, "split": "even lines train, odd lines held out",
        "examples": int(len(y)), "positives": int(y.sum()), "top_k": TOP_K,
        "train_operating_point": op, "held_out_operating_point": held_point,
        "held_out_cosine_baseline": [pt for pt in cos_points if pt["threshold"] in (0.85, 0.9, 0.95)],
        "weights_by_feature": dict(zip(FEATURE_NAMES, np.round(w, 4).tolist())),
    }
    final = HitModel(mean, std, w, b, threshold=op["threshold"], min_cosine=MIN_COSINE, meta=meta)
    a.out.write_text(final.to_json())
    print(f"wrote {a.out}: threshold {op['threshold']}; held out: precision {held_point['precision_closure']:.3f} "
          f"(strict {held_point['precision']:.3f}) recall {held_point['recall']:.3f} ({held_point['hits']} hits)")
    for pt in cos_points:
        print(f"  plain cosine >= {pt['threshold']:.2f} (held out): precision {pt['precision_closure']:.3f} "
              f"(strict {pt['precision']:.3f}) recall {pt['recall']:.3f}")
    # thresholds chosen on the held-out half itself: an optimistic figure, for comparing trainings with each other
    curve = sweep(judge, held, chosen_h, conf_h, grid)
    best = {t: max((pt["recall"] for pt in curve if pt["precision_closure"] >= t and pt["hits"] >= 20), default=0.0)
            for t in (0.90, 0.85, 0.80, 0.70)}
    print("  best held-out recall at closure precision >= " + ", ".join(f"{t:.2f}: {v:.3f}" for t, v in best.items()))


if __name__ == "__main__":
    main()
