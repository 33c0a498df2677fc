"""Every architecture the model registry serves (llama, qwen2, qwen3, gemma3), as a tiny random-weight GGUF that
the test writes with the `gguf` writer: in float32, and with its projections in the two block types the kernels
multiply (Q8_0, Q4_1). Strata and HF transformers (float32, dequantized) load the same file.
- float32 weights: first-step logits within 1e-4 of HF's, greedy tokens equal over 32 tokens;
- block files loaded dense (`--quantization none`): the same numbers as HF's dequantization, so the same;
- block files on the kernels (`--quantization gguf`): the kernels quantize activations to int8 per block, so
  logits differ from HF's by up to ~5% of their spread on these random models (measured: 0.26-0.67 against
  a spread of 5.6-12.4), while a random model's top two logits come within 0.05 of each other every few
  tokens; there greedy equality over 32 tokens is a coin toss, not a check. Checked instead: over HF's
  greedy continuation (teacher-forced) the logits stay within 10% of their spread, the argmax equals HF's
  wherever HF's top-two gap exceeds twice the largest difference seen, and the engine's own greedy
  tokens equal HF's up to the first position where the gap is smaller than that."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from services.inference.config import engine_config
from services.inference.engine.factory import build_engine
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.registry import load_model
from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free
from tests.integration.test_engine_fidelity import assert_first_step_logits_close, prefill_logits

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 128, 256, 3, 4, 2
NUM_TOKENS = 32
GEMMA_LAYERS, GEMMA_WINDOW = 6, 8    # layer 5 global, the rest local over 8 positions: the prompts pass it
PROMPTS = [[1, 17, 42, 99, 7, 250, 3], [5] * 3 + list(range(60, 90)), [200, 100, 50, 25, 12, 6, 3, 1, 0]]


def head_dim(arch: str) -> int:
    # qwen3 and gemma3 keep a head size of their own (attention.key_length); HF's GGUF loader takes their
    # defaults (128; 256, which is also the query_pre_attn_scalar HF assumes)
    return {"qwen3": 128, "gemma3": 256}.get(arch, HIDDEN // HEADS)


def write_tiny_gguf(path, arch: str, block_type: str | None, seed: int = 0,
                    rope_freqs: np.ndarray | None = None, rope_scaling: tuple[str, float] | None = None) -> None:
    """A random `arch` model: 3 layers, GQA 4/2; block_type quantizes every projection and the embedding
    (norms, biases stay float32). qwen2 gets Q/K/V biases and an untied LM head, qwen3 per-head Q/K norms.
    rope_freqs: a `rope_freqs.weight` tensor (per-frequency RoPE divisors, as llama.cpp stores Llama 3's);
    rope_scaling: (`rope.scaling.type`, `rope.scaling.factor`)."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    w = lambda *shape, scale=0.08: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    hd = head_dim(arch)
    layers = GEMMA_LAYERS if arch == "gemma3" else LAYERS
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_context_length(256)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if rope_scaling is not None:
        writer.add_string(f"{arch}.rope.scaling.type", rope_scaling[0])
        writer.add_float32(f"{arch}.rope.scaling.factor", rope_scaling[1])
    if arch in ("qwen3", "gemma3"):
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    if arch == "gemma3":
        writer.add_sliding_window(GEMMA_WINDOW)

    def matrix(name: str, *shape: int, scale: float = 0.08) -> None:
        x = w(*shape, scale=scale)
        if block_type is None:
            writer.add_tensor(name, x)
        else:
            kind = gguf.GGMLQuantizationType[block_type]
            writer.add_tensor(name, quantize(x, kind), raw_dtype=kind)

    matrix("token_embd.weight", VOCAB, HIDDEN, scale=1.0)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if arch == "qwen2":
        matrix("output.weight", VOCAB, HIDDEN, scale=1.0)
    writer.add_tensor("output_norm.weight", 1 + w(HIDDEN))
    for i in range(layers):
        p = f"blk.{i}."
        for name, shape in (("attn_q", (HEADS * hd, HIDDEN)), ("attn_k", (KV_HEADS * hd, HIDDEN)),
                            ("attn_v", (KV_HEADS * hd, HIDDEN)), ("attn_output", (HIDDEN, HEADS * hd)),
                            ("ffn_gate", (INTER, HIDDEN)), ("ffn_up", (INTER, HIDDEN)), ("ffn_down", (HIDDEN, INTER))):
            matrix(p + name + ".weight", *shape)
        writer.add_tensor(p + "attn_norm.weight", 1 + w(HIDDEN))
        writer.add_tensor(p + "ffn_norm.weight", 1 + w(HIDDEN))
        if arch == "qwen2":
            for name, size in (("attn_q", HEADS * hd), ("attn_k", KV_HEADS * hd), ("attn_v", KV_HEADS * hd)):
                writer.add_tensor(p + name + ".bias", w(size, scale=0.5))
        if arch in ("qwen3", "gemma3"):
            writer.add_tensor(p + "attn_q_norm.weight", 1 + w(hd, scale=0.3))
            writer.add_tensor(p + "attn_k_norm.weight", 1 + w(hd, scale=0.3))
        if arch == "gemma3":
            writer.add_tensor(p + "post_attention_norm.weight", 1 + w(HIDDEN, scale=0.3))
            writer.add_tensor(p + "post_ffw_norm.weight", 1 + w(HIDDEN, scale=0.3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
CASES = [(arch, block) for arch in ARCHS for block in (None, "Q8_0", "Q4_1")]
BLOCK_CASES = [(arch, block) for arch, block in CASES if block is not None]
ids = lambda cases: [f"{a}-{b or 'F32'}" for a, b in cases]  # noqa: E731


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """(arch, block type) -> (GGUFFile, HF's model of it), each written and loaded once."""
    loaded = {}

    def get(arch: str, block: str | None):
        if (arch, block) not in loaded:
            directory = tmp_path_factory.mktemp(f"{arch}-{block}")
            write_tiny_gguf(directory / "model.gguf", arch, block)
            hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file="model.gguf",
                                                                   dtype=torch.float32).eval()
            loaded[arch, block] = (GGUFFile(directory / "model.gguf"), hf)
        return (arch, block, *loaded[arch, block])
    return get


@pytest.fixture(params=CASES, ids=ids(CASES))
def tiny(request, tiny_files):
    return tiny_files(*request.param)


@pytest.fixture(params=BLOCK_CASES, ids=ids(BLOCK_CASES))
def tiny_blocks(request, tiny_files):
    return tiny_files(*request.param)


@pytest.fixture(params=ARCHS)
def tiny_f32(request, tiny_files):
    return tiny_files(request.param, None)


def hf_greedy(hf, prompt: list[int]) -> list[int]:
    return hf_greedy_with_gaps(hf, prompt)[0]


def hf_greedy_with_gaps(hf, prompt: list[int]) -> tuple[list[int], list[float]]:
    """HF's greedy continuation and, per token, the gap between its top two logits."""
    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(NUM_TOKENS):
            top = hf(torch.tensor([ids])).logits[0, -1].topk(2)
            ids.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
    return ids[len(prompt):], gaps


def strata_greedy(model, tokenizer, quantization: str | None) -> list[list[int]]:
    engine = build_engine(engine_config(dtype="float32", quantization=quantization, kv_cache_memory_gb=0.02),
                          model=model, tokenizer=tokenizer)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True))
    assert_all_blocks_free(engine)
    return [o.new_token_ids for o in outs]


def test_the_file_is_read_for_what_it_holds(tiny):
    arch, block, gguf, _ = tiny
    model = load_model(gguf)
    hp = model.hp
    assert model.architecture == arch
    assert (hp.qkv_bias, hp.qk_norm, hp.permuted_qk) == (arch == "qwen2", arch in ("qwen3", "gemma3"),
                                                         arch == "llama")
    assert hp.head_dim == head_dim(arch) and hp.tie_word_embeddings == (arch != "qwen2")
    assert {gguf.tensor_type("blk.0.attn_q.weight")} == {block or "F32"}


@pytest.mark.parametrize("path", ["row kernels", "torch"])
def test_dense_logits_and_greedy_tokens_equal_hf(tiny, tokenizer, path, monkeypatch):
    """Float32 weights, and block files loaded dense: HF's numbers (logits within 1e-4), HF's tokens, on the
    row kernels' forward and on plain torch's (STRATA_KERNELS=reference)."""
    arch, block, gguf, hf = tiny
    if path == "torch":
        monkeypatch.setenv("STRATA_KERNELS", "reference")
    model = load_model(gguf)
    assert_first_step_logits_close(model, hf, PROMPTS, atol=1e-4)
    assert strata_greedy(model, tokenizer, None) == [hf_greedy(hf, p) for p in PROMPTS]


@pytest.mark.skipif(not kernels.available(), reason="kernels not built (make install)")
def test_block_files_on_the_kernels_follow_hf(tiny_blocks, tokenizer):
    arch, block, gguf, hf = tiny_blocks
    model = load_model(gguf, quantization="gguf")
    assert model.quantization == "gguf"
    ours = strata_greedy(model, tokenizer, "gguf")
    compared = 0                                      # generated tokens compared, over the prompts
    for prompt, tokens in zip(PROMPTS, ours):
        ref, gaps = hf_greedy_with_gaps(hf, prompt)
        seq = prompt + ref
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0]
        got = prefill_logits(model, seq)
        worst = float((got - want).abs().max())
        assert worst <= 0.1 * float(want.std()), (worst, float(want.std()))
        # teacher-forced: the argmax after each prefix where HF's choice is clear of the difference
        positions = range(len(prompt) - 1, len(seq) - 1)
        clear = [i for i, gap in zip(positions, gaps) if gap > 2 * worst]
        assert len(clear) >= NUM_TOKENS // 2
        assert got[clear].argmax(-1).tolist() == want[clear].argmax(-1).tolist()
        # generated: equal to HF's up to the first token HF chose by less than that margin
        sure = next((i for i, gap in enumerate(gaps) if gap <= 2 * worst), NUM_TOKENS)
        assert tokens[:sure] == ref[:sure]
        compared += sure
    print(f"{arch} {block}: {compared} generated tokens compared")
    assert compared >= 3


def test_smoothing_for_int8_leaves_the_outputs_unchanged(tiny_f32):
    """SmoothQuant's rescaling (the int8 pass's first half) folds scales into norms, V's rows and its bias:
    every architecture's float outputs stay the same."""
    from services.inference.models import smoothquant

    arch, block, gguf, _ = tiny_f32
    model = load_model(gguf)
    before = [prefill_logits(model, p) for p in PROMPTS]
    smoothquant.smooth(model, smoothquant.activation_maxima(model, PROMPTS))
    for p, want in zip(PROMPTS, before):
        torch.testing.assert_close(prefill_logits(model, p), want, atol=1e-3, rtol=1e-4)


def test_sliding_window_over_chunked_prefill_and_batched_decodes(tiny_files, tokenizer):
    """gemma3's local layers attend to the last 8 positions from every kind of step: prefill chunks of 5
    tokens over cached context (max_num_batched_tokens 5), chunks longer than the window, decodes batched
    with another prompt's chunks, while their groups' blocks that left the window go back to the pool. Each
    step's top-5 log-probabilities are HF's (the whole sequence at once) within 1e-3, and the tokens HF's."""
    _, _, gguf, hf = tiny_files("gemma3", None)
    model = load_model(gguf)
    prompts = [list(range(60, 95)), list(range(60, 92)) + [7, 8, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    outs = []
    for budget, batch in ((5, prompts[:1]), (5, prompts[1:]), (64, prompts)):
        engine = build_engine(engine_config(dtype="float32", quantization=None, kv_cache_memory_gb=0.02,
                                            max_num_batched_tokens=budget, block_size=4),
                              model=model, tokenizer=tokenizer)
        outs += engine.generate(batch, params)
        assert_all_blocks_free(engine)
    for prompt, out in zip(prompts + prompts, outs):
        assert out.new_token_ids == hf_greedy(hf, prompt)[:12]
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt + out.new_token_ids])).logits[0].float(), -1)
        # the top five of each step (a random model's best token takes nearly all the mass: the others show
        # the differences)
        got = [lp for step in out.logprobs for _, lp in step.top]
        want = [float(ref[len(prompt) - 1 + i, t]) for i, step in enumerate(out.logprobs) for t, _ in step.top]
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-5)


def test_local_groups_hold_only_their_window(tiny_files, tokenizer):
    """The tiny gemma3 (5 local layers, 1 global: groups of one layer) over a 200-token request in blocks of
    4: the global group holds all 50 blocks, each local group at most the window's 2 blocks, the block
    before it and the step's, so the request peaks at 50 + 5 x 4 blocks instead of 6 x 50."""
    _, _, gguf, _ = tiny_files("gemma3", None)
    engine = build_engine(engine_config(dtype="float32", quantization=None, num_kv_blocks=400,
                                        block_size=4, max_num_batched_tokens=16),
                          model=load_model(gguf), tokenizer=tokenizer)
    kv = engine.scheduler.kv
    assert kv.layout.windows == (0, 8, 8, 8, 8, 8) and not kv.enable_prefix_caching
    engine.add_request(list(range(1, 101)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, kv.num_blocks - kv.num_free_blocks)
    assert 50 < peak <= 50 + 5 * 4, peak
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("block", ["F16", "BF16", "Q4_0", "Q5_0", "Q5_1"])
def test_every_other_storage_type_loads_as_hf_dequantizes_it(tiny_files, block):
    """The types a GGUF may store besides F32, Q8_0 and Q4_1 (K-quants aside: the gguf writer cannot make them;
    the real Gemma file's Q4_K and Q6_K are checked in test_gemma3.py): loaded dense, the first-step logits are
    HF's within 1e-4; Q5_0 also runs on the kernels, its own blocks (kernels/gguf.py)."""
    _, _, gguf, hf = tiny_files("llama", block)
    assert gguf.tensor_type("blk.0.attn_q.weight") == block
    assert_first_step_logits_close(load_model(gguf), hf, PROMPTS, atol=1e-4)
    if block == "Q5_0":
        model = load_model(gguf, quantization="gguf")
        assert model.layers[0].qkv.kernel.block_type == "Q5_0"
        for prompt in PROMPTS:
            with torch.no_grad():
                want = hf(torch.tensor([prompt])).logits[0]
            got = prefill_logits(model, prompt)
            assert float((got - want).abs().max()) <= 0.1 * float(want.std())


# Llama 3.1's rope_scaling, over a short original context so that the tiny model's prompts reach every regime
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def llama3_rope_freqs(head_size: int, theta: float, scaling: dict) -> np.ndarray:
    """The divisors llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel) writes as rope_freqs.weight
    for rope_scaling type "llama3": 1 for short wavelengths, `factor` for long ones, smoothed between."""
    import math
    freqs = 1.0 / (theta ** (np.arange(0, head_size, 2, dtype=np.float32) / head_size))
    context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("path", ["row kernels", "torch"])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, tokenizer, path, monkeypatch):
    """A Llama 3.1-style file (RoPE factors in rope_freqs.weight, all three regimes: 2 frequencies kept, 3
    smoothed, 11 divided by 8) gives the logits and greedy tokens of HF's LlamaForCausalLM with rope_scaling
    "llama3"; HF's unscaled RoPE on the same weights is far off, so the factors are what is checked."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if path == "torch":
        monkeypatch.setenv("STRATA_KERNELS", "reference")
    factors = llama3_rope_freqs(head_dim("llama"), 10000.0, LLAMA3_ROPE)
    assert (factors == 1).sum() == 2 and (factors == 8).sum() == 11
    write_tiny_gguf(tmp_path / "model.gguf", "llama", None, rope_freqs=factors)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        unscaled = [hf(torch.tensor([p])).logits[0] for p in PROMPTS]
    hf.config.rope_parameters = {**LLAMA3_ROPE, "rope_theta": 10000.0}
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf.config)
    model = load_model(GGUFFile(tmp_path / "model.gguf"))
    assert model.hp.rope_freq_factors == tuple(factors.tolist())
    assert_first_step_logits_close(model, hf, PROMPTS, atol=1e-4)
    assert max(float((prefill_logits(model, p) - u).abs().max()) for p, u in zip(PROMPTS, unscaled)) > 0.1
    assert strata_greedy(model, tokenizer, None) == [hf_greedy(hf, p) for p in PROMPTS]


def test_unsupported_rope_scaling_is_refused_by_name(tmp_path):
    """A file whose RoPE scaling Strata does not implement (YaRN) is refused at load, not served wrong."""
    write_tiny_gguf(tmp_path / "yarn.gguf", "llama", None, rope_scaling=("yarn", 4.0))
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        load_model(GGUFFile(tmp_path / "yarn.gguf"))


def test_linear_rope_scaling(tmp_path):
    """`rope.scaling.type` "linear" (positions divided by the factor): HF's rope_scaling "linear"."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    write_tiny_gguf(tmp_path / "model.gguf", "llama", None, rope_scaling=("linear", 4.0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                           dtype=torch.float32).eval()
    hf.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf.config)
    model = load_model(GGUFFile(tmp_path / "model.gguf"))
    assert model.hp.rope_scale == 4.0
    assert_first_step_logits_close(model, hf, PROMPTS, atol=1e-4)
