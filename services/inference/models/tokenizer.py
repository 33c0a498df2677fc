"""The tokenizer, chat template and incremental detokenizer of a GGUF model, from its metadata alone.

The tokenizer is built the way transformers builds one from the same GGUF (`AutoTokenizer.from_pretrained(
dir, gguf_file=name)`), so ids match it exactly: a byte-level BPE over the file's tokens and merges, GPT-2's
`ByteLevel` decoder, the split `tokenizer.ggml.pre` names (GPT-2's `ByteLevel` split unless Llama 3's or
Qwen2's: PRE_TOKENIZER_SPLITS), no normalizer, the CONTROL tokens as special added tokens and the
USER_DEFINED ones as plain added tokens. SentencePiece vocabularies (`tokenizer.ggml.model` "llama": Gemma,
Llama 2, Mistral) become the BPE with byte fallback transformers builds for them: merges recovered from the
vocabulary (ranked by token order for Gemma, whose scores do not follow its merges; by score for the rest),
spaces spelled "▁" (Gemma: every space by a normalizer; others: Metaspace, which also prefixes the first
word). The chat template renders in the same sandboxed jinja environment.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from services.inference.models.gguf_file import GGUFFile

# How a byte-level vocabulary cuts text into words before its merges, by `tokenizer.ggml.pre` (llama.cpp's
# names, as transformers maps them when it builds a tokenizer from a GGUF). Other names, and "smollm", "gpt2"
# or "default", keep GPT-2's own split. They differ on digits (Llama 3: runs of up to 3; Qwen2: one by one;
# GPT-2: whole runs), on apostrophes in upper case and on a leading non-letter before a word.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}

# architectures whose SentencePiece vocabulary transformers reads with GemmaTokenizer
GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE spells every token with it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


_BYTE_TO_CHAR = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_TO_CHAR.values())
# str.translate table: each alphabet character -> the latin-1 character of the byte it spells
_CHAR_TO_LATIN1 = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}


def _spelled_bytes(token: str) -> bytes:
    """The raw bytes of a token as the GGUF spells it: alphabet tokens unmapped, any other as utf-8 text."""
    if set(token) <= _BYTE_ALPHABET:
        return token.translate(_CHAR_TO_LATIN1).encode("latin-1")
    return token.encode("utf-8")


def _spm_bytes(token: str) -> bytes:
    """The raw bytes of a SentencePiece token: "<0xNN>" is that byte, "▁" a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("▁", " ").encode("utf-8")


def _optional_id(gguf: GGUFFile, key: str) -> int | None:
    value = gguf.field(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


def _build_backend(
    tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], named_ids: Sequence[int],
    pre: str | None = None,
) -> BackendTokenizer:
    """The byte-level BPE transformers builds from a "gpt2" GGUF (GPT2Tokenizer + add_gguf_special_tokens),
    splitting text as `pre` (tokenizer.ggml.pre) names: PRE_TOKENIZER_SPLITS."""
    # tokens outside the byte alphabet are respelled through it; on a clash the later id wins, as in a dict
    vocab = {
        t if set(t) <= _BYTE_ALPHABET else "".join(_BYTE_TO_CHAR[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = BackendTokenizer(
        BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return _add_gguf_tokens(backend, tokens, token_types, named_ids, byte_level=True)


def _add_gguf_tokens(backend: BackendTokenizer, tokens: Sequence[str], token_types: Sequence[int],
                     named_ids: Sequence[int], byte_level: bool) -> BackendTokenizer:
    """transformers' add_gguf_special_tokens: CONTROL tokens become special added tokens (in a byte-level
    vocabulary one using characters outside its alphabet is a llama.cpp mislabel, skipped), USER_DEFINED ones
    plain added tokens; then bos/eos/unk/pad that are not added yet become special (TokenizersBackend)."""
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, token_types)
        if kind == _TOKEN_TYPE_CONTROL and (not byte_level or set(t) <= _BYTE_ALPHABET)
    ]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user_defined = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, token_types)
        if kind == _TOKEN_TYPE_USER_DEFINED and t in vocab
    ]
    backend.add_tokens(user_defined)
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [AddedToken(tokens[i], special=True) for i in named_ids if tokens[i] not in added]
    backend.add_special_tokens(missing)
    return backend


def spm_merges(tokens: Sequence[str], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies (transformers' generate_merges, same order): every
    split of a token into two tokens, best `scores` first, then the longer left piece, then the longer right
    one; equal keys keep token order."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merge, score in scores.items():
        local = [(merge[:i], merge[i:], score) for i in range(1, len(merge))
                 if merge[:i] in vocab and merge[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _build_spm_backend(tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int],
                       named_ids: Sequence[int], unk: str | None, gemma: bool) -> BackendTokenizer:
    """The byte-fallback BPE transformers builds from a SentencePiece GGUF: GemmaTokenizer for the gemma
    architectures (whose files spell a token of several spaces with real spaces: respelled "▁"), else
    LlamaTokenizer; then add_gguf_special_tokens."""
    spelled = tokens
    if gemma:
        spelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = {t: -i for i, t in enumerate(spelled)}
    else:
        ranks = dict(zip(tokens, scores))
    vocab = {t: i for i, t in enumerate(spelled)}
    backend = BackendTokenizer(BPE(vocab=vocab, merges=spm_merges(spelled, ranks), dropout=None, fuse_unk=True,
                                   byte_fallback=True, unk_token=unk if gemma else None))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    # as the file spells them: a USER_DEFINED run of spaces is then not in the vocabulary, and not added
    return _add_gguf_tokens(backend, tokens, token_types, named_ids, byte_level=False)


def _compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it (sandboxed, trimmed blocks, its globals)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # unlike jinja's own filter: no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """A GGUF model's tokenizer: text <-> ids, raw token bytes, and its chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        tokens: Sequence[str],
        special_token_ids: frozenset[int],
        bos_token_id: int | None,
        eos_token_id: int,
        pad_token_id: int | None,
        unk_token_id: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        byte_level: bool = True,
    ) -> None:
        self._backend = backend
        self._tokens = list(tokens)
        spelled = _spelled_bytes if byte_level else _spm_bytes
        self._token_bytes = [
            t.encode("utf-8") if i in special_token_ids else spelled(t) for i, t in enumerate(self._tokens)
        ]
        self.vocab_size = len(self._tokens)
        self.special_token_ids = special_token_ids
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        model = gguf.field("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r}; implemented: byte-level BPE ('gpt2') "
                             "and SentencePiece BPE ('llama')")
        tokens = [str(t) for t in gguf.field("tokenizer.ggml.tokens")]
        token_types = [int(k) for k in gguf.field("tokenizer.ggml.token_type", [])]
        bos, eos = _optional_id(gguf, "bos_token_id"), _optional_id(gguf, "eos_token_id")
        unk, pad = _optional_id(gguf, "unknown_token_id"), _optional_id(gguf, "padding_token_id")
        if eos is None:
            raise ValueError("GGUF has no tokenizer.ggml.eos_token_id")
        named = [i for i in (bos, eos, unk, pad) if i is not None]
        if model == "gpt2":
            backend = _build_backend(tokens, gguf.field("tokenizer.ggml.merges", []), token_types, named,
                                     pre=gguf.field("tokenizer.ggml.pre"))
        else:
            backend = _build_spm_backend(tokens, [float(x) for x in gguf.field("tokenizer.ggml.scores", [])],
                                         token_types, named, None if unk is None else tokens[unk],
                                         gemma=gguf.architecture in GEMMA_ARCHITECTURES)
        special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        return cls(
            backend, tokens, special, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, unk_token_id=unk,
            # a SentencePiece file that does not say gets BOS, as llama.cpp and transformers add it
            add_bos_token=bool(gguf.field("tokenizer.ggml.add_bos_token", model == "llama")),
            add_eos_token=bool(gguf.field("tokenizer.ggml.add_eos_token", False)),
            chat_template=gguf.field("tokenizer.chat_template"),
            byte_level=model == "gpt2",
        )

    # text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text maps to its id; BOS/EOS only where the GGUF asks for them
        (and `add_special_tokens`: False gives the text's own tokens, to append to others)."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if not add_special_tokens:
            return ids
        if self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if self.add_eos_token:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for; a special token's are its text in utf-8."""
        return self._token_bytes[token_id]

    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (byte-level alphabet, e.g. 'Ġhello')."""
        return self._tokens[token_id]

    # chat

    def _named_token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tokens[token_id]

    @cached_property
    def _compiled_chat_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError("this GGUF has no tokenizer.chat_template")
        return _compile_chat_template(self.chat_template)

    @property
    def template_renders_tools(self) -> bool:
        """Whether the chat template has a tools section (it reads `tools`), as transformers decides it."""
        return self.chat_template is not None and "tools" in self.chat_template

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation, rendered with the variables transformers passes (`tools` in
        OpenAI's shape, for a template with a tools section)."""
        named = {
            "bos_token": self._named_token(self.bos_token_id),
            "eos_token": self._named_token(self.eos_token_id),
            "unk_token": self._named_token(self.unk_token_id),
            "pad_token": self._named_token(self.pad_token_id),
        }
        return self._compiled_chat_template.render(
            messages=[dict(m) for m in messages],
            tools=list(tools) if tools else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in named.items() if v is not None},
        )


class IncrementalDetokenizer:
    """Turns a growing stream of token ids into text deltas, never splitting a UTF-8 character.

    Each push costs O(new tokens): the token bytes go through an incremental UTF-8 decoder, which holds back
    the bytes of a character that is not complete yet and replaces invalid bytes as soon as they are known.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []

    def push(self, token_ids: Sequence[int]) -> str:
        """The text the new tokens complete (may be empty while a character is still partial)."""
        data = b"".join(self._tokenizer.token_bytes(i) for i in token_ids if i not in self._skip_ids)
        return self._emit(self._decoder.decode(data))

    def flush(self) -> str:
        """Whatever is held back, with U+FFFD for an unfinished character."""
        return self._emit(self._decoder.decode(b"", final=True))

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta
