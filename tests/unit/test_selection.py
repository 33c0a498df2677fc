"""`auto` model rules: prompt length, code, tier, complexity; first match wins."""

from __future__ import annotations

from services.gateway.selection import AutoRule, complexity, has_code, select_model

RULES = (AutoRule("big", has_code=True), AutoRule("big", min_prompt_chars=500), AutoRule("big", tiers=("pro",)),
         AutoRule("mid", min_complexity=0.3))


def test_code_is_recognised_and_prose_is_not():
    assert has_code("```python\nprint(1)\n```") and has_code("def f(x):\n    return x")
    assert has_code("int main() {\n  return 0;\n}")
    assert not has_code("What is the capital of France?") and not has_code("Tea; or coffee?")


def test_complexity_grows_with_length_code_and_reasoning():
    assert complexity("Hi") < 0.05
    assert complexity("Explain why and prove it step by step, comparing the trade-offs.") >= 0.3
    assert complexity("word " * 400) >= 0.4


def test_first_matching_rule_picks_the_model():
    assert select_model(RULES, "small", "Hi there", "free") == "small"
    assert select_model(RULES, "small", "def f():\n    pass", "free") == "big"
    assert select_model(RULES, "small", "x " * 300, "free") == "big"
    assert select_model(RULES, "small", "Hi there", "pro") == "big"
    assert select_model(RULES, "small", "Explain why, step by step, and compare them.", "free") == "mid"
