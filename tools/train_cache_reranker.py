"""Trains the cross-encoder experiment (`tools/cross_encoder.py`) and measures it as a hit decision.

    python -m tools.train_cache_reranker --pairs ../shared/data/qqp_pairs_dev.jsonl [--embeddings-cache F.npz]
                                         [--out cache_reranker.safetensors] [--curve curve.json]

The protocol is `strata cache eval`'s: every text_a of the file is a cached entry (all compete); each
text_b is looked up and its top candidates by MiniLM cosine (at or above --min-cosine) become examples,
labelled 1 when the label closure says the candidate is the same question (`cache_pairs.Judge`).
The file is split by position: odd lines are held out (never trained on, never used to choose anything);
of the even lines, every fifth calibrates (it picks the default threshold: the lowest whose precision
under the label closure reaches --target-precision there) and the rest train. The adapters (LoRA of rank
--rank on the first --layers layers of all-MiniLM-L6-v2, its LayerNorms and a logistic head) are fitted
with AdamW on binary cross-entropy, each pair read in both orders. Seeded: the same file and flags give
the same weights on the same machine. The held-out precision/recall curve is written into the file's
metadata and to --curve (JSON); `strata cache eval` measures it again through the service's own code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tools.cross_encoder import Adapters, RerankerConfig, frozen_copy, pair_ids
from tools.cache_pairs import Judge, Pairs, Retrieval, rerank_decisions, rerank_pool, retrieve, sweep
from tools.train_cache_decision import cached

TOP_K = 5


def splits(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, calibration, held out) row indices: odd lines held out, every fifth even line calibrates."""
    rows = np.arange(n)
    even = rows[rows % 2 == 0]
    calib = even[(even // 2) % 5 == 4]
    return np.setdiff1d(even, calib), calib, rows[rows % 2 == 1]


def examples(r: Retrieval, judge: Judge, pairs: Pairs, rows: np.ndarray, min_cosine: float, top: int,
             unlabelled_below: float) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Each lookup's labelled pair, and its candidates that the label closure joins to it (positives) or
    that sit below `unlabelled_below` cosine (negatives). A close candidate the labels say nothing about
    is left out: QQP labels few of its duplicates, and "How do I get an internship at Google?" / "How can
    I get an internship at Google?" must not be taught as different questions."""
    texts, labels = [], []
    for i in rows:
        texts.append((r.queries[i], r.entries[r.entry_of_pair[i]]))
        labels.append(bool(pairs.label[i]))
        js = [j for j in rerank_pool(r, i, min_cosine, top) if r.cand[i, j] != r.entry_of_pair[i]]
        right = judge.closure(np.full(len(js), i), r.cand[i, js]) if js else []
        for j, y in zip(js, right):
            if y or r.cos[i, j] < unlabelled_below:
                texts.append((r.queries[i], r.entries[r.cand[i, j]]))
                labels.append(bool(y))
    return texts, np.array(labels, dtype=np.float32)


def scorer(model: Adapters, base):
    layers = [frozen_copy(m) for m in model.merged(base)]

    def score(texts: list[tuple[str, str]]) -> np.ndarray:
        enc = [pair_ids(base, q, c) for q, c in texts]
        with torch.inference_mode():
            return torch.sigmoid(model.logits(base, [e[0] for e in enc], [e[1] for e in enc], layers)).double().numpy()
    return score


def train(model: Adapters, base, texts: list[tuple[str, str]], labels: np.ndarray, epochs: float, batch: int,
          lr: float, seed: int, dropout: float) -> None:
    rng = np.random.default_rng(seed)
    # both orders: the cache reads (new, cached), but a duplicate is a duplicate either way round
    enc = [pair_ids(base, q, c) for q, c in texts] + [pair_ids(base, c, q) for q, c in texts]
    y = torch.tensor(np.concatenate([labels, labels]))
    steps = max(1, int(math.ceil(len(enc) / batch) * epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.06 * steps)) * max(0.0, 1 - s / steps))
    pos_weight = torch.tensor(1.0)
    t0, step, seen = time.monotonic(), 0, 0.0
    while step < steps:
        perm = rng.permutation(len(enc))
        # batches of similar length (little padding), in random order
        chunks = [perm[s:s + batch * 50] for s in range(0, len(perm), batch * 50)]
        for chunk in chunks:
            chunk = sorted(chunk, key=lambda k: len(enc[k][0]))
            for b in rng.permutation(range(0, len(chunk), batch)):
                idx = chunk[b:b + batch]
                z = model.logits(base, [enc[k][0] for k in idx], [enc[k][1] for k in idx], dropout=dropout)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y[idx], pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                seen = 0.98 * seen + 0.02 * loss.item() if step > 1 else loss.item()
                if step % 50 == 0 or step == steps:
                    print(f"  step {step}/{steps}: loss {seen:.4f}, {time.monotonic() - t0:.0f} s", file=sys.stderr,
                          flush=True)
                if step >= steps:
                    return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.train_cache_reranker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("cache_reranker.safetensors"))
    p.add_argument("--curve", type=Path, default=None, help="also write the held-out curve here (JSON)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--min-cosine", type=float, default=0.7)
    p.add_argument("--top", type=int, default=3, help="candidates read per lookup")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--unlabelled-below", type=float, default=0.9,
                   help="candidates the labels do not join are negatives only below this cosine")
    p.add_argument("--target-precision", type=float, default=0.92,
                   help="precision (label closure) the default threshold must reach on the calibration rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embeddings-cache", type=Path, default=None, help="reuse embeddings saved here (npz)")
    a = p.parse_args(argv)

    from services.embedding.embedder import MiniLMEmbedder

    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    pairs = Pairs.load(a.pairs)
    base = MiniLMEmbedder()
    print(f"embedding and retrieving {len(pairs)} pairs", file=sys.stderr, flush=True)
    r = retrieve(pairs, cached(base.embed, a.embeddings_cache), k=TOP_K)
    judge = Judge(pairs, r)
    fit_rows, calib_rows, held_rows = splits(len(pairs))
    texts, labels = examples(r, judge, pairs, fit_rows, a.min_cosine, TOP_K, a.unlabelled_below)
    print(f"{len(texts)} training pairs ({int(labels.sum())} the same question), {len(fit_rows)} lookups",
          file=sys.stderr, flush=True)
    model = Adapters(base, a.layers, a.rank, a.alpha)
    t0 = time.monotonic()
    train(model, base, texts, labels, a.epochs, a.batch, a.lr, a.seed, a.dropout)
    train_s = time.monotonic() - t0

    score = scorer(model, base)

    def curve(rows: np.ndarray) -> list[dict]:
        chosen, conf = rerank_decisions(r, rows, score, a.min_cosine, a.top)
        return sweep(judge, rows, chosen, conf, np.round(np.arange(0.05, 0.996, 0.01), 3))

    calib_points = curve(calib_rows)
    ok = [pt for pt in calib_points if pt["precision_closure"] >= a.target_precision and pt["hits"] >= 20]
    if not ok:
        raise SystemExit(f"no threshold reaches precision {a.target_precision} on the calibration rows")
    op = min(ok, key=lambda pt: pt["threshold"])
    held_points = curve(held_rows)
    held_op = next(pt for pt in held_points if pt["threshold"] == op["threshold"])
    meta = {
        "trained_on": a.pairs.name, "sha256_16": hashlib.sha256(a.pairs.read_bytes()).hexdigest()[:16],
        "split": "odd lines held out; even lines: every fifth calibrates, the rest train",
        "training_pairs": len(texts), "positives": int(labels.sum()), "epochs": a.epochs, "batch": a.batch,
        "lr": a.lr, "seed": a.seed, "train_s": round(train_s), "calibration_operating_point": op,
        "held_out_operating_point": held_op,
        "held_out_curve": [{k: round(v, 4) if isinstance(v, float) else v for k, v in pt.items()}
                           for pt in held_points[::5]],
    }
    config = RerankerConfig(layers=a.layers, rank=a.rank, alpha=a.alpha, min_cosine=a.min_cosine, top=a.top,
                            threshold=op["threshold"], meta=meta)
    model.save(a.out, config)
    if a.curve:
        a.curve.write_text(json.dumps({"calibration": calib_points, "held_out": held_points}, indent=1))
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB) after {train_s:.0f} s of training; threshold "
          f"{op['threshold']}: held out precision {held_op['precision_closure']:.3f} (strict {held_op['precision']:.3f}) "
          f"recall {held_op['recall']:.3f} ({held_op['hits']} hits)")
    best = max((pt for pt in held_points if pt["precision_closure"] >= 0.90 and pt["hits"] >= 20),
               key=lambda pt: pt["recall"], default=None)
    if best:
        print(f"held out, the highest recall at precision >= 0.90: {best}")


if __name__ == "__main__":
    main()
