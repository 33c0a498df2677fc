"""`auto` model selection and A/B split draws, no grpc (the rules' data: services.common.models_file).

Rules are checked in order; the first whose conditions all hold picks the model, else the default.
A rule may ask for a minimum prompt length, code in the prompt, one of the key's tiers, or a minimum
complexity score (a cheap 0..1 estimate from length, code and reasoning cues). A split draws a model by
weight, at random or stably per key or conversation (a hash of the sticky key places it on the weights).
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Callable, Mapping, Sequence

from services.common.models_file import AutoRule

_CODE = re.compile(r"```|^\s*(def|class|import|from|fn|func|public|#include)\b|[;{}]\s*$|\w+\([^)]*\)\s*[{:]",
                   re.M)
_REASONING = re.compile(r"\b(why|explain|prove|derive|compare|analy[sz]e|step by step|trade-?offs?|design)\b", re.I)


def has_code(text: str) -> bool:
    return bool(_CODE.search(text))


def complexity(text: str) -> float:
    words = len(text.split())
    cues = len(_REASONING.findall(text))
    return round(0.4 * min(1.0, words / 200) + 0.3 * has_code(text) + 0.3 * min(1.0, cues / 3), 4)


def matches(rule: AutoRule, text: str, tier: str) -> bool:
    return (len(text) >= rule.min_prompt_chars
            and (rule.has_code is None or has_code(text) == rule.has_code)
            and (not rule.tiers or tier in rule.tiers)
            and complexity(text) >= rule.min_complexity)


def select_model(rules: Sequence[AutoRule], default: str, text: str, tier: str,
                 able: Callable[[str], bool] = lambda model: True) -> tuple[str, str]:
    """(the model, the rule's name or "default"): the first rule that matches and whose model is `able`."""
    for i, r in enumerate(rules):
        if able(r.model) and matches(r, text, tier):
            return r.model, r.name or f"rule{i}"
    return default, "default"


def sticky_pick(weights: Mapping[str, float], sticky_key: str) -> str:
    """One model of a split by weight: random, or the same for every request with this (non-empty) key."""
    models = [m for m in weights if weights[m] > 0]
    if not sticky_key:
        return random.choices(models, weights=[weights[m] for m in models])[0]
    digest = hashlib.blake2b(sticky_key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2 ** 64 * sum(weights[m] for m in models)
    for m in models:
        point -= weights[m]
        if point < 0:
            return m
    return models[-1]
