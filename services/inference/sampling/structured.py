"""Structured output: a request's response format compiled by xgrammar (vLLM's default grammar engine) into a
grammar over this model's vocabulary, and a matcher per request that says, each step, which tokens may come
next (a bitmask the model runner applies to the step's logits, batched over the constrained rows).

Written around xgrammar rather than by hand: JSON Schema, regular expressions and EBNF each need a grammar
compiler and a token-level matcher with rollback, and xgrammar's precomputes most of the per-token work at
compile time (a step's mask costs microseconds for most states).

The vocabulary is given to xgrammar as each token's raw bytes (the GGUF tokenizer's own, byte-level BPE and
SentencePiece alike); special tokens are given as empty, so that no answer can contain `<|im_start|>` as
text, and EOS is the grammar's stop token: the answer ends with it once the format is complete.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, AbstractSet, Protocol, Sequence

import torch

from services.inference.sampling.params import MAX_JSON_WHITESPACE, ResponseFormat

if TYPE_CHECKING:
    import xgrammar


class Vocabulary(Protocol):
    """What the grammar needs of a tokenizer (models/tokenizer.py's Tokenizer has it)."""

    vocab_size: int
    eos_token_id: int
    special_token_ids: AbstractSet[int]

    def token_bytes(self, token_id: int) -> bytes: ...

_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """The grammar engine cannot read the format; the message is its own, without its source location."""


class Grammars:
    """Compiles response formats for one model's vocabulary (thread-safe; xgrammar keeps compiled grammars in
    its own cache, so a repeated schema costs a lookup). Built on the first constrained request: a replica
    that never sees one never loads xgrammar."""

    def __init__(self, tokenizer: Vocabulary, vocab_size: int, max_rollback_tokens: int) -> None:
        self._tokenizer, self.vocab_size, self.max_rollback_tokens = tokenizer, vocab_size, max_rollback_tokens
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tok = self._tokenizer
                special = tok.special_token_ids
                vocab = [b"" if i in special else tok.token_bytes(i) for i in range(tok.vocab_size)]
                info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=[tok.eos_token_id])
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def compile(self, fmt: ResponseFormat) -> xgrammar.CompiledGrammar:
        """The format's grammar; GrammarError with the engine's message when it cannot be compiled."""
        compiler = self._get_compiler()
        try:
            if fmt.kind == "json_object":            # OpenAI's json_object: any object (not any JSON value)
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False,
                                                    max_whitespace_cnt=MAX_JSON_WHITESPACE)
            if fmt.kind == "json_schema":
                return compiler.compile_json_schema(fmt.spec, strict_mode=fmt.strict,
                                                    max_whitespace_cnt=MAX_JSON_WHITESPACE)
            if fmt.kind == "regex":
                return compiler.compile_regex(fmt.spec)
            if fmt.kind == "structural_tag":          # tool calling (services/inference/tools.py)
                return compiler.compile_structural_tag(fmt.spec)
            return compiler.compile_grammar(fmt.spec)
        except Exception as exc:  # noqa: BLE001 - xgrammar's errors (RuntimeError, ValueError, its own) name the spec's fault
            message = _XGR_PREFIX.sub("", str(exc).strip()).split(". The JSON string is:")[0]
            raise GrammarError(f"invalid response_format {fmt.kind}: {message}") from None

    def matcher(self, compiled: xgrammar.CompiledGrammar) -> xgrammar.GrammarMatcher:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled, max_rollback_tokens=self.max_rollback_tokens)


class TokenMasks:
    """A step's token bitmasks for the constrained rows (bit set = allowed), in a buffer kept between steps (the
    rows a step fills are the only ones it reads, so nothing is cleared), filled by xgrammar's batch matcher in
    one C++ call for the rows without proposals."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._batch = None

    def fill(self, entries: Sequence[tuple[int, xgrammar.GrammarMatcher, Sequence[int]]], num_rows: int,
             vocab_size: int) -> torch.Tensor:
        """[num_rows, ceil(V/32)] int32; only the entries' rows are meaningful. Each entry (first row, matcher,
        proposals) fills its request's rows: row first + i is the mask after the first i proposals, which the
        matcher accepts one by one and then rolls back. A proposal the grammar refuses stops there: its row's mask
        excludes it, so verification rejects it, and the rows after it are never used."""
        import xgrammar as xgr

        width = (vocab_size + 31) // 32
        if self._buffer is None or self._buffer.shape[0] < num_rows or self._buffer.shape[1] != width:
            self._buffer = xgr.allocate_token_bitmask(max(num_rows, 64), vocab_size)
            self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        bitmask = self._buffer[:num_rows]
        plain = [(first, m) for first, m, proposals in entries if not proposals]
        if plain:
            self._batch.batch_fill_next_token_bitmask([m for _, m in plain], self._buffer,
                                                      [first for first, _ in plain])
        for first, m, proposals in entries:
            if not proposals:
                continue
            m.fill_next_token_bitmask(bitmask, first)
            taken = 0
            for i, tok in enumerate(proposals):
                if not m.accept_token(tok):
                    break
                taken += 1
                m.fill_next_token_bitmask(bitmask, first + i + 1)
            if taken:
                m.rollback(taken)
        return bitmask


def allowed(bitmask: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int]) -> list[bool]:
    """Whether each row's mask allows its token."""
    return [bool((int(bitmask[r, t >> 5]) >> (t & 31)) & 1) for r, t in zip(rows, token_ids)]


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Sets the logits of tokens the rows' masks exclude to -inf, in place (logits [R, V] float32 on CPU)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=list(rows))
