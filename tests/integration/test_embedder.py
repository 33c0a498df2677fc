"""Our MiniLM encoder against HF transformers' BertModel on the same files (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_embeddings_match_hf_transformers(embedder):
    transformers = pytest.importorskip("transformers")
    from services.embedding.embedder import default_model_dir

    texts = ["How do I learn Python?", "What is the best way to learn python programming quickly?",
             "Ünïcödé and emoji 🙂 survive", "a", "word " * 400]          # the last is truncated to 256 tokens
    ours = embedder.embed(texts)
    path = str(default_model_dir())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert ours.shape == (5, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batching_and_order_do_not_change_embeddings(embedder):
    texts = [f"question {i} about {'long ' * (i % 7)}things" for i in range(20)]
    together = embedder.embed(texts, batch_size=8)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    assert embedder.num_tokens("word " * 400) > embedder.max_seq_len


def test_fits_agrees_with_the_tokenizer_around_the_window(embedder):
    texts = ["short question?", "word " * 60, "word " * 250, "word " * 260, "한국어 문장 " * 40, "한" * 90,
             "é" * 120, "x" * 300]
    for text in texts:
        assert embedder.fits(text) == (embedder.num_tokens(text) <= embedder.max_seq_len), text[:20]
