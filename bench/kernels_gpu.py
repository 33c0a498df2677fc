"""GPU kernel benchmarks (run where a CUDA GPU is visible): paged attention from the CUDA module (split-K,
GQA-shared K/V reads), the Triton kernel and the engine's torch path, measured in the same run, in GB/s of
K/V read and % of the card's measured copy bandwidth; then the engine on the GPU (decode tokens/s at 1, 8
and 32 streams with the CUDA kernels, the Triton kernels and the torch path).

    python -m bench.kernels_gpu [--no-engine] [--no-plot] [--smoke] [--out PATH]

Timing: CUDA events around CUDA-graph replays of the calls (launch gaps and Python overhead out of the
kernel figures; eager timing where capture fails, marked), the median of 7 replays. Each case cycles
through several block tables whose blocks are scattered over a pool of at least 512 MiB, so K/V come from
HBM and not from the 50 MB L2. Bytes moved = the K and V rows read (each once per sequence and KV head).
Copy bandwidth = a 2 GiB device-to-device copy, bytes read + written. JSON + PNG in bench/results/ (--out
moves both); --smoke: a short run at tiny sizes (one decode size and a small mixed step per head shape,
16 MiB pools, a 64 MiB copy, one replay, the engine at 1 and 2 streams, one run each), the JSON only, to a
temporary directory (bench/smoke.py). Without a CUDA GPU it exits at once with status 1 and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench import smoke
from bench.kernels import OUT_LEN, PROMPT_LEN, decode_rate
from kernels import PagedAttention, PagedDecode
from kernels._loader import cuda_built

TARGET_FRACTION_OF_HBM = 0.7          # issue 6: CUDA paged attention >= 70% of HBM bandwidth
# (name, query heads, KV heads, head dim): the served model, and a Llama-3-8B-like attention shape
HEAD_SHAPES = [("smollm2-135m", 9, 3, 64), ("llama-8b-like", 32, 8, 128)]
DECODE_SIZES = [(1, 4096), (8, 2048), (32, 1024), (32, 4096), (64, 8192), (256, 2048)]
MIXED = (32, 1024, 5)                 # a step of verification runs: sequences, context, rows per sequence
POOL_BYTES = 512 * 2**20
COPY_MIB = 2048
REPLAYS = 7


def _time_ms(fn, graph: bool = True, replays: int = 7, inner: int = 20) -> tuple[float, bool]:
    """Median ms of one fn() call; fn is captured `inner` times into a CUDA graph and replayed."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
        except Exception as exc:      # noqa: BLE001 - fall back to eager timing, and say so
            print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)", flush=True)
            g = None
            torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if g is not None:
            g.replay()
        else:
            for _ in range(inner):
                fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    times.sort()
    return times[len(times) // 2], g is not None


def copy_bandwidth_gbs(mib: int = COPY_MIB, replays: int = REPLAYS) -> float:
    src = torch.empty(mib * 2**18, device="cuda")          # `mib` MiB of float32 (default 2 GiB)
    dst = torch.empty_like(src)
    ms, _ = _time_ms(lambda: dst.copy_(src), graph=False, replays=replays, inner=5)
    del src, dst
    return 2 * mib * 2**20 / (ms / 1e3) / 1e9


class PagedCase:
    """Pools of at least POOL_BYTES with `copies` independent block tables (blocks scattered at random), and
    a q per copy; call(i) runs copy i."""

    def __init__(self, batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int = 16,
                 rows_per_seq: int = 1, seed: int = 0, pool_bytes: int = POOL_BYTES) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.batch, self.context, self.heads, self.kv_heads, self.head_dim = batch, context, heads, kv_heads, head_dim
        self.block_size, self.rows_per_seq = block_size, rows_per_seq
        nb = -(-context // block_size)
        self.kv_bytes = 2 * batch * context * kv_heads * head_dim * 4
        self.copies = max(2, min(16, -(-pool_bytes // self.kv_bytes)))
        num_blocks = self.copies * batch * nb
        self.k = torch.randn(kv_heads, num_blocks * block_size, head_dim, device="cuda", generator=g)
        self.v = torch.randn_like(self.k)
        perm = torch.randperm(num_blocks, device="cuda", generator=g).cpu()
        lens = torch.full((batch,), context, dtype=torch.int64)
        qlens = None if rows_per_seq == 1 else torch.full((batch,), rows_per_seq, dtype=torch.int64)
        self.tables = [perm[i * batch * nb:(i + 1) * batch * nb].view(batch, nb).contiguous() for i in range(self.copies)]
        self.plans = [PagedAttention(t, lens, block_size, qlens) for t in self.tables]
        self.q = [torch.randn(batch * rows_per_seq, heads, head_dim, device="cuda", generator=g)
                  for _ in range(self.copies)]
        self.scale = head_dim ** -0.5
        for plan in self.plans:
            plan.device_tables(self.q[0].device)
        # the torch path's masks: context positions (decodes), causal over the context (several rows each)
        pos = torch.arange(nb * block_size)
        self.mask = (pos[None, :] < lens[:, None]).cuda()
        self.causal = (pos[None, :] <= (context - rows_per_seq + torch.arange(rows_per_seq))[:, None]).cuda()

    def run_all(self, one) -> None:
        for i in range(self.copies):
            one(i)

    def cuda(self, i: int) -> torch.Tensor:
        return self.plans[i](self.q[i], self.k, self.v, self.scale)

    def triton(self, i: int) -> torch.Tensor:
        from kernels import triton as tk
        table, row_seq, row_len = self.plans[i].device_tables(self.q[i].device)
        return tk.paged_attention_rows(self.q[i], self.k, self.v, table, row_seq, row_len, self.scale,
                                       self.block_size)

    def torch_path(self, i: int) -> torch.Tensor:
        """The engine's torch path: gather the blocks, batched matmuls (decodes) or SDPA with a mask."""
        from services.inference.models.attention import decode_attention, gather_blocks
        table = self.plans[i].device_tables(self.q[i].device)[0]
        k, v = gather_blocks(self.k, table, self.block_size), gather_blocks(self.v, table, self.block_size)
        if self.rows_per_seq == 1:
            return decode_attention(self.q[i], k, v, self.mask, self.scale)
        n, b = self.rows_per_seq, self.batch
        q = self.q[i].view(b, n, self.heads, self.head_dim).transpose(1, 2)            # [B, H, n, D]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.transpose(0, 1), v.transpose(0, 1), attn_mask=self.causal, scale=self.scale, enable_gqa=True)

    def check(self) -> float:
        """max |CUDA - torch path| on copy 0 (a sanity check next to the timings)."""
        ref = self.torch_path(0)
        ref = ref.transpose(1, 2).reshape(self.q[0].shape) if self.rows_per_seq > 1 else ref
        return float((self.cuda(0) - ref).abs().max())


def paged_rows(copy_gbs: float, triton_ok: bool, decode_sizes: list[tuple[int, int]] = DECODE_SIZES,
               mixed: tuple[int, int, int] = MIXED, pool_bytes: int = POOL_BYTES, replays: int = REPLAYS) -> list[dict]:
    rows = []
    for name, heads, kv_heads, head_dim in HEAD_SHAPES:
        for batch, context in decode_sizes:
            rows.append(_paged_row(copy_gbs, triton_ok, name, heads, kv_heads, head_dim, batch, context, 1,
                                   pool_bytes, replays))
        rows.append(_paged_row(copy_gbs, triton_ok, name, heads, kv_heads, head_dim, *mixed, pool_bytes, replays))
    return rows


def _paged_row(copy_gbs: float, triton_ok: bool, name: str, heads: int, kv_heads: int, head_dim: int, batch: int,
               context: int, rows_per_seq: int, pool_bytes: int = POOL_BYTES, replays: int = REPLAYS) -> dict:
    case = PagedCase(batch, context, heads, kv_heads, head_dim, rows_per_seq=rows_per_seq, seed=batch + context,
                     pool_bytes=pool_bytes)
    row = {"shape": name, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "batch": batch,
           "context": context, "rows_per_seq": rows_per_seq, "kv_mb": case.kv_bytes / 1e6, "tables": case.copies,
           "max_abs_diff_vs_torch": case.check()}
    paths = [("cuda", case.cuda), ("torch", case.torch_path)] + ([("triton", case.triton)] if triton_ok else [])
    for path, one in paths:
        ms, graphed = _time_ms(lambda: case.run_all(one), replays=replays)
        per_call = ms / case.copies
        row[f"{path}_us"] = per_call * 1e3
        row[f"{path}_gbs"] = case.kv_bytes / (per_call / 1e3) / 1e9
        row[f"{path}_graphed"] = graphed
    row["cuda_fraction_of_copy"] = row["cuda_gbs"] / copy_gbs
    print(f"{name:14s} {batch:4d} x {context:5d} x{rows_per_seq}: cuda {row['cuda_us']:8.1f} us "
          f"{row['cuda_gbs']:7.0f} GB/s ({100 * row['cuda_fraction_of_copy']:3.0f}% of copy)  "
          f"torch {row['torch_gbs']:6.0f} GB/s" + (f"  triton {row['triton_gbs']:6.0f} GB/s" if triton_ok else "")
          + f"  |diff| {row['max_abs_diff_vs_torch']:.1e}", flush=True)
    del case
    torch.cuda.empty_cache()
    return row


def engine_rates(streams: tuple[int, ...] = (1, 8, 32), out_len: int = OUT_LEN, prompt_len: int = PROMPT_LEN,
                 runs: int = 3) -> list[dict]:
    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine

    eng = build_engine(engine_config(dtype="float32", device="cuda", max_num_seqs=64))
    decode_rate(eng, 2, out_len, prompt_len)               # warm-up
    rows = []
    for path in ("cuda", "triton", "reference"):
        if path == "cuda" and not cuda_built():
            continue
        if path != "cuda":
            os.environ["STRATA_KERNELS"] = path
        try:
            decode_rate(eng, 2, out_len, prompt_len)       # warm-up (Triton compiles)
            row = {"path": path}
            for n in streams:
                row[f"decode_tokens_per_s_{n}"] = sorted(decode_rate(eng, n, out_len, prompt_len)
                                                         for _ in range(runs))[runs // 2]
        finally:
            os.environ.pop("STRATA_KERNELS", None)
        rows.append(row)
        print(f"engine on the GPU: {row}", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    copy = result["copy_bandwidth_gbs"]
    for ax, (name, *_rest) in zip(axes, HEAD_SHAPES):
        rows = [r for r in result["paged_attention"] if r["shape"] == name]
        labels = [f"{r['batch']}x{r['context']}" + ("" if r["rows_per_seq"] == 1 else f"\nx{r['rows_per_seq']} rows")
                  for r in rows]
        x = range(len(rows))
        paths = [p for p in ("cuda", "triton", "torch") if f"{p}_gbs" in rows[0]]
        w = 0.8 / len(paths)
        for j, p in enumerate(paths):
            ax.bar([i + (j - (len(paths) - 1) / 2) * w for i in x], [r[f"{p}_gbs"] for r in rows], w, label=p)
        ax.axhline(copy, color="gray", ls=":", label=f"copy {copy:.0f} GB/s")
        ax.axhline(copy * TARGET_FRACTION_OF_HBM, color="red", ls="--", label="target 70%")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set(ylabel="K/V GB/s", title=f"paged attention, {name} (fp32 KV)")
        ax.legend(fontsize=7)
    engine = result.get("engine_decode") or []
    ax = axes[2]
    if engine:
        streams = [k for k in engine[0] if k.startswith("decode_tokens_per_s_")]
        w = 0.8 / len(engine)
        for j, r in enumerate(engine):
            ax.bar([i + (j - (len(engine) - 1) / 2) * w for i in range(len(streams))], [r[s] for s in streams], w,
                   label=r["path"])
        ax.set_xticks(range(len(streams)), [s.rsplit("_", 1)[1] + " streams" for s in streams])
        ax.set(ylabel="decode tokens/s", title="engine on the GPU (float32, 128-token prompts)")
        ax.legend(fontsize=8)
    fig.suptitle(result["device"]["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kernels_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_args(p, "kernels_gpu")
    p.add_argument("--no-engine", action="store_true", help="skip the engine on the GPU")
    p.add_argument("--no-plot", action="store_true")
    # sizes without flags, which --smoke shrinks
    p.set_defaults(decode_sizes=DECODE_SIZES, mixed=MIXED, pool_bytes=POOL_BYTES, copy_mib=COPY_MIB, replays=REPLAYS,
                   streams=(1, 8, 32), prompt_len=PROMPT_LEN, out_len=OUT_LEN, engine_runs=3)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark runs on a GPU machine")
    smoke.resolve(a, decode_sizes=[(2, 256)], mixed=(2, 64, 5), pool_bytes=16 * 2**20, copy_mib=64, replays=1,
                  streams=(1, 2), prompt_len=16, out_len=2, engine_runs=1)
    try:
        import triton  # noqa: F401
        triton_ok = os.environ.get("TRITON_INTERPRET") != "1"
    except ImportError:
        triton_ok = False
    props = torch.cuda.get_device_properties(0)
    result: dict = {"device": {"name": props.name, "sms": props.multi_processor_count,
                               "memory_gb": props.total_memory / 1e9, "torch": torch.__version__,
                               "cuda_module": cuda_built()},
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": a.smoke}
    result["copy_bandwidth_gbs"] = copy_bandwidth_gbs(a.copy_mib, a.replays)
    print(f"{props.name}: copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s (read + write)", flush=True)
    result["paged_attention"] = paged_rows(result["copy_bandwidth_gbs"], triton_ok, a.decode_sizes, a.mixed,
                                           a.pool_bytes, a.replays)
    result["copy_bandwidth_gbs_after"] = copy_bandwidth_gbs(a.copy_mib, a.replays)
    big = [r for r in result["paged_attention"] if r["kv_mb"] >= 200 and r["rows_per_seq"] == 1]
    result["target"] = {"fraction_of_copy": TARGET_FRACTION_OF_HBM,
                        "cases_at_or_above_200_mb": len(big),
                        "cases_meeting_it": sum(r["cuda_fraction_of_copy"] >= TARGET_FRACTION_OF_HBM for r in big)}
    if not a.no_engine:
        result["engine_decode"] = engine_rates(tuple(a.streams), a.out_len, a.prompt_len, a.engine_runs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    if not (a.no_plot or a.smoke):
        plot(result, a.out.with_suffix(".png"))
    print(f"wrote {a.out}" + (" (a smoke run: its figures mean nothing)" if a.smoke else ""), flush=True)


if __name__ == "__main__":
    main()
