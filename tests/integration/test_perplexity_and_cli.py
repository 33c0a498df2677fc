"""bfloat16 quality against float32, and the offline `strata generate` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.perplexity import perplexity, token_logprobs

HELD_TEXT = (Path(__file__).parent.parent / "data" / "heldout.txt").read_text()


def test_bf16_perplexity_is_within_2_percent_of_float32(model_fp32, model_bf16, tokenizer):
    """On the whole held-out text where the CPU multiplies bf16 natively (where `--dtype auto` serves it);
    elsewhere torch emulates bf16 products and one pass over the 529 tokens took 232 s on an AVX2-only EPYC
    (2026-12-02), so there the first 128 tokens are measured."""
    from services.inference.engine.factory import resolve_dtype

    ids = tokenizer.encode(HELD_TEXT)
    assert len(ids) > 500
    if resolve_dtype("auto") != "bfloat16":
        ids = ids[:128]
    ppl32, ppl16 = perplexity(model_fp32, ids), perplexity(model_bf16, ids)
    assert 1.0 < ppl32 < 100.0
    assert abs(ppl16 - ppl32) / ppl32 < 0.02, (ppl32, ppl16)


def test_int8_w8a8_perplexity_is_within_2_percent_of_float32(model_int8, model_fp32, tokenizer):
    from services.inference.models.linear import Int8Linear

    int8 = model_int8
    assert all(isinstance(layer.down, Int8Linear) for layer in int8.layers)
    ids = tokenizer.encode(HELD_TEXT)
    ppl32, ppl8 = perplexity(model_fp32, ids), perplexity(int8, ids)
    assert abs(ppl8 - ppl32) / ppl32 < 0.02, (ppl32, ppl8)


def test_gguf_blocks_perplexity_is_within_1_percent_of_float32(model_gguf, model_fp32, tokenizer):
    """Every product runs the Q4_1 / Q8_0 kernels (activations quantized per 32-value block) whatever the
    step's size: one pass over the text and 16-token steps agree within 1% (the fused layer stack and the
    torch path round differently, and int8 activations pass such differences on), both within 1% of float32
    (measured 2026-12-02: +0.58% and +0.09%)."""
    ids = tokenizer.encode(HELD_TEXT)
    ppl32 = perplexity(model_fp32, ids)
    one_pass, chunked = perplexity(model_gguf, ids), perplexity(model_gguf, ids, chunk=16)
    assert perplexity(model_fp32, ids, chunk=16) == pytest.approx(ppl32, rel=1e-3)   # chunking itself changes nothing
    assert chunked == pytest.approx(one_pass, rel=1e-2)
    assert abs(one_pass - ppl32) / ppl32 < 0.01, (ppl32, one_pass)
    assert abs(chunked - ppl32) / ppl32 < 0.01, (ppl32, chunked)


def test_smoothing_alone_leaves_the_float_model_unchanged(gguf_file, model_fp32, tokenizer):
    from services.inference.models import smoothquant
    from services.inference.models.llama import LlamaModel

    smoothed = LlamaModel.from_gguf(gguf_file)
    prompts = [tokenizer.encode(p) for p in smoothquant.CALIBRATION_PROMPTS]
    smoothquant.smooth(smoothed, smoothquant.activation_maxima(smoothed, prompts))
    ids = tokenizer.encode(HELD_TEXT)[:200]
    import torch
    torch.testing.assert_close(token_logprobs(smoothed, ids), token_logprobs(model_fp32, ids), atol=2e-3, rtol=0)


def test_strata_generate_writes_outputs_in_input_order(tmp_path):
    prompts = tmp_path / "in.jsonl"
    lines = [{"prompt": "Once upon a time"},
             {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4},
             {"prompt": "1, 2, 3,", "stop": [" 6"]}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    subprocess.run([sys.executable, "-m", "services.cli", "generate", "--prompts", str(prompts), "--output",
                    str(out), "--dtype", "float32", "--max-tokens", "12", "--temperature", "0",
                    "--kv-cache-gb", "0.1"], check=True, timeout=300)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"index", "prompt_token_ids", "token_ids", "text", "finish_reason"}
    assert len(rows[0]["token_ids"]) == 12 and rows[0]["finish_reason"] == "length"
    assert len(rows[1]["token_ids"]) <= 4 and rows[1]["prompt_token_ids"][0] == 1   # chat template applied
    assert rows[2]["finish_reason"] == "stop" and " 6" not in rows[2]["text"]


@pytest.mark.parametrize("line, names", [('{"prompt": "hi", "temperature": -2}', "temperature"),
                                         ('{"prompt": "hi", "n": 2}', "'n' must be 1")])
def test_strata_generate_rejects_a_bad_line_with_a_clear_message(tmp_path, line, names):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(line + "\n")
    res = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--prompts", str(prompts),
                          "--output", str(tmp_path / "o.jsonl"), "--kv-cache-gb", "0.1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and names in res.stderr and "Traceback" not in res.stderr
