"""What makes two requests the same: normalization, the exact key and the semantic partition.

A request is split in two: its *question* (the last user message, or the raw prompt) and its
*context* (the model, every earlier message including the system prompt, and the sampling
parameters that change the answer). The semantic layer compares questions only among entries with
the same context (the same partition): a paraphrase under another system prompt, another
conversation history, another max_tokens or another seed is never a hit. The exact key is the
partition plus the normalized question.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

from services.common.errors import InvalidArgumentError

NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# no ':' in an id: Redis keys are `e:{ns}:{id}`, and "fuzz" + "victim:abc" would name namespace "fuzz:victim"'s "abc"
ENTRY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SPACE = re.compile(r"\s+")
ROLES = ("system", "user", "assistant")

# the sampling fields that change the answer, with their defaults (an unset field equals its default)
ANSWER_FIELDS: dict[str, Any] = {
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": None, "max_tokens": None, "min_tokens": 0,
    "stop": (), "stop_token_ids": (), "ignore_eos": False, "logprobs": None,
    "response_format": None,   # structured output: {"type", "spec", "strict"}; a JSON request never gets free text
}


def normalize_text(text: str) -> str:
    """NFC, whitespace collapsed and trimmed. Case and punctuation are kept: they can change an answer."""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def validate_namespace(namespace: str) -> str:
    if not NAMESPACE_RE.fullmatch(namespace or ""):
        raise InvalidArgumentError("namespace must be 1-64 characters of letters, digits and _ . : -")
    return namespace


def validate_entry_id(entry_id: str) -> str:
    if not ENTRY_ID_RE.fullmatch(entry_id or ""):
        raise InvalidArgumentError("entry_id must be 1-64 characters of letters, digits and _ -")
    return entry_id


@dataclass(frozen=True, slots=True)
class CacheKey:
    namespace: str
    model: str
    question: str             # normalized; what is embedded
    partition: str            # hex digest of model + context + answer-changing sampling fields
    exact: str                # hex digest of partition + question
    temperature: float

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0.0


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def make_key(namespace: str, model: str, prompt: str | None, messages: Sequence[tuple[str, str]] | None,
             sampling: dict[str, Any], max_question_chars: int) -> CacheKey:
    """Validate and key one request. `messages` as (role, content); exactly one of prompt/messages."""
    validate_namespace(namespace)
    if not model:
        raise InvalidArgumentError("model is required")
    if len(model) > 256:
        raise InvalidArgumentError("model name is longer than 256 characters")
    if messages:
        for role, _ in messages:
            if role not in ROLES:
                raise InvalidArgumentError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        norm = [(role, normalize_text(content)) for role, content in messages]
        if norm[-1][0] != "user":
            raise InvalidArgumentError("the last message must be the user's question")
        question, context = norm[-1][1], ["chat", *norm[:-1]]
    elif prompt is not None:
        question, context = normalize_text(prompt), ["raw"]
    else:
        raise InvalidArgumentError("prompt or messages is required")
    if not question:
        raise InvalidArgumentError("the question (prompt or last user message) is empty")
    if len(question) > max_question_chars or sum(len(c) for _, c in (messages or [])) > 8 * max_question_chars:
        raise InvalidArgumentError(f"text is longer than the cache accepts ({max_question_chars} characters per question)")
    fields = {k: sampling.get(k, default) for k, default in ANSWER_FIELDS.items()}
    fields["stop"] = sorted(fields["stop"] or ())
    fields["stop_token_ids"] = sorted(fields["stop_token_ids"] or ())
    temperature = float(fields["temperature"] if fields["temperature"] is not None else 1.0)
    if temperature < 0 or temperature != temperature:
        raise InvalidArgumentError("temperature must be >= 0")
    if temperature == 0.0:   # greedy: the sampling knobs and the seed do not change the answer
        for k in ("top_k", "top_p", "min_p", "seed"):
            fields[k] = ANSWER_FIELDS[k]
    partition = _digest({"model": model, "context": context, "sampling": fields})
    return CacheKey(namespace, model, question, partition, _digest([partition, question]), temperature)
