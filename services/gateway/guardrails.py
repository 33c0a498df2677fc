"""Guardrails applied by the gateway before a prompt reaches the cache, the router, Redis or a log.

`redact(text)` replaces personal data with typed placeholders and counts what it found:
  [EMAIL]        addresses
  [CARD]         13-19 digit card numbers that pass the Luhn check (spaces/dashes allowed)
  [IBAN]         IBANs whose mod-97 check holds (spaces allowed)
  [NATIONAL_ID]  US social security numbers (valid areas) and UK national insurance numbers
  [PHONE]        international (+country) or separated national numbers of 9-15 digits
Checksums keep ordinary numbers (order ids, amounts, years) intact.

`screen_injection(text)` matches known prompt-injection phrasings with rules and returns the rules
that fired; `InjectionSimilarity` is the other half: the cosine of a prompt's MiniLM embedding to the
nearest of `data/injection_phrasings.txt` (threshold chosen by `calibrate_injection.py`).
No grpc, no Redis.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

PHRASINGS = Path(__file__).with_name("data") / "injection_phrasings.txt"

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_UK_NINO = re.compile(r"\b(?![DFIQUV])[A-CEGHJ-PR-TW-Z](?![DFIQUVO])[A-CEGHJ-PR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
# not part of a longer run of digit groups (a card or account number that failed its checksum)
_PHONE = re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .-]?\d){6,13}"
                    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
                    r"|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4})(?![\w-])(?![ .-]?\d)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


@dataclass(frozen=True, slots=True)
class Redaction:
    text: str
    found: Counter = field(default_factory=Counter)   # kind -> count

    @property
    def any(self) -> bool:
        return bool(self.found)


def redact(text: str) -> Redaction:
    found: Counter = Counter()

    def sub(pattern: re.Pattern, kind: str, text: str, check=None) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            found[kind] += 1
            return f"[{kind}]"
        return pattern.sub(repl, text)

    text = sub(_EMAIL, "EMAIL", text)
    text = sub(_IBAN, "IBAN", text, iban_ok)
    text = sub(_CARD, "CARD", text, lambda s: luhn_ok(re.sub(r"\D", "", s)))
    text = sub(_SSN, "NATIONAL_ID", text)
    text = sub(_UK_NINO, "NATIONAL_ID", text)
    text = sub(_PHONE, "PHONE", text, lambda s: 9 <= len(re.sub(r"\D", "", s)) <= 15)
    return Redaction(text, found)


_INJECTION_RULES: dict[str, re.Pattern] = {
    "ignore_instructions": re.compile(
        r"\b(ignore|disregard|forget|override|bypass)\b.{0,40}\b(previous|prior|above|earlier|all|your|the|any)\b"
        r".{0,30}\b(instructions?|prompts?|rules|directives|guidelines|system message)\b", re.I | re.S),
    "reveal_system_prompt": re.compile(
        r"\b(reveal|show|print|repeat|output|tell me|leak|display)\b.{0,40}\b(system prompt|initial prompt|hidden "
        r"(prompt|instructions)|your (instructions|rules|prompt))\b", re.I | re.S),
    "role_override": re.compile(
        r"\b(you are now|from now on,? you (are|will)|act as|pretend (to be|you are))\b.{0,60}\b(DAN|jailbr(oken|eak)"
        r"|developer mode|unfiltered|uncensored|without (any )?(restrictions|limits|filters|rules))", re.I | re.S),
    "jailbreak_keyword": re.compile(r"\b(jailbreak|do anything now|DAN mode|developer mode enabled)\b", re.I),
    "fake_system_turn": re.compile(r"(^|\n)\s*(system|assistant)\s*:\s*|<\|im_start\|>|\[/?INST\]|<<SYS>>", re.I),
}


@dataclass(frozen=True, slots=True)
class InjectionScreen:
    rules: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return bool(self.rules)


def screen_injection(text: str) -> InjectionScreen:
    return InjectionScreen(tuple(name for name, rule in _INJECTION_RULES.items() if rule.search(text)))


def load_phrasings(path: Path = PHRASINGS) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


class InjectionSimilarity:
    """Nearest known attack phrasing by embedding cosine. `embed_one` is awaited (the gateway passes a
    micro-batcher so embeddings run off the event loop); the phrasings are embedded once, up front.
    Scores of the last `memo_size` distinct texts are kept by digest (never the text): a repeated prompt,
    the common case behind an exact cache hit, costs no embedding."""

    def __init__(self, embed_many: Callable[[list[str]], np.ndarray], embed_one: Callable[[str], Awaitable[np.ndarray]],
                 threshold: float, phrasings: list[str] | None = None, memo_size: int = 50_000) -> None:
        self.phrasings = phrasings if phrasings is not None else load_phrasings()
        self._known = embed_many(self.phrasings)
        self._embed_one = embed_one
        self.threshold = threshold
        self._memo: OrderedDict[bytes, float] = OrderedDict()
        self._memo_size = memo_size
        self.embedded = 0          # texts that needed an embedding (the rest came from the memo)

    async def score(self, text: str) -> float:
        if not text.strip():
            return 0.0
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        known = self._memo.get(digest)
        if known is not None:
            self._memo.move_to_end(digest)
            return known
        score = float((self._known @ await self._embed_one(text)).max())
        self.embedded += 1
        self._memo[digest] = score
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return score
