"""The real Gemma 3 270M (Q4_K_M, installed by `make install`) against HF transformers' float32 greedy on
the same file: 20 raw prompts (a pretrained model: no chat template), two of them past the 512-token window
of its local layers, 48 tokens each.

HF is asked teacher-forced (test_engine_fidelity.hf_choices says why that checks the same thing as its
`generate`): one forward over each prompt and Strata's 48 greedy tokens, HF's own greedy choice at each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.inference.config import engine_config
from services.inference.engine.factory import build_engine
from services.inference.models import catalog
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.linear import GGUFEmbedding, GGUFLinear
from services.inference.models.registry import load_model
from services.inference.models.tokenizer import Tokenizer
from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free
from tests.integration.test_engine_fidelity import hf_choices, prefill_logits
from tools.perplexity import perplexity

TEXT = (Path(__file__).parents[1] / "data" / "heldout.txt").read_text()
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def quicksort(arr):\n    ",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\n\nx = np.linspace(0, 1, 100)\n",
    "In 1969, astronauts",
    "The recipe calls for two cups of flour,",
    "Photosynthesis is the process by which",
    "Q: What is the largest planet in the solar system?\nA:",
    "La tour Eiffel est située à",
    "Die Hauptstadt von Deutschland ist",
    "1, 1, 2, 3, 5, 8, 13, 21,",
    "SELECT name, age FROM users WHERE",
    "The theory of relativity was developed by",
    "My favourite season is autumn because",
    "<html>\n<head>\n<title>",
    "Breaking news: scientists have discovered",
    TEXT + "\n\nIn summary, the history of the bicycle",
    TEXT + "\n\n" + TEXT[:900] + " The most important change of all was",
]
NUM_TOKENS = 48
GEMMA = catalog.models_dir() / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def gguf():
    if not GEMMA.is_file():
        pytest.fail(f"{GEMMA} missing: `make install` assembles it")
    return GGUFFile(GEMMA)


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return Tokenizer.from_gguf(gguf)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    ids = [tokenizer.encode(p) for p in PROMPTS]
    assert sum(len(p) > 512 for p in ids) == 2          # the window of the local layers is passed
    return ids


@pytest.fixture(scope="module")
def hf(gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(GEMMA.parent, gguf_file=GEMMA.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def dense(gguf, tokenizer, prompts):
    """The file's blocks dequantized to float32 (as HF loads them), and Strata's greedy continuations on it."""
    return generate(gguf, tokenizer, prompts, None)


@pytest.fixture(scope="module")
def dense_greedy(dense):
    return dense[1]


def generate(gguf, tokenizer, prompts, quantization):
    model = load_model(gguf, quantization=quantization)
    engine = build_engine(engine_config(dtype="float32", quantization=quantization, kv_cache_memory_gb=0.3),
                          model=model, tokenizer=tokenizer)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True))
    assert_all_blocks_free(engine)
    return model, [o.new_token_ids for o in outs]


def test_samples_share_blocks_of_every_layer_group_past_the_local_window(tokenizer, prompts, dense):
    """n = 2 greedy samples of a short prompt (under a block: nothing to share) and of one past the 512-token
    window, its prompt in 256-token chunks (so the leader's local groups have let go of their oldest blocks when
    the fork takes the rest): both equal the greedy answer, and the fork holds the leader's blocks in the global
    group and the window's in each of the five local ones."""
    from collections import defaultdict

    model, greedy = dense
    engine = build_engine(engine_config(dtype="float32", kv_cache_memory_gb=0.3, max_num_batched_tokens=256,
                                        num_speculative_tokens=0), model=model, tokenizer=tokenizer)
    kv, bs = engine.scheduler.kv, engine.scheduler.kv.block_size
    for i in (0, 19):
        rid = engine.add_request(prompts[i], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, n=2))
        outs, shared = defaultdict(list), None
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs[out.index] += out.new_token_ids
            samples = sorted((r for r in engine.scheduler.running if r.group_id == rid), key=lambda r: r.index)
            if shared is None and len(samples) == 2:
                leader, fork = samples
                n = (len(prompts[i]) - 1) // bs
                for g, (mine, theirs) in enumerate(zip(fork.block_tables, leader.block_tables)):
                    assert all(a == b or b == kv.null_block for a, b in zip(mine[:n], theirs[:n])), g
                shared = [sum(a == b != kv.null_block for a, b in zip(mine[:n], theirs[:n]))
                          for mine, theirs in zip(fork.block_tables, leader.block_tables)]
        assert outs[0] == outs[1] == greedy[i][:16], i
        assert kv.windows == (0, 512, 512, 512, 512, 512)
        if i == 19:
            assert shared[0] == (len(prompts[i]) - 1) // bs and all(0 < n < shared[0] for n in shared[1:]), shared
    assert_all_blocks_free(engine)


def test_the_file_is_read_for_what_it_holds(gguf):
    model = load_model(gguf, quantization="gguf")
    hp = model.hp
    assert (hp.num_layers, hp.hidden_size, hp.num_heads, hp.num_kv_heads, hp.head_dim) == (18, 640, 4, 1, 256)
    assert hp.sliding_window == 512 and [i for i, s in enumerate(hp.sliding_layers) if not s] == [5, 11, 17]
    assert (hp.rope_theta, hp.rope_theta_local, hp.tie_word_embeddings) == (1e6, 1e4, True)
    # every product multiplies blocks: the Q8_0 embedding (the LM head too), Q5_0 gate|up, Q4_K attention output
    # and Q6_K down as stored, Q|K (Q5_0) widened to Q8_0 to join V's Q8_0 (kernels/gguf_convert.py)
    assert isinstance(model.lm_head, GGUFLinear) and isinstance(model.embed, GGUFEmbedding)
    kinds = {name: getattr(model.layers[0], name).kernel.block_type for name in ("qkv", "o", "gate_up", "down")}
    assert kinds == {"qkv": "Q8_0", "o": "Q4_K", "gate_up": "Q5_0", "down": "Q6_K"}


def test_dense_greedy_tokens_equal_hf(prompts, hf, dense_greedy):
    """The file's blocks dequantized to float32, as HF loads them: 19 of 20 prompts exact (measured: 20)."""
    assert all(len(ours) == NUM_TOKENS for ours in dense_greedy)
    exact = sum(hf_choices(hf, prompt, ours) == ours for prompt, ours in zip(prompts, dense_greedy))
    assert exact >= 19, exact


def test_blocks_on_the_kernels_follow_hf(gguf, tokenizer, prompts, hf, dense_greedy):
    """--quantization gguf (the default): every product multiplies blocks with int8 activations. Over 262,144
    tokens the top two logits are often closer than that error, so 48 greedy tokens cannot be HF's on 19 of
    20 prompts (measured 2026-12-02: 9 of 20; llama.cpp on the same file: 9 of 20). Checked instead,
    teacher-forced on the float32 continuation of six prompts (HF's greedy one: the test above), llama.cpp's own measures of a quantized model: the
    KL divergence from HF's next-token distribution (measured: mean 0.0012-0.0034 nats a prompt, at most
    0.036 at one position) and how often the top token is HF's (measured: 94-100%)."""
    model, _ = generate(gguf, tokenizer, prompts[:6], "gguf")
    kls, same = [], []
    for prompt, ref in zip(prompts[:6], dense_greedy):
        seq = prompt + ref
        with torch.no_grad():
            want = torch.log_softmax(hf(torch.tensor([seq])).logits[0], -1)
        got = torch.log_softmax(prefill_logits(model, seq), -1)
        kls.append((want.exp() * (want - got)).sum(-1))
        same.append(got.argmax(-1) == want.argmax(-1))
    kl, agree = torch.cat(kls), torch.cat(same).float().mean()
    assert float(kl.mean()) <= 0.01 and float(kl.max()) <= 0.1, (float(kl.mean()), float(kl.max()))
    assert float(agree) >= 0.9, float(agree)


def test_gguf_perplexity_is_within_1_percent_of_float32(gguf, tokenizer):
    """On both held-out texts (over 1,000 tokens: the local layers' 512-token window is passed), the blocks in
    one pass and in 16-token steps (decode-sized). Measured 2026-12-02: 35.041 dense; -0.13% in one pass and
    +0.08% in 16-token steps with every product on the kernels (the file's own blocks). Chunked prefill of
    the dense path is checked on the tiny models (test_architectures.py)."""
    ids = tokenizer.encode(TEXT + "\n\n" + (Path(__file__).parents[1] / "data" / "heldout2.txt").read_text())
    assert len(ids) > 1000
    dense, blocks = load_model(gguf), load_model(gguf, quantization="gguf")
    ppl32 = perplexity(dense, ids)
    assert 1.0 < ppl32 < 100.0
    for ppl in (perplexity(blocks, ids), perplexity(blocks, ids, chunk=16)):
        assert abs(ppl - ppl32) / ppl32 < 0.01, (ppl32, ppl)
