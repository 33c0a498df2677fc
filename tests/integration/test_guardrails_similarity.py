"""The injection screens on tests/data/injection_corpus.jsonl with the real MiniLM embedder, at the
gateway's default similarity threshold: rules alone against rules + similarity, each held to a floor
(recall) or a ceiling (benign prompts flagged) a little beyond what was measured (values in comments;
`python -m bench.guardrails` computes the same numbers with the same code)."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.config import GatewayConfig
from tools.guardrails_eval import measure

THRESHOLD = GatewayConfig().injection_similarity     # 0.55 when measured


@pytest.fixture(scope="module")
def measured(embedder):
    return asyncio.run(measure(embedder.embed, THRESHOLD))


def test_similarity_screen_adds_attacks_the_rules_miss_at_the_gateways_threshold(measured):
    injection = measured["injection"]
    rules, similar, both = injection["rules"], injection["similarity"], injection["rules+similarity"]
    assert similar["recall"] >= 0.14                 # measured 0.166 (38/229)
    assert similar["false_positive_rate"] <= 0.045   # measured 0.028 (5/181)
    assert both["recall"] >= 0.37                    # measured 0.402 (92/229)
    assert both["false_positive_rate"] <= 0.16       # measured 0.138 (25/181)
    assert both["recall"] >= rules["recall"] + 0.05  # measured +0.074: 17 attacks only the similarity screen flags
    assert both["per_category"]["attack"]["extraction"]["rate"] >= 0.5   # measured 0.594 (19/32)


def test_no_attack_is_a_paraphrase_of_a_known_phrasing(measured):
    """The score is the cosine to the nearest phrasing the screen knows: a corpus attack scoring near 1
    would be a copy of one, and the recall above would flatter the screen."""
    attacks = [s for case, s in zip(measured["injection_cases"], measured["scores"]) if case["label"] == "attack"]
    assert max(attacks) < 0.9, max(attacks)          # measured 0.751
