"""Every tokenizer Strata builds from a GGUF gives transformers' ids on the same file, over the 1,000
strings of tests/unit/tokenizer_corpus.py, and decodes them back as transformers does: SmolLM2's byte-level
BPE (pre "smollm"), the same vocabulary split as Llama 3 ("llama-bpe") and Qwen2 ("qwen2"), and Gemma 3's
262k SentencePiece vocabulary (byte fallback, merges recovered from token order)."""

from __future__ import annotations

import pytest

from services.inference.models import catalog
from services.inference.models.gguf_file import GGUFFile, default_model_path
from services.inference.models.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.unit.tokenizer_corpus import corpus

transformers = pytest.importorskip("transformers")

CORPUS = corpus()
GEMMA = catalog.models_dir() / "gemma-3-270m-q4_k_m.gguf"


def assert_same_as_transformers(ours: Tokenizer, theirs, texts: list[str]) -> None:
    mismatched = []
    for text in texts:
        ids = ours.encode(text)
        if ids != theirs(text)["input_ids"]:
            mismatched.append(text)
            continue
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        stream = IncrementalDetokenizer(ours)
        assert "".join(stream.push([i]) for i in ids) + stream.flush() == ours.decode(ids), text
    assert not mismatched, f"{len(mismatched)} of {len(texts)} differ, first: {mismatched[:3]!r}"


def test_corpus_is_a_thousand_distinct_strings():
    assert len(set(CORPUS)) == 1000
    assert any("\n\n" in t for t in CORPUS) and any("👨‍👩‍👧" in t for t in CORPUS)


def test_smollm2_byte_level():
    path = default_model_path()
    assert_same_as_transformers(Tokenizer.from_gguf(GGUFFile(path)),
                                transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name),
                                CORPUS)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_byte_level_with_other_splits(tokenizers, pre):
    ours, theirs = tokenizers[pre]
    assert_same_as_transformers(ours, theirs, CORPUS)


def test_gemma3_sentencepiece():
    if not GEMMA.is_file():
        pytest.fail(f"{GEMMA} missing: `make install` assembles it")
    ours = Tokenizer.from_gguf(GGUFFile(GEMMA))
    theirs = transformers.AutoTokenizer.from_pretrained(str(GEMMA.parent), gguf_file=GEMMA.name)
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos_token, ours.vocab_size) == (2, 1, True, 262144)
    assert ours.encode("Hi")[0] == 2 and ours.chat_template is None
    assert_same_as_transformers(ours, theirs, CORPUS)
