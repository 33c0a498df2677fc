"""`auto` model rules (prompt length, code, tier, complexity; the first match among able models wins) and
A/B split draws (by weight; sticky per key when asked)."""

from __future__ import annotations

from collections import Counter

from services.common.models_file import AutoRule
from services.gateway.selection import complexity, has_code, select_model, sticky_pick

RULES = (AutoRule("big", "code", has_code=True), AutoRule("big", min_prompt_chars=500), AutoRule("big", tiers=("pro",)),
         AutoRule("mid", "reasoning", min_complexity=0.3))


def test_code_is_recognised_and_prose_is_not():
    assert has_code("```python\nprint(1)\n```") and has_code("def f(x):\n    return x")
    assert has_code("int main() {\n  return 0;\n}")
    assert not has_code("What is the capital of France?") and not has_code("Tea; or coffee?")


def test_complexity_grows_with_length_code_and_reasoning():
    assert complexity("Hi") < 0.05
    assert complexity("Explain why and prove it step by step, comparing the trade-offs.") >= 0.3
    assert complexity("word " * 400) >= 0.4


def test_first_matching_rule_picks_the_model_and_names_the_rule():
    assert select_model(RULES, "small", "Hi there", "free") == ("small", "default")
    assert select_model(RULES, "small", "def f():\n    pass", "free") == ("big", "code")
    assert select_model(RULES, "small", "x " * 300, "free") == ("big", "rule1")      # unnamed: by position
    assert select_model(RULES, "small", "Hi there", "pro") == ("big", "rule2")
    assert select_model(RULES, "small", "Explain why, step by step, and compare them.", "free") == ("mid", "reasoning")


def test_rules_whose_model_cannot_take_the_request_are_passed_over():
    able = lambda m: m != "big"  # noqa: E731 - e.g. a chat request and a completions-only "big"
    assert select_model(RULES, "small", "def f():\n    pass", "free", able) == ("mid", "reasoning")   # code: 0.3
    assert select_model(RULES, "small", "Explain why, step by step, and compare them.", "pro", able) == ("mid", "reasoning")


def test_a_split_draws_by_weight_and_a_sticky_key_always_gets_the_same_model():
    weights = {"a": 0.8, "b": 0.2, "off": 0.0}
    drawn = Counter(sticky_pick(weights, "") for _ in range(4000))
    assert drawn["off"] == 0 and 0.75 < drawn["a"] / 4000 < 0.85
    by_key = Counter(sticky_pick(weights, f"key-{i}") for i in range(4000))
    assert by_key["off"] == 0 and 0.75 < by_key["a"] / 4000 < 0.85
    for i in range(50):
        assert len({sticky_pick(weights, f"key-{i}") for _ in range(5)}) == 1
