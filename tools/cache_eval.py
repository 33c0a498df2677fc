"""`strata cache eval`: precision and recall of the semantic hit decision on labelled pairs.

    strata cache eval --pairs ../shared/data/qqp_pairs_dev.jsonl [--json] [--limit N]

Every text_a is stored as a cached question in one namespace (all compete); every text_b is looked
up through the cache's own pieces: the same normalization, the exact layer, MiniLM embeddings,
exact top-k search and the service's hit decision (`HitDecider`). Reported per threshold, for the
calibrated decision and for plain cosine side by side: hits, precision and recall as the issue
defines them (a hit is correct when it returned the pair's own text_a and the pair is a duplicate),
and precision under the label closure (see `cache_pairs.Judge`). The service's default operating point
is marked. When the file is the one the decision was trained on, the held-out half (odd lines) is
reported too: the training half's numbers are optimistic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from services.cache.decision import HitDecider
from tools.cache_pairs import Judge, Pairs, lookup_decisions, oracle_decisions, retrieve, sweep

PROB_GRID = np.round(np.arange(0.3, 0.96, 0.05), 3)
COS_GRID = np.round(np.arange(0.80, 1.0, 0.01), 3)


def evaluate(pairs: Pairs, embed, decider: HitDecider, rows: np.ndarray | None = None, k: int = 5) -> dict:
    r = retrieve(pairs, embed, k=k)
    judge = Judge(pairs, r)
    out = {}
    for name, rows_ in {"all": np.arange(len(pairs)), "held_out": rows}.items():
        if rows_ is None:
            continue
        chosen, conf = lookup_decisions(r, rows_, decider)
        grid = sorted({*PROB_GRID.tolist(), decider.threshold})
        classifier = sweep(judge, rows_, chosen, conf, np.array(grid))
        chosen_c, conf_c = lookup_decisions(r, rows_, HitDecider(None), min_similarity=0.0)
        cosine = sweep(judge, rows_, chosen_c, conf_c, COS_GRID)
        default = next(p for p in classifier if p["threshold"] == round(decider.threshold, 4))
        oracle = sweep(judge, rows_, *oracle_decisions(r, rows_, judge), np.array([np.inf]))[0]
        out[name] = {"lookups": int(len(rows_)), "duplicates": int(pairs.label[rows_].sum()),
                     "default": {"decision": decider.describe(), **default},
                     "oracle": {k: v for k, v in oracle.items() if k != "threshold"},
                     "classifier": classifier, "cosine": cosine}
    return out


def print_report(report: dict) -> None:
    for name, res in report["results"].items():
        print(f"\n== {name}: {res['lookups']} lookups, {res['duplicates']} labelled duplicates")
        d = res["default"]
        print(f"default operating point ({d['decision']}): precision {d['precision_closure']:.3f} under the label "
              f"closure (strict {d['precision']:.3f}), recall {d['recall']:.3f}, {d['hits']} hits")
        o = res["oracle"]
        print(f"label oracle (hits exactly when the labels say a candidate is the same question): precision "
              f"{o['precision']:.3f}, recall {o['recall']:.3f}, {o['hits']} hits: the strict definition counts "
              f"{1 - o['precision']:.0%} of these right answers wrong (another copy of the question ranked first)")
        for label, points in (("classifier p >=", res["classifier"]), ("cosine >=", res["cosine"])):
            print(f"{label:<19}{'hits':>7}{'closure':>9}{'strict':>8}{'recall':>8}")
            for p in points:
                mark = "  <- default" if label.startswith("classifier") and p["threshold"] == d["threshold"] else ""
                print(f"{p['threshold']:<19.2f}{p['hits']:>7}{p['precision_closure']:>9.3f}"
                      f"{p['precision']:>8.3f}{p['recall']:>8.3f}{mark}")


def plot(report: dict, path: Path) -> None:
    """Precision (label closure) against recall of each decision, on the held-out half when there is one."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (make bench installs it)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = "held_out" if "held_out" in report["results"] else "all"
    res = report["results"][name]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for key, label in (("classifier", "logistic classifier (p threshold)"), ("cosine", "plain cosine threshold")):
        if key in res:
            pts = [p for p in res[key] if p["hits"] > 0]
            ax.plot([p["recall"] for p in pts], [p["precision_closure"] for p in pts], ".-", label=label)
    d, o = res["default"], res["oracle"]
    ax.scatter([d["recall"]], [d["precision_closure"]], marker="*", s=160, color="k", zorder=3,
               label=f"default: {d['decision']}")
    ax.scatter([o["recall"]], [o["precision_closure"]], marker="x", color="gray", label="label oracle")
    ax.axhline(0.90, color="red", ls=":", lw=1)
    ax.axvline(0.40, color="red", ls=":", lw=1, label="goal: precision 0.90 at recall 0.40")
    ax.set(xlabel="recall", ylabel="precision under the label closure", xlim=(0, 1), ylim=(0.5, 1.01),
           title=f"{Path(report['pairs']).name}: {res['lookups']} lookups ({name.replace('_', ' ')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a: argparse.Namespace) -> None:
    from services.embedding.embedder import MiniLMEmbedder

    path = Path(a.pairs)
    if not path.is_file():
        raise SystemExit(f"no such file: {path}")
    try:
        pairs = Pairs.load(path, a.limit)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    decider = HitDecider.default() if a.similarity_threshold is None else HitDecider(None, a.similarity_threshold)
    trained_on = decider.model.meta.get("sha256_16") if decider.model else None
    same_file = trained_on == hashlib.sha256(path.read_bytes()).hexdigest()[:16] and not a.limit
    rows = np.arange(len(pairs))
    print(f"embedding {len(pairs)} pairs and looking up every text_b among all text_a ...", file=sys.stderr, flush=True)
    results = evaluate(pairs, MiniLMEmbedder().embed, decider, rows[rows % 2 == 1] if same_file else None)
    report = {"pairs": str(path), "num_pairs": len(pairs), "decision": decider.describe(),
              "trained_on_this_file": same_file, "results": results}
    if a.plot:
        plot(report, Path(a.plot))
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
