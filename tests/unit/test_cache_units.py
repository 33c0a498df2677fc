"""Cache building blocks without Redis: keys and partitions, the in-memory index, the hit decision, the batcher."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.cache.decision import FEATURE_NAMES, HitDecider, HitModel, pair_features
from services.cache.index import GROW_CHUNK_ROWS, NamespaceIndex
from services.cache.keys import make_key, normalize_text
from services.common.errors import InvalidArgumentError


def key(prompt=None, messages=None, **sampling):
    sampling.setdefault("temperature", 0.0)
    return make_key("ns", "m", prompt, messages, sampling, 1000)


def test_normalization_keeps_case_and_punctuation_but_not_spacing():
    assert normalize_text("  Hello\t\n world?  ") == "Hello world?"
    assert normalize_text("Cafe\u0301") == "Café"   # NFC
    assert key("Hello  world").exact == key(" Hello world ").exact
    assert key("Hello world").exact != key("hello world").exact


def test_greedy_keys_ignore_sampling_knobs_that_cannot_change_the_answer():
    assert key("q", seed=1, top_p=0.5).exact == key("q").exact
    assert key("q", temperature=0.7, seed=1).exact != key("q", temperature=0.7, seed=2).exact
    assert key("q", max_tokens=5).partition != key("q").partition
    assert key("q", stop=["b", "a"]).exact == key("q", stop=["a", "b"]).exact


def test_context_is_the_partition_and_the_last_user_message_the_question():
    k1 = key(messages=[("system", "Be brief."), ("user", "Why is the sky blue?")])
    k2 = key(messages=[("system", "Be verbose."), ("user", "Why is the sky blue?")])
    k3 = key(prompt="Why is the sky blue?")
    assert k1.question == k2.question == k3.question == "Why is the sky blue?"
    assert len({k1.partition, k2.partition, k3.partition}) == 3


@pytest.mark.parametrize("kwargs", [
    {"prompt": ""}, {"prompt": None}, {"messages": [("user", "   ")]}, {"messages": [("tool", "x")]},
    {"messages": [("user", "q"), ("assistant", "a")]}, {"prompt": "x" * 1001}, {"prompt": "q", "temperature": -1.0},
])
def test_bad_keys_raise_invalid_argument(kwargs):
    with pytest.raises(InvalidArgumentError):
        key(**kwargs)


def test_index_search_filters_by_partition_and_survives_removal():
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((50, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    idx = NamespaceIndex(8, initial_capacity=4)          # forces growth
    for i, v in enumerate(vecs):
        idx.add(f"e{i}", "p0" if i % 2 == 0 else "p1", f"q{i}", v)
    res = idx.search(vecs[10], "p0", 3)
    assert res[0].entry_id == "e10" and res[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(int(c.entry_id[1:]) % 2 == 0 for c in res)
    assert [c.score for c in res] == sorted((c.score for c in res), reverse=True)
    expected = sorted(range(0, 50, 2), key=lambda i: -float(vecs[i] @ vecs[10]))[:3]
    assert [c.entry_id for c in res] == [f"e{i}" for i in expected]
    assert idx.remove("e10") and not idx.remove("e10")
    assert "e10" not in {c.entry_id for c in idx.search(vecs[10], "p0", 25)}
    assert len(idx) == 49 and idx.search(vecs[1], "unknown", 3) == []
    for i in range(50):
        idx.remove(f"e{i}")
    assert len(idx) == 0 and idx.search(vecs[0], "p0", 3) == []


def clustered(rng, n, dim=64, centers=40):
    """Unit vectors around a few centres: neighbours are close, as real question embeddings are."""
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    v = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_partition_past_the_size_threshold_is_searched_through_its_graph_with_exact_scores():
    rng = np.random.default_rng(2)
    vecs = clustered(rng, 3000)
    idx = NamespaceIndex(64, ann_min_rows=1000, ann_candidates=40, threads=1)     # one thread: the same graph each run
    ids = [f"e{i}" for i in range(len(vecs))]
    idx.add_many(ids[:2000], ["big"] * 2000, ids[:2000], vecs[:2000])
    idx.add_many(ids[2000:2500], ["small"] * 500, ids[2000:2500], vecs[2000:2500])
    assert idx.building and idx.graphs == 0                        # started, filled a slice at a time
    assert idx.grow_graphs(500)                                    # a quarter in: still searched exactly
    assert idx.search(vecs[1999], "big", 1)[0].entry_id == "e1999"
    idx.remove("e1998")                                            # removed before its slice: skipped
    idx.add("e1998", "big", "e1998", vecs[1998])                   # back, under a new key
    slices = 1
    while idx.grow_graphs(1_000_000, max_s=0.0):                   # bounded in time: one chunk a call at the least
        slices += 1
    assert slices == -(-1500 // GROW_CHUNK_ROWS)                   # the 1,500 rows left, GROW_CHUNK_ROWS at a time
    assert idx.graphs == 1 and not idx.building                    # only the partition past the threshold
    for i in range(2500, 3000):                                    # one by one into the live graph
        idx.add(ids[i], "big", ids[i], vecs[i])
    idx.add("e3", "big", "e3", vecs[2999])                         # replaced: its old node goes
    for i in range(0, 2000, 4):                                    # rows move, keys must follow them
        if i != 0:
            idx.remove(f"e{i}")
    alive = np.array([i for i in [*range(2000), *range(2500, 3000)] if i % 4 or i == 0 or i >= 2000])
    current = vecs.copy()
    current[3] = vecs[2999]
    queries = clustered(rng, 200)
    agree = 0
    for q in queries:
        got = idx.search(q, "big", 5)
        scores = current[alive] @ q
        best = alive[int(np.argmax(scores))]
        agree += got[0].entry_id == f"e{best}"
        for c in got:                                              # every score is the exact cosine of that row
            assert c.score == pytest.approx(float(current[int(c.entry_id[1:])] @ q), abs=1e-5)
        assert all(f"e{i}" not in {c.entry_id for c in got} for i in range(4, 2000, 4))
        assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)
    assert agree >= 0.95 * len(queries)                            # recall@1 at scale: bench/cache.py
    small = idx.search(vecs[2100], "small", 1)                     # the small partition is still searched exactly
    assert small[0].entry_id == "e2100"
    for i in range(2000):                                          # below half the threshold the graph goes
        idx.remove(f"e{i}")
    for i in range(2500, 2800):
        idx.remove(f"e{i}")
    assert idx.graphs == 0 and idx.search(vecs[2900], "big", 1)[0].entry_id == "e2900"


def test_index_bulk_add_replace_and_remove_keep_search_exact():
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((20_000, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    idx = NamespaceIndex(384)
    ids = [f"e{i}" for i in range(len(vecs))]
    idx.add_many(ids, ["p"] * len(ids), ids, vecs)
    idx.add("e5", "p", "e5", vecs[7])                          # replace: e5 now holds e7's vector
    for i in range(0, len(vecs), 3):                           # remove a third: rows move around
        if i not in (5, 7):
            idx.remove(f"e{i}")
    alive = [i for i in range(len(vecs)) if i % 3 != 0 or i in (5, 7)]
    current = vecs.copy()
    current[5] = vecs[7]
    for q in rng.standard_normal((5, 384)).astype(np.float32):
        q /= np.linalg.norm(q)
        scores = current[alive] @ q
        expected = [f"e{alive[i]}" for i in np.argsort(-scores, kind="stable")[:10]]
        got = idx.search(q, "p", 10)
        assert [c.entry_id for c in got] == expected
        np.testing.assert_allclose([c.score for c in got], np.sort(scores)[::-1][:10], atol=1e-5)
    with pytest.raises(ValueError):
        idx.add_many(["x"], ["p"], ["x"], vecs[:2])


def test_pair_features_see_what_cosine_misses():
    same = pair_features("How do I learn Python?", "How can I learn Python?", 0.95, 0.5)
    other = pair_features("How do I learn Python?", "How do I learn Java?", 0.95, 0.5)
    assert same.shape == (len(FEATURE_NAMES),)
    f = dict(zip(FEATURE_NAMES, zip(same, other)))
    assert f["content_jaccard"][0] > f["content_jaccard"][1]
    swapped = dict(zip(FEATURE_NAMES, pair_features("flights from Paris to Rome", "flights from Rome to Paris", 0.97, 0.5)))
    assert swapped["order_swapped"] == 1.0
    nums = dict(zip(FEATURE_NAMES, pair_features("Is 7 a prime?", "Is 9 a prime?", 0.97, 0.5)))
    assert nums["number_mismatch"] == 1.0


def test_shipped_hit_model_loads_and_decides():
    decider = HitDecider.default()
    assert decider.model is not None and 0 < decider.threshold < 1
    assert decider.model.meta["held_out_operating_point"]["hits"] > 0
    idx, d = decider.choose("How do I learn Python?", [("How can I learn Python?", 0.97), ("How do I learn Java?", 0.80)])
    assert idx == 0 and 0 <= d.confidence <= 1
    assert decider.choose("q", []) == (-1, decider.choose("q", [])[1])
    _, d = decider.choose("q", [("r", 0.1)])
    assert not d.hit                                              # below the model's floor: never a hit
    cosine = HitDecider(None, 0.9)
    assert cosine.choose("a", [("b", 0.91)])[1].hit and not cosine.choose("a", [("b", 0.89)])[1].hit


def test_hit_model_round_trips_through_json(tmp_path):
    m = HitModel(np.zeros(len(FEATURE_NAMES)), np.ones(len(FEATURE_NAMES)), np.arange(len(FEATURE_NAMES), dtype=float),
                 0.5, 0.7, 0.6, {"x": 1})
    p = tmp_path / "m.json"
    p.write_text(m.to_json())
    m2 = HitModel.load(p)
    feats = np.ones(len(FEATURE_NAMES))
    assert m2.threshold == 0.7 and m2.probability(feats) == pytest.approx(m.probability(feats))


async def test_batcher_runs_batches_on_several_workers_and_answers_each_caller():
    import threading
    import time

    from services.embedding.batcher import MicroBatcher

    threads, sizes = set(), []

    def embed(texts):
        threads.add(threading.get_ident())
        sizes.append(len(texts))
        time.sleep(0.05)                      # long enough that the two workers overlap
        return np.array([[float(t.split()[1])] for t in texts], np.float32)

    b = MicroBatcher(embed, max_batch=8, max_wait_ms=1.0, workers=2)
    try:
        out = await asyncio.gather(*(b.embed(f"q {i}") for i in range(40)))
    finally:
        await b.close()
    assert [float(v[0]) for v in out] == [float(i) for i in range(40)]   # every caller gets its own row
    assert len(threads) == 2 and max(sizes) <= 8 and sum(sizes) == 40


async def test_batcher_hands_an_embedding_failure_to_every_caller_of_the_batch():
    from services.embedding.batcher import MicroBatcher

    def embed(texts):
        raise RuntimeError("model failed")

    b = MicroBatcher(embed, workers=2)
    try:
        results = await asyncio.gather(*(b.embed(f"q {i}") for i in range(5)), return_exceptions=True)
    finally:
        await b.close()
    assert all(isinstance(r, RuntimeError) for r in results)
    with pytest.raises(ValueError):
        MicroBatcher(embed, workers=0)
