"""The guardrails measured on labelled corpora (tests/data/pii_corpus.jsonl, tests/data/injection_corpus.jsonl).

`pii_rates(cases)`: per kind, the share of labelled values gone after `redact` (recall), and the share
of lines without personal data that it changed anyway (false positives). A value counts as gone when
neither it nor any 4+-character group of it (split at spaces, dashes, dots, slashes, parentheses) is
left, so a card whose first group survives a partial match is a miss.

`injection_rates(cases, scores, threshold)`: per method (rules, similarity, both), the share of
attacks flagged (recall) and of benign prompts flagged (false positives), overall and per category;
`similarity_scores` gives the scores through `InjectionSimilarity`, as the gateway computes them.

One implementation for the tests (which assert bounds on these numbers) and `python -m bench.guardrails`
(which writes them to bench/results/guardrails.json). No grpc, no model: the caller passes the embedder.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from services.gateway.guardrails import InjectionSimilarity, redact, screen_injection

CORPORA = Path(__file__).resolve().parents[1] / "tests" / "data"
PII_CORPUS = CORPORA / "pii_corpus.jsonl"
INJECTION_CORPUS = CORPORA / "injection_corpus.jsonl"
METHODS = ("rules", "similarity", "rules+similarity")

_GROUP_SEPARATORS = re.compile(r"[\s\-./()]+")


def load_corpus(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def leaked(value: str, text: str) -> bool:
    """Whether `value`, or a 4+-character group of it, is still in `text`."""
    return value in text or any(len(g) >= 4 and g in text for g in _GROUP_SEPARATORS.split(value))


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def pii_rates(cases: Sequence[dict]) -> dict:
    """Cases: {"text", "pii": [{"kind", "value", "format"}], "category", optional "keep": [values that must survive]}."""
    kinds: dict[str, Counter] = defaultdict(Counter)        # kind -> values, removed, typed
    formats: dict[str, Counter] = defaultdict(Counter)      # format -> values, removed
    categories: dict[str, Counter] = defaultdict(Counter)   # negative category -> lines, flagged
    kept, extra = Counter(), 0
    misses, false_positives = [], []
    for case in cases:
        r = redact(case["text"])
        labelled = Counter(item["kind"] for item in case["pii"])
        for item in case["pii"]:
            gone = not leaked(item["value"], r.text)
            # typed: gone, and redact reported at least as many of this kind as the line holds
            typed = gone and r.found[item["kind"]] >= labelled[item["kind"]]
            kinds[item["kind"]].update(values=1, removed=gone, typed=typed)
            formats[item["format"]].update(values=1, removed=gone)
            if not gone:
                misses.append({"kind": item["kind"], "format": item["format"], "value": item["value"], "redacted": r.text})
        if case["pii"]:
            extra += sum(max(0, n - labelled[k]) for k, n in r.found.items())
        else:
            changed = r.text != case["text"]
            categories[case["category"]].update(lines=1, flagged=changed)
            if changed:
                false_positives.append({"category": case["category"], "text": case["text"], "redacted": r.text})
        for value in case.get("keep", ()):
            kept.update(values=1, lost=value not in r.text)
    values = sum(c["values"] for c in kinds.values())
    removed = sum(c["removed"] for c in kinds.values())
    neg_lines = sum(c["lines"] for c in categories.values())
    neg_flagged = sum(c["flagged"] for c in categories.values())
    return {
        "lines": len(cases), "values": values, "recall": _rate(removed, values),
        "per_kind": {k: {"values": c["values"], "removed": c["removed"], "recall": _rate(c["removed"], c["values"]),
                         "typed": _rate(c["typed"], c["values"])} for k, c in sorted(kinds.items())},
        "per_format": {f: {"values": c["values"], "removed": c["removed"], "recall": _rate(c["removed"], c["values"])}
                       for f, c in sorted(formats.items())},
        "negatives": {"lines": neg_lines, "flagged": neg_flagged, "false_positive_rate": _rate(neg_flagged, neg_lines),
                      "per_category": {k: {"lines": c["lines"], "flagged": c["flagged"]} for k, c in sorted(categories.items())}},
        "extra_findings_on_positive_lines": extra,
        "kept_values": {"values": kept["values"], "lost": kept["lost"]},
        "misses": misses, "false_positives": false_positives,
    }


async def similarity_scores(texts: Sequence[str], embed_many: Callable[[list[str]], np.ndarray]) -> list[float]:
    """Each text's score as the gateway's `InjectionSimilarity.score` computes it (texts embedded in one batch)."""
    vectors = dict(zip(texts, embed_many(list(texts))))

    async def embed_one(text: str) -> np.ndarray:
        return vectors[text]

    sim = InjectionSimilarity(embed_many, embed_one, threshold=1.0)
    return [await sim.score(t) for t in texts]


def injection_rates(cases: Sequence[dict], scores: Sequence[float] | None = None, threshold: float | None = None) -> dict:
    """Cases: {"text", "label": "attack" | "benign", "category"}. Without scores, only the rules are measured."""
    screened = [screen_injection(c["text"]) for c in cases]
    flags: dict[str, list[bool]] = {"rules": [s.flagged for s in screened]}
    if scores is not None:
        flags["similarity"] = [s >= threshold for s in scores]
        flags["rules+similarity"] = [a or b for a, b in zip(flags["rules"], flags["similarity"])]
    out: dict = {"lines": len(cases), "attacks": sum(c["label"] == "attack" for c in cases),
                 "benign": sum(c["label"] == "benign" for c in cases), "threshold": threshold}
    for method, flagged in flags.items():
        per_category: dict[str, Counter] = defaultdict(Counter)
        for case, f in zip(cases, flagged):
            per_category[(case["label"], case["category"])].update(lines=1, flagged=f)
        attack = [f for case, f in zip(cases, flagged) if case["label"] == "attack"]
        benign = [f for case, f in zip(cases, flagged) if case["label"] == "benign"]
        out[method] = {
            "recall": _rate(sum(attack), len(attack)), "false_positive_rate": _rate(sum(benign), len(benign)),
            "per_category": {label: {cat: {"lines": c["lines"], "flagged": c["flagged"], "rate": _rate(c["flagged"], c["lines"])}
                                     for (lab, cat), c in sorted(per_category.items()) if lab == label}
                             for label in ("attack", "benign")},
        }
    final = flags.get("rules+similarity", flags["rules"])
    explain = lambda i: _explain(cases[i], screened[i].rules, scores, i)  # noqa: E731
    out["missed_attacks"] = [explain(i) for i, c in enumerate(cases) if c["label"] == "attack" and not final[i]]
    out["flagged_benign"] = [explain(i) for i, c in enumerate(cases) if c["label"] == "benign" and final[i]]
    return out


def _explain(case: dict, rules: Sequence[str], scores: Sequence[float] | None, i: int) -> dict:
    out = {"category": case["category"], "text": case["text"], "rules": list(rules)}
    if scores is not None:
        out["similarity"] = round(float(scores[i]), 3)
    return out


def per_category(cases: list[dict], n: int | None) -> list[dict]:
    """The first `n` cases of each (label, category), in corpus order; all of them when n is None."""
    if n is None:
        return cases
    seen: dict[tuple, int] = {}
    out = []
    for c in cases:
        key = (c["label"], c["category"])
        if seen.get(key, 0) < n:
            seen[key] = seen.get(key, 0) + 1
            out.append(c)
    return out


async def measure(embed_many: Callable[[list[str]], np.ndarray] | None, threshold: float | None,
                  injection_per_category: int | None = None) -> dict:
    """Both corpora: PII rates, and injection rates for the rules and (given an embedder) the similarity screen
    (on at most `injection_per_category` cases of each category: all by default)."""
    pii, attacks = load_corpus(PII_CORPUS), per_category(load_corpus(INJECTION_CORPUS), injection_per_category)
    scores = None
    if embed_many is not None:
        scores = await similarity_scores([c["text"] for c in attacks], embed_many)
    return {"pii": pii_rates(pii), "injection": injection_rates(attacks, scores, threshold), "scores": scores,
            "injection_cases": attacks}
