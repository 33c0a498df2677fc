"""Kernel microbenchmarks: median time, bytes moved, GB/s and % of this machine's copy bandwidth, next to
the torch path measured in the same run.

    python -m bench.kernels [--repeats 30] [--no-engine] [--smoke] [--out PATH]

Paged attention uses SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head dim 64, float32 K/V,
16-token blocks scattered over the pool): decode steps, and a mixed step of speculative verification
runs (5 rows per sequence, causal); the torch path is the engine's own (gather the blocks, batched
matmuls or SDPA with a mask). Bytes moved = the K and V rows read. The decode GEMVs (one activation row,
the model's shapes): the GGUF Q4_1 / Q8_0 block kernel and the int8 W8A8 kernel against torch's float32
matmul of the same weights; bytes = the weights as stored. Copy bandwidth = a 256 MiB tensor copy (bytes
read + written), measured right after each paged-attention case (this shared host drifts). Engine level: decode tokens/s at 1 and 32 streams for
float32, `--quantization int8` and `--quantization gguf`, with the kernels and with
STRATA_KERNELS=reference, and llama.cpp (llama-cpp-python, the bench extra) on the same GGUF and prompts
in the same run; the single-stream target compares `--quantization gguf` and llama.cpp in alternating
runs (the median of 7 per-round ratios) so drift hits both alike (--no-engine skips all of it). JSON + PNG
in bench/results/ (--out moves both); --smoke: a short run at tiny sizes (two paged-attention shapes,
16-token prompts, 2 decode tokens, the engine with `--quantization gguf` only, one repeat), the JSON only,
to a temporary directory (bench/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import metrics, smoke
from kernels import PagedDecode

TARGET_FRACTION_OF_COPY = 0.5        # issue 6: CPU paged-attention decode at 32 sequences x 1,024 tokens
TARGET_SINGLE_STREAM_VS_LLAMACPP = 1.2   # issue 6: single-stream decode with the quantized kernel
SHAPES = [(1, 128), (1, 1024), (8, 512), (32, 1024)]
TARGET_SHAPE = (32, 1024)              # the paged-attention target's (sequences, context)
MIXED = (32, 1024, 5)                  # the mixed step: sequences, context, verification rows per sequence
PROMPT_LEN, OUT_LEN = 128, 32
QUANTIZATIONS = ("none", "int8", "gguf")   # the engine-level comparison's
WARMUP_TOKENS = 4                      # llama.cpp's warm-up runs
COPY_MIB = 256


def _median_s(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs(repeats: int, mib: int = COPY_MIB) -> float:
    return metrics.copy_bandwidth_gbs(max(5, repeats // 3), mib)


def _paged_inputs(batch: int, context: int, rows: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                  seed: int) -> tuple[torch.Tensor, ...]:
    """K/V pools with each sequence's `context` positions in blocks scattered over them, the block
    table, the context lengths and `rows` query rows."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-context // block_size)
    num_blocks = batch * nb + 1
    k = torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=g)
    v = torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=g)
    table = torch.randperm(num_blocks, generator=g)[:batch * nb].view(batch, nb).contiguous()
    lens = torch.full((batch,), context, dtype=torch.int64)
    return k, v, table, lens, torch.randn(rows, heads, head_dim, generator=g)


def paged_attention_case(batch: int, context: int, repeats: int, heads: int = 9, kv_heads: int = 3,
                         head_dim: int = 64, block_size: int = 16) -> dict:
    from services.inference.models.attention import decode_attention, gather_blocks

    k, v, table, lens, q = _paged_inputs(batch, context, batch, heads, kv_heads, head_dim, block_size,
                                         seed=batch * 7919 + context)
    nb = table.shape[1]
    mask = torch.arange(nb * block_size)[None, :] < lens[:, None]
    scale = head_dim ** -0.5
    plan = PagedDecode(table, lens, block_size)

    def kernel():
        return plan(q, k, v, scale)

    def torch_path():
        return decode_attention(q, gather_blocks(k, table, block_size), gather_blocks(v, table, block_size), mask, scale)
    torch.testing.assert_close(kernel(), torch_path(), atol=1e-4, rtol=1e-4)
    moved = 2 * batch * context * kv_heads * head_dim * 4
    k_s, t_s = _median_s(kernel, repeats), _median_s(torch_path, repeats)
    return {"batch": batch, "context": context, "bytes": moved, "kernel_ms": k_s * 1e3, "torch_ms": t_s * 1e3,
            "kernel_gbs": moved / k_s / 1e9, "torch_gbs": moved / t_s / 1e9, "speedup_vs_torch": t_s / k_s}


def paged_attention_mixed_case(batch: int, context: int, rows: int, repeats: int, heads: int = 9, kv_heads: int = 3,
                               head_dim: int = 64, block_size: int = 16) -> dict:
    """`batch` sequences each verifying `rows` new tokens at the end of `context` (causal), in one call."""
    import torch.nn.functional as F

    from kernels import PagedAttention
    from services.inference.models.attention import gather_blocks

    k, v, table, lens, q = _paged_inputs(batch, context, batch * rows, heads, kv_heads, head_dim, block_size,
                                         seed=batch * 31 + rows)
    nb = table.shape[1]
    scale = head_dim ** -0.5
    plan = PagedAttention(table, lens, block_size, torch.full((batch,), rows, dtype=torch.int64))
    mask = torch.arange(nb * block_size)[None, :] <= torch.arange(context - rows, context)[:, None]

    def torch_path():            # the engine's path for chunks over cached context: gather, SDPA with a mask
        outs = []
        for b in range(batch):
            kp, vp = (gather_blocks(x, table[b], block_size).unsqueeze(0) for x in (k, v))
            qp = q[b * rows:(b + 1) * rows].transpose(0, 1).unsqueeze(0)
            outs.append(F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
                        .squeeze(0).transpose(0, 1))
        return torch.cat(outs)
    torch.testing.assert_close(plan(q, k, v, scale), torch_path(), atol=1e-4, rtol=1e-4)
    moved = 2 * batch * context * kv_heads * head_dim * 4
    k_s, t_s = _median_s(lambda: plan(q, k, v, scale), repeats), _median_s(torch_path, repeats)
    return {"batch": batch, "context": context, "rows_per_sequence": rows, "bytes": moved, "kernel_ms": k_s * 1e3,
            "torch_ms": t_s * 1e3, "kernel_gbs": moved / k_s / 1e9, "torch_gbs": moved / t_s / 1e9,
            "speedup_vs_torch": t_s / k_s}


def gemv_cases(repeats: int) -> list[dict]:
    """One activation row through the model's own weights: GGUF blocks (as the file stores them) and int8
    W8A8, against torch's float32 matmul of the same weights (the engine's dense layout [in, out])."""
    import numpy as np

    from kernels import GGUFMatrix
    from services.inference.models.gguf_file import GGUFFile, default_model_path
    from services.inference.models.linear import Int8Linear

    gguf = GGUFFile(default_model_path())
    rows = []
    for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
        t = gguf.raw_tensor(name)
        mat = GGUFMatrix(torch.from_numpy(np.array(t.data, copy=True)), gguf.tensor_type(name), int(t.shape[0]))
        dense = mat.dequantize().t().contiguous()                     # [in, out]
        x = torch.randn(1, mat.k, generator=torch.Generator().manual_seed(mat.n))
        cases = [(f"gguf {mat.block_type}", mat, mat.nbytes)]
        if name != "token_embd.weight":                               # the LM head is weight-only int8 there
            int8 = Int8Linear(dense, emulate=True)
            cases.append(("int8 W8A8", int8.kernel.linear, int8.qweight.nbytes + int8.scale.nbytes))
        t_torch = _median_s(lambda: x @ dense, repeats)
        for kind, fn, nbytes in cases:
            t_k = _median_s(lambda: fn(x), repeats)
            rows.append({"weights": name, "shape": [mat.n, mat.k], "kernel": kind, "bytes": nbytes,
                         "kernel_us": t_k * 1e6, "kernel_gbs": nbytes / t_k / 1e9, "torch_float32_us": t_torch * 1e6,
                         "torch_gbs": dense.nbytes / t_torch / 1e9, "speedup_vs_torch": t_torch / t_k})
    return rows


def llamacpp_decode_rates(streams: tuple[int, ...], out_len: int = OUT_LEN, prompt_len: int = PROMPT_LEN,
                          runs: int = 3) -> dict | None:
    """llama.cpp's decode tokens/s on the same GGUF and prompts (median of `runs`), or None without the bench
    extra."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (`make bench` installs the bench extra); skipped")
        return None
    from bench.llamacpp import LlamaCppRunner
    from services.inference.models.gguf_file import default_model_path

    runner = LlamaCppRunner(str(default_model_path()), torch.get_num_threads(),
                            prompt_len + max(out_len + 1, WARMUP_TOKENS))
    try:
        row = {"quantization": "Q4_1 (llama.cpp)", "path": "llama.cpp"}
        for n in streams:
            prompts = [list(range(100 + i, 100 + prompt_len + i)) for i in range(n)]
            runner.run_batch(prompts, WARMUP_TOKENS, n)                    # warm-up
            rates = []
            for _ in range(runs):
                t = runner.run_batch(prompts, out_len + 1, n)[0].arrivals_s
                rates.append(n * out_len / (t[-1] - t[0]))                 # decode only, as the engine's rate
            row[f"decode_tokens_per_s_{n}"] = sorted(rates)[runs // 2]
        print(f"engine {row}", flush=True)
        return row
    finally:
        runner.close()


def decode_rate(eng, n: int, out_len: int = OUT_LEN, prompt_len: int = PROMPT_LEN) -> float:
    """Decode tokens/s of n streams of `prompt_len`-token prompts (prefill not timed)."""
    from services.inference.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=out_len + 1, ignore_eos=True)
    for i in range(n):
        eng.add_request(list(range(100 + i, 100 + prompt_len + i)), params)
    while eng.scheduler.waiting or any(r.num_output_tokens == 0 for r in eng.scheduler.running):
        eng.step()                                   # prefill (not timed)
    t0, steps = time.perf_counter(), 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    return n * steps / (time.perf_counter() - t0)


def paired_single_stream(rounds: int = 7, out_len: int = OUT_LEN, prompt_len: int = PROMPT_LEN,
                         eng=None) -> dict | None:
    """`--quantization gguf` against llama.cpp at 1 stream, alternating run by run so the machine's drift
    hits both alike; the target uses the median of the per-round ratios. `eng`: a `--quantization gguf`
    engine to reuse (default: a fresh one)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    from bench.llamacpp import LlamaCppRunner
    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine
    from services.inference.models.gguf_file import default_model_path

    if eng is None:
        eng = build_engine(engine_config(dtype="float32", quantization="gguf"))
    runner = LlamaCppRunner(str(default_model_path()), torch.get_num_threads(),
                            prompt_len + max(out_len + 1, WARMUP_TOKENS))
    prompt = [list(range(100, 100 + prompt_len))]
    try:
        decode_rate(eng, 1, out_len, prompt_len)
        runner.run_batch(prompt, WARMUP_TOKENS, 1)
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(decode_rate(eng, 1, out_len, prompt_len))
            t = runner.run_batch(prompt, out_len + 1, 1)[0].arrivals_s
            theirs.append(out_len / (t[-1] - t[0]))
    finally:
        runner.close()
    ratios = sorted(a / b for a, b in zip(ours, theirs))
    result = {"rounds": rounds, "strata_gguf_tokens_per_s": ours, "llama_cpp_tokens_per_s": theirs,
              "ratio_median": ratios[len(ratios) // 2]}
    print(f"paired, 1 stream: strata gguf {sorted(ours)[rounds // 2]:.1f} tok/s, llama.cpp {sorted(theirs)[rounds // 2]:.1f}"
          f" tok/s, median ratio x{result['ratio_median']:.2f}", flush=True)
    return result


def engine_decode_rates(streams: tuple[int, ...] = (1, 32), out_len: int = OUT_LEN, prompt_len: int = PROMPT_LEN,
                        quantizations: tuple[str, ...] = QUANTIZATIONS, runs: int = 3,
                        kept: dict | None = None) -> list[dict]:
    """Decode tokens/s of the engine (in process, `prompt_len`-token prompts, greedy) with the kernels and
    with STRATA_KERNELS=reference, for each of `quantizations` (float32, --quantization int8 and
    --quantization gguf); the median of `runs` runs each. `kept`: a dict that keeps the engines, by
    quantization, for later use (default: each is dropped once measured)."""
    import os

    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine
    rows = []
    for name in quantizations:
        quant = None if name == "none" else name
        eng = build_engine(engine_config(dtype="float32", quantization=quant))
        decode_rate(eng, 1, out_len, prompt_len)         # warm-up
        for mode in ("kernels", "reference"):
            if mode == "reference":
                os.environ["STRATA_KERNELS"] = "reference"
            try:
                row = {"quantization": name, "path": mode}
                for n in streams:
                    row[f"decode_tokens_per_s_{n}"] = sorted(decode_rate(eng, n, out_len, prompt_len)
                                                             for _ in range(runs))[runs // 2]
            finally:
                os.environ.pop("STRATA_KERNELS", None)
            rows.append(row)
            print(f"engine {row}", flush=True)
        if kept is not None:
            kept[name] = eng
        del eng
    peer = llamacpp_decode_rates(streams, out_len, prompt_len, runs)
    return rows + ([peer] if peer else [])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["paged_attention_decode"]
    labels = [f"{r['batch']}x{r['context']}" for r in rows]
    x = range(len(rows))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    ax.bar([i - 0.2 for i in x], [r["kernel_gbs"] for r in rows], 0.4, label="C++ kernel")
    ax.bar([i + 0.2 for i in x], [r["torch_gbs"] for r in rows], 0.4, label="torch path (same run)")
    copy = result["copy_bandwidth_gbs"]
    ax.axhline(copy, color="gray", ls=":", label=f"copy bandwidth {copy:.1f} GB/s")
    ax.axhline(copy * TARGET_FRACTION_OF_COPY, color="red", ls="--", label="target at 32x1024 (50% of copy)")
    ax.set_xticks(list(x), labels)
    ax.set(xlabel="sequences x context tokens", ylabel="K/V GB/s", title="paged attention decode (9 heads, 3 KV heads, d=64, fp32)")
    ax.legend(fontsize=8)
    engine = [r for r in result["engine_decode"] if "decode_tokens_per_s_1" in r]
    if engine:
        names = [r["path"] if r["path"] == "llama.cpp" else f"{r['quantization']}\n{r['path']}" for r in engine]
        colors = ["tab:gray" if r["path"] == "llama.cpp" else "tab:blue" if r["path"] == "kernels" else "tab:orange"
                  for r in engine]
        ax2.bar(range(len(engine)), [r["decode_tokens_per_s_1"] for r in engine], color=colors)
        ax2.set_xticks(range(len(engine)), names, fontsize=7)
        peer = next((r for r in engine if r["path"] == "llama.cpp"), None)
        if peer:
            ax2.axhline(peer["decode_tokens_per_s_1"] * TARGET_SINGLE_STREAM_VS_LLAMACPP, color="red", ls="--",
                        label="target: 1.2x llama.cpp (same run)")
            ax2.legend(fontsize=8)
        ax2.set(ylabel="decode tokens/s", title="engine decode, 1 stream (128-token prompt; blue kernels, orange torch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: all cores)")
    smoke.add_args(p, "kernels")
    p.add_argument("--no-engine", action="store_true", help="skip the engine-level decode comparison")
    # sizes without flags, which --smoke shrinks
    p.set_defaults(shapes=SHAPES, target_shape=TARGET_SHAPE, mixed=MIXED, copy_mib=COPY_MIB, prompt_len=PROMPT_LEN,
                   out_len=OUT_LEN, streams=(1, 32), quantizations=QUANTIZATIONS, engine_runs=3, paired_rounds=7)
    a = smoke.resolve(p.parse_args(argv), repeats=1, shapes=[(1, 64), (4, 128)], target_shape=(4, 128),
                      mixed=(2, 64, 5), copy_mib=8, prompt_len=16, out_len=2, streams=(1, 2), quantizations=("gguf",),
                      engine_runs=1, paired_rounds=1)
    if a.threads:
        torch.set_num_threads(a.threads)
    from bench.serving import machine_info

    copy = copy_bandwidth_gbs(a.repeats, a.copy_mib)
    rows = []
    for batch, context in a.shapes:
        r = paged_attention_case(batch, context, a.repeats)
        r["copy_bandwidth_gbs"] = copy_bandwidth_gbs(a.repeats, a.copy_mib)   # right after: the same machine state
        r["fraction_of_copy"] = r["kernel_gbs"] / r["copy_bandwidth_gbs"]
        rows.append(r)
        print(f"paged attention {batch}x{context}: kernel {r['kernel_ms']:.3f} ms ({r['kernel_gbs']:.1f} GB/s, "
              f"{100 * r['fraction_of_copy']:.0f}% of copy), torch {r['torch_ms']:.3f} ms, x{r['speedup_vs_torch']:.1f}",
              flush=True)
    mixed_batch, mixed_context, mixed_rows = a.mixed
    mixed = paged_attention_mixed_case(mixed_batch, mixed_context, mixed_rows, a.repeats)
    mixed["fraction_of_copy"] = mixed["kernel_gbs"] / copy
    print(f"paged attention, {mixed_batch} x {mixed_rows} verification rows at {mixed_context}: kernel "
          f"{mixed['kernel_ms']:.3f} ms ({100 * mixed['fraction_of_copy']:.0f}% of copy), "
          f"torch {mixed['torch_ms']:.3f} ms", flush=True)
    gemv = gemv_cases(a.repeats)
    for r in gemv:
        r["fraction_of_copy"] = r["kernel_gbs"] / copy
        print(f"gemv {r['weights']} {r['kernel']}: {r['kernel_us']:.0f} us ({r['kernel_gbs']:.1f} GB/s), "
              f"torch float32 {r['torch_float32_us']:.0f} us, x{r['speedup_vs_torch']:.1f}", flush=True)
    # a smoke run measures the paired single stream on the engine-level comparison's gguf engine (one load)
    kept: dict | None = {} if a.smoke else None
    engine = [] if a.no_engine else engine_decode_rates(tuple(a.streams), a.out_len, a.prompt_len,
                                                        tuple(a.quantizations), a.engine_runs, kept)
    paired = None if a.no_engine else paired_single_stream(a.paired_rounds, a.out_len, a.prompt_len,
                                                           (kept or {}).get("gguf"))
    target = next(r for r in rows if (r["batch"], r["context"]) == tuple(a.target_shape))
    targets = {"paged_attention_32x1024_fraction_of_copy": {
        "target": TARGET_FRACTION_OF_COPY, "shape": list(a.target_shape), "value": target["fraction_of_copy"],
        "met": target["fraction_of_copy"] >= TARGET_FRACTION_OF_COPY}}
    if paired:
        ratio = paired["ratio_median"]
        targets["single_stream_gguf_vs_llamacpp"] = {"target": TARGET_SINGLE_STREAM_VS_LLAMACPP, "value": ratio,
                                                     "met": ratio >= TARGET_SINGLE_STREAM_VS_LLAMACPP,
                                                     "how": "median of per-round ratios, runs alternating"}
    result = {"config": {"repeats": a.repeats, "threads": torch.get_num_threads(), "prompt_len": a.prompt_len,
                         "decode_tokens": a.out_len, "smoke": a.smoke}, "machine": machine_info(),
              "copy_bandwidth_gbs": copy, "paged_attention_decode": rows, "paged_attention_mixed": mixed,
              "gemv": gemv, "engine_decode": engine, "paired_single_stream": paired, "targets": targets}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    if a.smoke:
        print(f"copy bandwidth {copy:.1f} GB/s; wrote {a.out} (a smoke run: its figures mean nothing)")
        return
    plot(result, a.out.with_suffix(".png"))
    print(f"copy bandwidth {copy:.1f} GB/s; wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
