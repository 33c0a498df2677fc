"""The GGUF tokenizer matches transformers loading the same GGUF: ids, text, chat prompts, streamed text."""

from __future__ import annotations

from typing import Any

import pytest

from services.inference.models.gguf_file import GGUFFile, default_model_path
from services.inference.models.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "def f(x):\n    if x:\n\t\treturn x * 2\n    return None\n",
    "The number 1234567 and 3.14159, 0x1F, 2024-01-01.",
    "Emoji: 😀👍🏽 🇫🇷 family 👨‍👩‍👧",
    "中文测试，日本語のテキスト、한국어 문장.",
    "Accents: café, naïve, Ærøskøbing, São Paulo, Zürich.",
    "multiple   spaces\n\n\nand\r\nnewlines  \t end  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>",
    "",
]

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is 2+2?"}],
    "system_and_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🐍."},
    ],
}


@pytest.fixture(scope="session")
def gguf() -> GGUFFile:
    return GGUFFile(default_model_path())


@pytest.fixture(scope="session")
def tokenizer(gguf: GGUFFile) -> Tokenizer:
    return Tokenizer.from_gguf(gguf)


@pytest.fixture(scope="session")
def hf_tokenizer() -> Any:
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_metadata_gives_special_ids_and_vocab_size(tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.special_token_ids == frozenset(range(17))
    assert tokenizer.chat_template == hf_tokenizer.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_on_the_same_gguf(tokenizer: Tokenizer, hf_tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    assert ids == hf_tokenizer.encode(text)


def test_special_token_text_encodes_to_its_single_id(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.encode("<|im_start|>user")[0] == 1


def test_encode_adds_no_bos_when_the_gguf_says_not_to(tokenizer: Tokenizer) -> None:
    assert tokenizer.add_bos_token is False
    assert tokenizer.encode("") == []
    assert tokenizer.bos_token_id not in tokenizer.encode("Hello")


@pytest.mark.parametrize("text", TEXTS)
def test_decode_of_encode_returns_the_text(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any, text: str, skip_special_tokens: bool
) -> None:
    ids = tokenizer.encode(text)
    expected = hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) == expected


def test_decode_skips_special_tokens_by_default(tokenizer: Tokenizer) -> None:
    assert tokenizer.decode(tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>")) == "assistant\nHi"


def test_token_bytes_are_raw_bytes_and_special_tokens_their_text(tokenizer: Tokenizer) -> None:
    assert tokenizer.token_bytes(tokenizer.encode(" world")[0]) == b" world"
    assert tokenizer.token_bytes(1) == b"<|im_start|>"
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8") == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_inserts_the_default_system_prompt(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.apply_chat_template(CONVERSATIONS["user_only"])
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text", [TEXTS[3], TEXTS[4], TEXTS[5], "<|im_start|>🤖 说<|im_end|>"])
def test_streaming_token_by_token_never_emits_a_partial_character(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids)


def test_streaming_keeps_special_tokens_when_asked(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>")
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=False)


def test_streaming_holds_back_the_bytes_of_an_unfinished_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀")  # four utf-8 bytes, split over byte-level tokens
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[:1]) == ""
    assert detok.text == ""
    assert detok.push(ids[1:]) == "😀"
    assert detok.flush() == ""


def test_flush_replaces_a_character_that_never_finished(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a😀")
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[:-1]) == "a"
    assert detok.flush() == "\ufffd"
    assert detok.text == "a\ufffd"
