"""Guardrails applied by the gateway before a prompt reaches the cache, the router, Redis or a log.

`redact(text)` replaces personal data with typed placeholders and counts what it found:
  [EMAIL]        addresses
  [CARD]         13-19 digit card numbers that pass the Luhn check (spaces/dashes allowed)
  [IBAN]         IBANs whose mod-97 check holds (spaces allowed)
  [IP_ADDRESS]   public IPv4 and IPv6 addresses (private, loopback, documentation ranges and IPv4
                 network/broadcast addresses ending in .0/.255 are kept: they identify no one)
  [NATIONAL_ID]  US social security numbers (valid areas; dashes or spaces) and UK national insurance numbers
  [PHONE]        international (+country) or separated national numbers of 9-15 digits (NANP with or
                 without a leading 1, numbers with a trunk 0 such as 07700 900123, 01 42 68 53 00, 030/1234567)
Checksums keep ordinary numbers (order ids, amounts, years) intact. Addresses written as name[at]host[dot]com
count as emails; `git@host:repo` remotes do not. Rates on labelled corpora: `tools/guardrails_eval.py`.

`screen_injection(text)` matches known prompt-injection phrasings with rules and returns the rules
that fired; the rules also read the text with obfuscation undone (NFKC, zero-width characters, Cyrillic
look-alikes, l e t t e r-by-letter spacing, dis-connected words, leetspeak). `InjectionSimilarity` is
the other half: the cosine of a prompt's MiniLM embedding to the nearest of `data/injection_phrasings.txt`
(threshold chosen by `tools/calibrate_injection.py`).
No grpc, no Redis.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

PHRASINGS = Path(__file__).with_name("data") / "injection_phrasings.txt"

# an scp-style remote (git@github.com:org/repo) is a host, not a mailbox
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b"
                    r"(?!:[\w~/])")
_DOT = r"(?:\s?[\[(]dot[\])]\s?|\.)"
_EMAIL_BRACKETED = re.compile(rf"(?<![\w.+-])[A-Za-z0-9._%+-]{{1,64}}\s?[\[(]at[\])]\s?[A-Za-z0-9-]+(?:{_DOT}[A-Za-z0-9-]+)*"
                              rf"{_DOT}[A-Za-z]{{2,24}}\b", re.I)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?=[0-9A-Fa-f:]*\d)(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(?<!\d )(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])(?! \d)")
_UK_NINO = re.compile(r"\b(?![DFIQUV])[A-CEGHJ-PR-TW-Z](?![DFIQUVO])[A-CEGHJ-PR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
# not part of a longer run of digit groups (a card or account number that failed its checksum); letters
# around are ASCII ones, so a number inside Chinese or Japanese text (no spaces) is still found
_PHONE = re.compile(r"(?<![A-Za-z0-9_+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .-]?\d){6,13}"
                    r"|1[ .-]?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"      # NANP with its leading 1
                    r"|\(\d{2,4}\)[ .-]?\d{3,5}[ .-]?\d{3,4}"
                    r"|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}"
                    # national with a trunk 0, one kind of separator (01.02.2024 14:30 is a date)
                    r"|0[1-9]\d{0,4}(?:/\d{3,8}|([ .-])\d{2,8}(?:\1\d{2,8}){0,3}))"
                    r"(?![A-Za-z0-9_-])(?![ .-]?\d)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def ip_public(address: str) -> bool:
    """A global unicast address; for IPv4 not a /24 network or broadcast address (1.0.0.0 is more often a version)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_global and (ip.version == 6 or ip.packed[-1] not in (0, 255))


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
    text = sub(_EMAIL_BRACKETED, "EMAIL", text)
    text = sub(_IPV4, "IP_ADDRESS", text, ip_public)
    text = sub(_IPV6, "IP_ADDRESS", text, ip_public)
    text = sub(_IBAN, "IBAN", text, iban_ok)
    text = sub(_CARD, "CARD", text, lambda s: luhn_ok(re.sub(r"\D", "", s)))
    text = sub(_SSN, "NATIONAL_ID", text)
    text = sub(_UK_NINO, "NATIONAL_ID", text)
    text = sub(_PHONE, "PHONE", text, lambda s: 9 <= len(re.sub(r"\D", "", s)) <= 15)
    return Redaction(text, found)


_INJECTION_RULES: dict[str, re.Pattern] = {
    "ignore_instructions": re.compile(
        r"\b(ignore|disregard|forget|override|bypass|skip|drop|discard|cancel|abandon|set aside|throw out"
        r"|pay no attention to|never ?mind)\b.{0,40}\b(previous|prior|above|earlier|all|your|the|any|every)\b"
        r".{0,30}\b(instructions?|prompts?|rules?|directives?|directions|guidelines|guidance|polic(y|ies)|constraints"
        r"|restrictions|commands|orders|programming|guardrails|system message)\b", re.I | re.S),
    "reveal_system_prompt": re.compile(
        r"\b(reveal|show|print|repeat|output|tell me|leak|display|paste|dump|echo|copy|quote|spell out|give me|send"
        r"|translate|encode|write out)\b.{0,40}\b(system (prompt|message|instructions)|developer message|(initial"
        r"|original|hidden|secret|confidential) (prompt|instructions|rules|preamble|text|message)|prompt template"
        r"|configuration prompt|your (instructions|rules|prompt|configuration|setup instructions|guidelines|preamble"
        r"|context window))\b", re.I | re.S),
    "role_override": re.compile(
        r"\b(you are now|you're now|from now on,? you (are|will)|act as|pretend (to be|you are|you're)|role-?play as"
        r"|play (the )?(role|character|part) of|take on the persona|simulate|become|behave as)\b.{0,60}\b(DAN"
        r"|jailbr(oken|eak)|developer mode|unfiltered|uncensored|unrestricted|unaligned|no (ethical |moral )?"
        r"(restrictions|limits|filters|rules|guidelines)|without (any )?(restrictions|limits|filters|rules|guidelines))",
        re.I | re.S),
    "jailbreak_keyword": re.compile(r"\b(jailbreak|do anything now|DAN mode|developer mode enabled)\b", re.I),
    "fake_system_turn": re.compile(
        r"(^|\n)\s*(system|assistant)\s*:\s*|<\|(im_start|im_end|endoftext|system)\|>|\[/?INST\]|<<SYS>>"
        r"|</?(system|assistant)>|\[(SYSTEM|ADMIN)\]|<(start|end)_of_turn>|#{2,}\s*(new\s+)?system\s+prompt", re.I),
}

# obfuscation undone before the rules run (the rules see both the text and this form of it)
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_HOMOGLYPHS = str.maketrans("аеіјорсуѕхԁАВЕІЈКМНОРСТУХ", "aeijopcysxdABEIJKMHOPCTYX")   # Cyrillic look-alikes
_LETTER_BY_LETTER = re.compile(r"(?<!\w)\w(?P<sep>[ .\-*/])\w(?:(?P=sep)\w)+(?!\w)")      # i g n o r e, r.u.l.e.s
_INNER_MARK = re.compile(r"(?<=[A-Za-z])[-_](?=[A-Za-z])")                                  # dis-regard, ignore_all
_LEET_WORD = re.compile(r"(?<![\w@$])(?=[\w@$]*[A-Za-z])(?=[\w@$]*[0-9@$])[\w@$]+")        # 1gn0r3, pr0mpt
_LEET = str.maketrans("013457@$", "oieastas")
_SPACE_RUNS = re.compile(r"[ \t]{2,}")


def normalise_for_screen(text: str) -> str:
    """`text` with common obfuscation undone; only the rules read it (never forwarded, never embedded)."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_HOMOGLYPHS)
    text = _LETTER_BY_LETTER.sub(lambda m: m.group(0).replace(m.group("sep"), ""), text)
    text = _INNER_MARK.sub(lambda m: " " if m.group(0) == "_" else "", text)
    text = _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), text)
    return _SPACE_RUNS.sub(" ", text)


@dataclass(frozen=True, slots=True)
class InjectionScreen:
    rules: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return bool(self.rules)


def screen_injection(text: str) -> InjectionScreen:
    plain = normalise_for_screen(text)
    return InjectionScreen(tuple(name for name, rule in _INJECTION_RULES.items()
                                 if rule.search(text) or (plain != text and rule.search(plain))))


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
