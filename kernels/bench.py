"""Kernel microbenchmarks: median time, bytes moved, GB/s and % of this machine's copy bandwidth, next to
the torch path measured in the same run.

    python -m kernels.bench [--repeats 30] [--out bench/results/kernels.json]

Paged attention (decode) uses SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head dim 64,
float32 K/V, 16-token blocks scattered over the pool); the torch path is the engine's own (gather the
blocks, batched matmuls, softmax). Bytes moved = the K and V rows read. Copy bandwidth = a 256 MiB
tensor copy (bytes read + written), measured in the same run. Engine level: decode tokens/s at 1 and 32
streams, float32 and int8, with the kernels and with STRATA_KERNELS=reference (--no-engine skips it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kernels import PagedDecode

TARGET_FRACTION_OF_COPY = 0.5        # issue 6: CPU paged-attention decode at 32 sequences x 1,024 tokens
SHAPES = [(1, 128), (1, 1024), (8, 512), (32, 1024)]


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


def copy_bandwidth_gbs(repeats: int) -> float:
    src = torch.empty(64 * 2**20)               # 256 MiB of float32
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _median_s(lambda: dst.copy_(src), max(5, repeats // 3)) / 1e9


def paged_attention_case(batch: int, context: int, repeats: int, heads: int = 9, kv_heads: int = 3,
                         head_dim: int = 64, block_size: int = 16) -> dict:
    from services.inference.models.attention import decode_attention, gather_blocks

    g = torch.Generator().manual_seed(batch * 7919 + context)
    nb = -(-context // block_size)
    num_blocks = batch * nb + 1
    k = torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=g)
    v = torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=g)
    table = torch.randperm(num_blocks, generator=g)[:batch * nb].view(batch, nb).contiguous()
    lens = torch.full((batch,), context, dtype=torch.int64)
    q = torch.randn(batch, heads, head_dim, generator=g)
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


def engine_decode_rates(streams: tuple[int, ...] = (1, 32), out_len: int = 32) -> list[dict]:
    """Decode tokens/s of the engine (in process, 128-token prompts, greedy) with the kernels and with
    STRATA_KERNELS=reference, for float32 and --quantization int8; the median of 3 runs each."""
    import os

    from services.inference.engine.engine import EngineConfig, LLMEngine
    from services.inference.sampling import SamplingParams

    def rate(eng: LLMEngine, n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=out_len + 1, ignore_eos=True)
        for i in range(n):
            eng.add_request(list(range(100 + i, 228 + i)), params)
        while eng.scheduler.waiting or any(r.num_output_tokens == 0 for r in eng.scheduler.running):
            eng.step()                                   # prefill (not timed)
        t0, steps = time.perf_counter(), 0
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
        return n * steps / (time.perf_counter() - t0)

    rows = []
    for quant in (None, "int8"):
        eng = LLMEngine(EngineConfig(dtype="float32", quantization=quant))
        rate(eng, 1)                                     # warm-up
        for mode in ("kernels", "reference"):
            if mode == "reference":
                os.environ["STRATA_KERNELS"] = "reference"
            try:
                row = {"quantization": quant or "none", "path": mode}
                for n in streams:
                    row[f"decode_tokens_per_s_{n}"] = sorted(rate(eng, n) for _ in range(3))[1]
            finally:
                os.environ.pop("STRATA_KERNELS", None)
            rows.append(row)
            print(f"engine {row}", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["paged_attention_decode"]
    labels = [f"{r['batch']}x{r['context']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["kernel_gbs"] for r in rows], 0.4, label="C++ kernel")
    ax.bar([i + 0.2 for i in x], [r["torch_gbs"] for r in rows], 0.4, label="torch path (same run)")
    copy = result["copy_bandwidth_gbs"]
    ax.axhline(copy, color="gray", ls=":", label=f"copy bandwidth {copy:.1f} GB/s")
    ax.axhline(copy * TARGET_FRACTION_OF_COPY, color="red", ls="--", label="target at 32x1024 (50% of copy)")
    ax.set_xticks(list(x), labels)
    ax.set(xlabel="sequences x context tokens", ylabel="K/V GB/s", title="paged attention decode (9 heads, 3 KV heads, d=64, fp32)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    p.add_argument("--no-engine", action="store_true", help="skip the engine-level decode comparison")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from bench.serving import machine_info

    copy = copy_bandwidth_gbs(a.repeats)
    rows = []
    for batch, context in SHAPES:
        r = paged_attention_case(batch, context, a.repeats)
        r["fraction_of_copy"] = r["kernel_gbs"] / copy
        rows.append(r)
        print(f"paged attention {batch}x{context}: kernel {r['kernel_ms']:.3f} ms ({r['kernel_gbs']:.1f} GB/s, "
              f"{100 * r['fraction_of_copy']:.0f}% of copy), torch {r['torch_ms']:.3f} ms, x{r['speedup_vs_torch']:.1f}",
              flush=True)
    engine = [] if a.no_engine else engine_decode_rates()
    target = next(r for r in rows if (r["batch"], r["context"]) == (32, 1024))
    result = {"config": {"repeats": a.repeats, "threads": torch.get_num_threads()}, "machine": machine_info(),
              "copy_bandwidth_gbs": copy, "paged_attention_decode": rows, "engine_decode": engine,
              "targets": {"paged_attention_32x1024_fraction_of_copy": {
                  "target": TARGET_FRACTION_OF_COPY, "value": target["fraction_of_copy"],
                  "met": target["fraction_of_copy"] >= TARGET_FRACTION_OF_COPY}}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, a.out.with_suffix(".png"))
    print(f"copy bandwidth {copy:.1f} GB/s; wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
