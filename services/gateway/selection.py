"""`auto` model selection and answer cascades, no grpc.

Rules are checked in order; the first whose conditions all hold picks the model, else the default.
A rule may ask for a minimum prompt length, code in the prompt, one of the key's tiers, or a minimum
complexity score (a cheap 0..1 estimate from length, code and reasoning cues). A cascade re-asks a
larger model when the first answer's mean token log-probability is below a threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_CODE = re.compile(r"```|^\s*(def|class|import|from|fn|func|public|#include)\b|[;{}]\s*$|\w+\([^)]*\)\s*[{:]",
                   re.M)
_REASONING = re.compile(r"\b(why|explain|prove|derive|compare|analy[sz]e|step by step|trade-?offs?|design)\b", re.I)


def has_code(text: str) -> bool:
    return bool(_CODE.search(text))


def complexity(text: str) -> float:
    words = len(text.split())
    cues = len(_REASONING.findall(text))
    return round(0.4 * min(1.0, words / 200) + 0.3 * has_code(text) + 0.3 * min(1.0, cues / 3), 4)


@dataclass(frozen=True, slots=True)
class AutoRule:
    model: str
    min_prompt_chars: int = 0
    has_code: bool | None = None          # None: either
    tiers: tuple[str, ...] = ()           # empty: any tier
    min_complexity: float = 0.0

    def matches(self, text: str, tier: str) -> bool:
        return (len(text) >= self.min_prompt_chars
                and (self.has_code is None or has_code(text) == self.has_code)
                and (not self.tiers or tier in self.tiers)
                and complexity(text) >= self.min_complexity)


def select_model(rules: Sequence[AutoRule], default: str, text: str, tier: str) -> str:
    return next((r.model for r in rules if r.matches(text, tier)), default)


@dataclass(frozen=True, slots=True)
class Cascade:
    to: str                               # the larger model to re-ask
    min_mean_logprob: float = -1.0        # answers below this are re-asked
