"""The guardrails on labelled corpora (tests/data/pii_corpus.jsonl, tests/data/injection_corpus.jsonl).

Per PII kind, the share of labelled values gone after redaction; the share of lines without personal data
that redaction changes; the share of attacks and of benign prompts the injection rules flag. Each is held
to a floor (or ceiling) a little below (above) what was measured, so a regression fails here; the
measured values are in the comments and `python -m bench.guardrails` prints them. The similarity screen
is measured with the real embedder in tests/integration/test_guardrails_similarity.py.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter

import pytest

from services.gateway.guardrails import (iban_ok, load_phrasings, luhn_ok, normalise_for_screen, redact,
                                         screen_injection)
from tools.calibrate_injection import HELD_OUT
from tools.guardrails_eval import INJECTION_CORPUS, PII_CORPUS, injection_rates, load_corpus, pii_rates

PII = load_corpus(PII_CORPUS)
INJECTION = load_corpus(INJECTION_CORPUS)


@pytest.fixture(scope="module")
def pii():
    return pii_rates(PII)


@pytest.fixture(scope="module")
def rules():
    return injection_rates(INJECTION)["rules"]


def test_the_corpora_are_labelled_consistently():
    assert len(PII) >= 300 and sum(not c["pii"] for c in PII) >= 130
    assert Counter(c["label"] for c in INJECTION).keys() == {"attack", "benign"} and len(INJECTION) >= 400
    for corpus in (PII, INJECTION):
        texts = [c["text"] for c in corpus]
        assert len(set(texts)) == len(texts)
    for case in PII:
        for item in case["pii"]:
            assert item["value"] in case["text"], item
            digits = re.sub(r"\D", "", item["value"])
            assert item["kind"] != "CARD" or luhn_ok(digits), item
            assert item["kind"] != "IBAN" or iban_ok(item["value"]), item
    # the labels use the kinds redact() reports
    labelled = {item["kind"] for case in PII for item in case["pii"]}
    reported = set().union(*(redact(case["text"]).found for case in PII))
    assert labelled == reported == {"EMAIL", "CARD", "IBAN", "NATIONAL_ID", "PHONE", "IP_ADDRESS"}


def test_attacks_are_not_copies_of_the_phrasings_the_similarity_screen_knows():
    """The phrasings file (and calibrate_injection's held-out attacks) are what the threshold was set on: an
    attack copied from them would make the similarity screen's recall look better than it is."""
    def words(s: str) -> str:
        return " ".join(re.findall(r"\w+", s.lower()))
    known = [words(p) for p in load_phrasings() + HELD_OUT]
    closest = 0.0
    for case in INJECTION:
        text = words(case["text"])
        for k in known:
            m = difflib.SequenceMatcher(None, text, k, autojunk=False)
            if m.real_quick_ratio() > 0.75 and m.quick_ratio() > 0.75:
                closest = max(closest, m.ratio())
    assert closest < 0.8, closest          # measured: 0.73 (a shared "ignore all previous instructions")


def test_nothing_in_the_corpora_breaks_the_guardrails():
    for text in [c["text"] for c in PII + INJECTION]:
        r = redact(text)
        assert isinstance(r.text, str) and all(n > 0 for n in r.found.values())
        assert not redact(r.text).any, (text, r.text)       # placeholders are never redacted again
        assert set(screen_injection(text).rules) <= {"ignore_instructions", "reveal_system_prompt", "role_override",
                                                      "jailbreak_keyword", "fake_system_turn"}
        assert isinstance(normalise_for_screen(text), str)


@pytest.mark.parametrize("kind, floor", [
    ("CARD", 0.93),          # measured 0.966 (28/29; a card written with dots is missed)
    ("EMAIL", 0.94),         # 0.973 (36/37; "name dot last at example dot com" is missed)
    ("IBAN", 0.95),          # 1.000 (27/27)
    ("IP_ADDRESS", 0.94),    # 1.000 (19/19)
    ("NATIONAL_ID", 0.94),   # 1.000 (17/17)
    ("PHONE", 0.95),         # 0.986 (71/72; 0044 ... with the 00 international prefix is missed)
])
def test_personal_data_of_each_kind_is_gone_after_redaction(pii, kind, floor):
    got = pii["per_kind"][kind]
    assert got["recall"] >= floor, (got, [m for m in pii["misses"] if m["kind"] == kind])
    assert got["typed"] == got["recall"], got                 # what is gone was reported as its own kind


def test_redaction_keeps_what_is_not_personal_data(pii):
    # measured 8 of 138 lines changed (0.058): 12-digit meeting/tracking/serial numbers in phone-like groups,
    # lottery numbers that look like a French number, a product code shaped like a UK NI number, a
    # four-part firmware version that is a public IPv4 address
    assert pii["negatives"]["false_positive_rate"] <= 0.08, pii["false_positives"]
    assert pii["recall"] >= 0.96, pii["misses"]               # measured 0.985 (198/201)
    assert pii["kept_values"]["lost"] == 0 and pii["extra_findings_on_positive_lines"] == 0, pii["kept_values"]


def test_injection_rules_catch_a_third_of_the_attacks_and_flag_few_benign_prompts(rules):
    assert rules["recall"] >= 0.30                            # measured 0.328 (75/229)
    # measured 0.122 (22/181): questions about injection that quote attacks, "ignore the previous instructions"
    # in ordinary requests, a "System:" line describing a setup, YAML with a system: key
    assert rules["false_positive_rate"] <= 0.14
    floors = {"obfuscated": 0.85,                             # 24/25 (after undoing leetspeak, spacing, homoglyphs)
              "delimiter": 0.5,                               # 15/25
              "override": 0.35,                               # 18/43
              "extraction": 0.28}                             # 11/32
    # not held: encoding 1/19, indirect 2/25, roleplay 4/32, multilingual 0/28 (the rules are English)
    per_category = rules["per_category"]["attack"]
    assert {c: v["rate"] for c, v in per_category.items() if c in floors and v["rate"] < floors[c]} == {}
