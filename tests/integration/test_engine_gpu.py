"""The engine on a GPU (`device="cuda"`, float32): the CUDA kernels (or Triton with STRATA_KERNELS=triton)
inside real engine steps give HF transformers' greedy tokens and logits on the same GGUF, with prefill,
decode, prefix caching and continuous batching, and free every KV block. Skipped where no GPU is visible."""

from __future__ import annotations

import pytest
import torch

from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free
from tests.integration.test_engine_fidelity import CHATS, NUM_TOKENS, RAW, assert_first_step_logits_close, hf_greedy_tokens

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model_cuda(gguf_file):
    from services.inference.models.llama import LlamaModel
    return LlamaModel.from_gguf(gguf_file, torch.float32, device="cuda")


@pytest.fixture(scope="module")
def make_gpu_engine(model_cuda, tokenizer):
    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine

    def make(**overrides):
        overrides.setdefault("kv_cache_memory_gb", 0.25)
        return build_engine(engine_config(dtype="float32", device="cuda", **overrides), model=model_cuda,
                            tokenizer=tokenizer)
    return make


@pytest.fixture(scope="module")
def prompts(make_gpu_engine):
    engine = make_gpu_engine()
    return [engine.tokenizer.encode(t) for t in [engine.render_chat(m) for m in CHATS] + RAW]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts):
    return hf_greedy_tokens(hf_model, prompts)


def test_the_model_and_kv_cache_live_on_the_gpu(make_gpu_engine):
    engine = make_gpu_engine()
    assert engine.model.device.type == "cuda" and engine.config.device.device == "cuda"
    assert all(k.is_cuda and v.is_cuda for k, v in engine.runner.kv_caches)
    assert engine.runner.compute.paged_attention


@pytest.mark.parametrize("kernels_env", ["cuda", "triton"])
def test_greedy_tokens_on_the_gpu_equal_hf_transformers(make_gpu_engine, prompts, hf_greedy, kernels_env,
                                                        monkeypatch):
    if kernels_env == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("STRATA_KERNELS", "triton")
    else:
        from kernels._loader import cuda_built
        if not cuda_built():
            pytest.skip("the CUDA module is not built")
    engine = make_gpu_engine()
    # all prompts in one batch: prefill chunks and decodes share steps
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True))
    for ids, out, ref in zip(prompts, outs, hf_greedy):
        assert out.new_token_ids == ref, engine.tokenizer.decode(ids)
    assert_all_blocks_free(engine)


def test_first_step_logits_on_the_gpu_within_1e3_of_hf(model_cuda, hf_model, prompts):
    assert_first_step_logits_close(model_cuda, hf_model, prompts)


def test_prefix_caching_and_a_long_prompt_in_chunks_match_the_cpu_engine(make_gpu_engine, make_engine, prompts):
    # a shared prefix (cached blocks), chunked prefill of a long prompt (max_num_batched_tokens 64), decodes
    # past a partition of the split-K kernel: the GPU engine's greedy tokens equal the CPU engine's
    long_prompt = sum(prompts, [])[:600]
    batch = [long_prompt, long_prompt[:300] + prompts[0], prompts[1], long_prompt[:300] + prompts[2]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    gpu = make_gpu_engine(max_num_batched_tokens=64)
    cpu = make_engine("float32", max_num_batched_tokens=64)
    got = gpu.generate(batch, params)
    want = [o.new_token_ids for o in cpu.generate(batch, params)]
    assert [o.new_token_ids for o in got] == want
    assert gpu.stats().prefix_cache_hit_tokens_total > 0
    assert_all_blocks_free(gpu)


def test_sampling_and_logprobs_on_the_gpu(make_gpu_engine, prompts):
    engine = make_gpu_engine()
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True, logprobs=3)
    a = engine.generate(prompts[:3], params)
    b = engine.generate(prompts[:3], params)
    assert [o.new_token_ids for o in a] == [o.new_token_ids for o in b]      # seeded: reproducible
    for out in a:
        assert len(out.new_token_ids) == 16 and len(out.logprobs) == 16
    assert_all_blocks_free(engine)


def test_speculative_ngram_decoding_on_the_gpu_keeps_greedy_output(make_gpu_engine, prompts):
    text = prompts[1] + prompts[1][-40:]          # repeats itself: the n-gram proposer finds matches
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    plain = make_gpu_engine().generate([text], params)[0].new_token_ids
    spec = make_gpu_engine(speculative="ngram", num_speculative_tokens=4).generate([text], params)[0].new_token_ids
    assert spec == plain
