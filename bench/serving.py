"""Serving benchmark: Strata through its gRPC API and through the gateway, against llama.cpp and HF
transformers, in one run.

    python -m bench.serving [--concurrency 1 8 32 64] [--paths grpc gateway] [--peers llama.cpp hf]
                            [--repeats 3] [--strata-args='--quantization int8' ...] [--smoke]

Each Strata configuration is measured three ways: through the gateway of `strata up`'s suite (gateway,
router, cache and one replica, each its own process; the cache bypassed, raw prompts); through that
replica's gRPC API (a client in this process); and in process as `strata generate` runs the engine
(bench/inprocess.py, a process of its own). The three run side by side and take turns, run by run, so the
host's drift lands on all of them alike. The JSON says what each path costs ("service": served / in
process, on the steady decode rate).

Per system and concurrency c: closed loop of --num-prompts requests (default c: one wave), c in
flight, every prompt exactly --prompt-len random word tokens (seeded: the peers see the sequence Strata's
paths share; never repeated, so no prefix-cache hits; each tokenizes back to itself, so the gateway's
text prompts are the same ids), greedy, EOS ignored, --output-len tokens each. Prefill: the same kind of
prompts with one output token, --prefill-batch at a time. Every measurement is repeated --repeats times; the JSON keeps
each run and reports the median. "memory_bandwidth": the one-stream decode rate as a share of what the
memory's copy rate allows (measured at the start and the end of the run) for the bytes a token reads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import random
import subprocess
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import smoke
from bench.metrics import PhaseResult, copy_bandwidth_gbs, median_of_runs, summarize

PEERS = ("llama.cpp", "hf")
DEFAULT_STRATA_CONFIGS = ("", "--quantization none")  # the defaults (the file's blocks on CPU), and dense weights
MEMORY_HEADROOM_MB = 200   # a quantized replica's RSS target: the file + its KV pool + this (issue 21)
TARGETS = (  # (name, peer, metric, concurrency, threshold): the least ratio of Strata (gRPC) to the peer (issue 21)
    ("single_stream_vs_llama.cpp", "llama.cpp", "output_tokens_per_s", 1, 1.8),
    ("32_streams_vs_llama.cpp", "llama.cpp", "output_tokens_per_s", 32, 3.0),
    ("prefill_vs_llama.cpp", "llama.cpp", "prefill", None, 4.0),
    ("ttft_p50_32_streams_vs_llama.cpp", "llama.cpp", "ttft_p50_speed", 32, 1.0),   # the peer's TTFT / Strata's
)
ARCHITECTURE_TARGETS = {  # other models' targets in place of TARGETS, by GGUF architecture (issue 22)
    "gemma3": (("single_stream_vs_llama.cpp", "llama.cpp", "output_tokens_per_s", 1, 1.3),
               ("32_streams_vs_llama.cpp", "llama.cpp", "output_tokens_per_s", 32, 1.5)),
}
SERVICE_TARGET = 0.9    # steady decode through gRPC / in process, at every concurrency (issue 21)
GATEWAY_TARGET = 0.85   # the same through the gateway (router, replica; the cache bypassed)
IN_PROCESS = "in-process "
VIA_GATEWAY = " via gateway"
PATHS = ("grpc", "gateway")
COPY_SIZE = {False: (5, 512), True: (1, 64)}    # the copy rate's repeats and buffer (MiB), by smoke mode


@functools.cache
def model_file():
    """The served GGUF, opened once (parsing its metadata takes seconds)."""
    from services.inference.models.gguf_file import GGUFFile, default_model_path

    return GGUFFile(default_model_path())


def word_tokens() -> dict[int, str]:
    """The model's " word" tokens (a space and 3-12 lowercase letters) that encode back to themselves alone.
    A prompt drawn from them is the same prompt as token ids (gRPC, in process, the peers) and as text (the
    gateway tokenizes what it is sent); plain words never trip the gateway's PII screen."""
    import re

    from services.inference.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(model_file())
    out = {}
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        if re.fullmatch(r" [a-z]{3,12}", text) and tok.encode(text, add_special_tokens=False) == [i]:
            out[i] = text
    return out


class PromptSource:
    """Fresh random prompts of word tokens from a seed: system after system draws the same sequence, and no
    prompt repeats (no prefix-cache hits)."""

    def __init__(self, seed: int, prompt_len: int, vocabulary: list[int]) -> None:
        self.rng = random.Random(seed)
        self.prompt_len = prompt_len
        self.vocabulary = vocabulary

    def take(self, n: int) -> list[list[int]]:
        return [self.rng.choices(self.vocabulary, k=self.prompt_len) for _ in range(n)]


RunPhase = Callable[[list[list[int]], int, int], PhaseResult]   # (prompts, max_tokens, concurrency)


@dataclass(frozen=True)
class Subject:
    """What one measurement runs: a system along one path (its key in the result), its label, its closed
    loop and its prefill."""
    key: str
    label: str
    run_phase: RunPhase
    prefill: Callable[[list[list[int]]], dict]


def measure_together(paths: list[Subject], a: argparse.Namespace) -> dict[str, dict]:
    """Every path at every concurrency, `a.repeats` times, the paths taking turns within each repeat (the
    order rotating from repeat to repeat): this host's speed drifts by 1.5x within minutes, and paths
    measured one after the other would put that drift into their ratios. Every run draws fresh prompts from
    one seeded source: the gRPC and gateway paths share a replica, and a prompt one of them had sent would be
    a prefix-cache hit for the other."""
    out = {p.key: {"label": p.label, "concurrency": {}} for p in paths}
    source = PromptSource(a.seed, a.prompt_len, sorted(a.words))

    def turns(r: int) -> list[Subject]:
        k = r % len(paths)
        return paths[k:] + paths[:k]

    for c in a.concurrency:
        n = a.num_prompts or c
        for p in paths:
            p.run_phase(source.take(min(c, 4)), 4, c)   # warm-up at this concurrency: first calls, contexts
        runs: dict[str, list[dict]] = {p.key: [] for p in paths}
        for r in range(a.repeats):
            for p in turns(r):
                run = summarize(p.run_phase(source.take(n), a.output_len, c))
                runs[p.key].append(run)
                print(f"  {p.label:<24} c={c:<3} run {r + 1}/{a.repeats}: {run['output_tokens_per_s']:7.1f} out tok/s, "
                      f"TTFT p50 {run['ttft_ms']['p50']:7.0f} ms, TPOT p50 {run['tpot_ms']['p50']:6.1f} ms", flush=True)
        for p in paths:
            out[p.key]["concurrency"][str(c)] = {**median_of_runs(runs[p.key]), "runs": runs[p.key]}
    prefills: dict[str, list[dict]] = {p.key: [] for p in paths}
    for r in range(a.repeats):
        for p in turns(r):
            prefills[p.key].append(p.prefill(source.take(a.prefill_prompts)))
    for p in paths:
        out[p.key]["prefill"] = {**median_of_runs(prefills[p.key]), "runs": prefills[p.key]}
        print(f"  {p.label:<24} prefill: {out[p.key]['prefill']['prompt_tokens_per_s']:7.1f} prompt tok/s", flush=True)
    return out


def measure(label: str, run_phase: RunPhase, prefill: Callable[[list[list[int]]], dict], a: argparse.Namespace,
            ) -> dict:
    """One system alone (the peers)."""
    return measure_together([Subject("", label, run_phase, prefill)], a)[""]


def _prefill_in_batches(prefill_s: Callable[[list[list[int]]], float], batch: int) -> Callable[[list[list[int]]], dict]:
    def run(prompts: list[list[int]]) -> dict:
        wall = sum(prefill_s(prompts[i:i + batch]) for i in range(0, len(prompts), batch))
        tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": tokens, "wall_s": wall, "prompt_tokens_per_s": tokens / wall}
    return run


def _prefill_with(run_phase: RunPhase, batch: int) -> Callable[[list[list[int]]], dict]:
    """Prefill through a closed-loop phase: one output token per prompt, `batch` in flight."""
    def run(prompts: list[list[int]]) -> dict:
        phase = run_phase(prompts, 1, batch)
        tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": tokens, "wall_s": phase.wall_s, "prompt_tokens_per_s": tokens / phase.wall_s}
    return run


def strata_key(strata_args: str) -> str:
    """The system's key in the result: `strata`, or `strata --quantization int8` for extra flags."""
    return " ".join(["strata", *strata_args.split()])


def bench_strata(a: argparse.Namespace, name: str, strata_args: str) -> dict[str, dict]:
    """One Strata configuration along the paths asked for, measured in turns (measure_together): the gateway
    of a suite, that suite's replica through its gRPC API (or a replica of its own without --paths gateway),
    and the engine in process. Keys: name, name + VIA_GATEWAY, IN_PROCESS + name."""
    from bench.inprocess import InProcessEngine
    from bench.strata import StrataServer, StrataSuite, model_info, run_gateway_phase, run_phase

    extra = strata_args.split()
    with contextlib.ExitStack() as stack:
        paths: list[Subject] = []
        if "gateway" in a.paths:
            print(f"{name}: starting the suite (gateway, router, cache, one replica)", flush=True)
            suite = stack.enter_context(StrataSuite(a.dtype, extra))
            replica = suite.replica
        else:
            print(f"{name}: starting the inference service", flush=True)
            replica = stack.enter_context(StrataServer(a.dtype, extra))
        info = model_info(replica)                       # "auto" resolved by the server
        if "grpc" in a.paths:
            run = lambda p, m, c: run_phase(replica, p, m, c)  # noqa: E731
            paths.append(Subject(name, f"Strata gRPC ({describe(info)})", run, _prefill_with(run, a.prefill_batch)))
        if "gateway" in a.paths:
            run = lambda p, m, c: run_gateway_phase(suite, ["".join(a.words[t] for t in x) for x in p], a.prompt_len, m, c)  # noqa: E731
            paths.append(Subject(name + VIA_GATEWAY, f"Strata gateway ({describe(info)})", run,
                                 _prefill_with(run, a.prefill_batch)))
        if not a.no_in_process:
            print(f"{name}: the engine in process, as `strata generate` runs it", flush=True)
            engine = stack.enter_context(InProcessEngine(a.dtype, extra))
            paths.append(Subject(IN_PROCESS + name, f"Strata in process ({engine.description})", engine.run_phase,
                                 _prefill_with(engine.run_phase, a.prefill_batch)))
        results = measure_together(paths, a)
        for key in results:
            if not key.startswith(IN_PROCESS):
                results[key]["resolved"] = resolved(info)
        if name in results:
            results[name]["memory"] = replica_memory(replica, info)
        return results


def resolved(info) -> dict:
    """What the replica's "auto" flags came to."""
    return {"quantization": info.quantization, "dtype": info.dtype}


def describe(info) -> str:
    """What a replica runs, as resolved: "gguf blocks" or the dense dtype."""
    return f"{info.quantization} blocks" if info.quantization else f"dense {info.dtype}"


def replica_memory(server, info) -> dict:
    """The replica's RSS after the run beside what it must hold: the model file and the KV pool."""
    from services.inference.engine.kv_layout import KVLayout
    from services.inference.models.registry import model_class

    path = model_file().path
    hp = model_class(model_file().architecture).hparams_from_gguf(model_file())
    dtype_bytes = {"float32": 4, "bfloat16": 2}[info.dtype]
    tensors = KVLayout.for_model(hp).num_tensors                      # every layer, or one group's (gemma3)
    kv = 2 * tensors * info.num_kv_blocks * info.block_size * hp.num_kv_heads * hp.head_dim * dtype_bytes
    out = {**server.memory_mb(), "model_file_mb": path.stat().st_size / 2**20, "kv_pool_mb": kv / 2**20,
           "quantization": info.quantization or "none"}
    out["target_mb"] = out["model_file_mb"] + out["kv_pool_mb"] + MEMORY_HEADROOM_MB
    out["torch_runtime_mb"] = torch_runtime_mb()
    return out


@functools.cache
def torch_runtime_mb() -> float:
    """The RSS of a bare Python that has imported torch (MiB): what any torch process holds before it loads
    anything (218 MiB on the 2-core hosts here), set beside the replica's headroom over file + KV pool."""
    code = "import torch; print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def bench_llamacpp(a: argparse.Namespace, gguf_path: Path) -> dict:
    from bench.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(str(gguf_path), a.threads, a.prompt_len + a.output_len)
    try:
        return measure(runner.label, runner.run_phase, _prefill_in_batches(runner.prefill_s, a.prefill_batch), a)
    finally:
        runner.close()


def bench_hf(a: argparse.Namespace, gguf_path: Path) -> dict:
    import torch

    from bench.hf import HFRunner

    torch.set_num_threads(a.threads)
    runner = HFRunner(str(gguf_path))
    return measure(runner.label, runner.run_phase, _prefill_in_batches(runner.prefill_s, a.prefill_batch), a)


def peer_missing(name: str) -> str | None:
    """Why a peer cannot run here, or None."""
    import importlib.util

    module, hint = {"llama.cpp": ("llama_cpp", "`make bench` installs llama-cpp-python (the bench extra)"),
                    "hf": ("transformers", "pip install -e '.[bench]'")}[name]
    return None if importlib.util.find_spec(module) else f"{module} is not installed: {hint}"


def ratios(systems: dict) -> dict:
    """Each Strata configuration over each peer: throughputs per concurrency, and prefill."""
    out: dict = {}
    for name, strata in systems.items():
        if not name.startswith("strata"):
            continue
        for peer in PEERS:
            if peer not in systems:
                continue
            p = systems[peer]
            r = {c: {**{k: strata["concurrency"][c][k] / p["concurrency"][c][k]
                        for k in ("output_tokens_per_s", "decode_tokens_per_s")},
                     "ttft_p50_speed": p["concurrency"][c]["ttft_ms"]["p50"] / strata["concurrency"][c]["ttft_ms"]["p50"]}
                 for c in strata["concurrency"] if c in p["concurrency"]}
            r["prefill"] = strata["prefill"]["prompt_tokens_per_s"] / p["prefill"]["prompt_tokens_per_s"]
            out[f"{name}/{peer}"] = r
    return out


def service_cost(systems: dict) -> dict:
    """Per Strata system served (gRPC, or the gateway) and concurrency: its figures over the same configuration's
    in process (1 = the service is free)."""
    out: dict = {}
    for name, served in systems.items():
        if not name.startswith("strata"):
            continue
        inproc = systems.get(IN_PROCESS + name.removesuffix(VIA_GATEWAY))
        if inproc is None:
            continue
        out[name] = {c: {k: served["concurrency"][c][k] / inproc["concurrency"][c][k]
                         for k in ("output_tokens_per_s", "decode_tokens_per_s", "steady_decode_tokens_per_s")}
                     for c in served["concurrency"] if c in inproc["concurrency"]}
    return out


def service_targets(cost: dict) -> dict:
    out = {}
    for name, per_c in cost.items():
        via = "gateway" if name.endswith(VIA_GATEWAY) else "service"
        config = name.removesuffix(VIA_GATEWAY)
        target = GATEWAY_TARGET if via == "gateway" else SERVICE_TARGET
        for c, r in per_c.items():
            out[f"{via}_vs_in_process_{c}_streams{'' if config == 'strata' else f' [{config}]'}"] = {
                "target": target, "ratio": round(r["steady_decode_tokens_per_s"], 3),
                "met": r["steady_decode_tokens_per_s"] >= target}
    return out


def targets(rs: dict, strata_names: list[str]) -> dict:
    """Per Strata configuration: each target's ratio and whether it is met (None: a system is missing)."""
    out = {}
    for strata in strata_names:
        for name, peer, key, c, threshold in ARCHITECTURE_TARGETS.get(model_file().architecture, TARGETS):
            r = rs.get(f"{strata}/{peer}")
            label = name if strata == "strata" else f"{name} [{strata}]"
            if r is None or (c is not None and str(c) not in r):
                out[label] = {"target": threshold, "ratio": None, "met": None}
                continue
            value = r["prefill"] if key == "prefill" else r[str(c)][key]
            out[label] = {"target": threshold, "ratio": round(value, 3), "met": value >= threshold}
    return out


def bytes_per_token(info, context: float) -> float:
    """Bytes one decode step of one stream reads: every weight once (a tied embedding once, as the LM head;
    the file's blocks when quantized, else its dense dtype) and the KV of `context` tokens."""
    from kernels.gguf_convert import fused_kernel_type, kernel_bytes
    from services.inference.models.llama import LlamaHParams
    from services.inference.models.quantize import projection_groups
    from services.inference.models.registry import model_class

    gguf = model_file()
    dtype_bytes = {"float32": 4, "bfloat16": 2}[info["dtype"]]
    fused_as = {name: fused_kernel_type(gguf.tensor_type(t) for t, _ in group)     # the type each is multiplied as
                for group in projection_groups(model_class(gguf.architecture), gguf) for name, _ in group}
    tensors = {n: gguf.raw_tensor(n) for n in gguf.tensor_names()}
    read = lambda n, t: kernel_bytes(t.tensor_type.name, int(t.n_bytes), int(t.n_elements),  # noqa: E731
                                     fused_as.get(n))                                          # as converted
    weights = sum(read(n, t) if info["quantization"] else int(t.n_elements) * dtype_bytes for n, t in tensors.items())
    hp = LlamaHParams.from_gguf(gguf)
    return weights + 2 * hp.num_layers * hp.num_kv_heads * hp.head_dim * dtype_bytes * context


def bandwidth_share(systems: dict, infos: dict, copy_gb_s: float, context: float) -> dict:
    """Per Strata system: its single-stream steady decode rate as a share of the memory-bandwidth bound (the
    copy rate / the bytes a token reads)."""
    out = {}
    for name, s in systems.items():
        info = infos.get(name.removeprefix(IN_PROCESS).removesuffix(VIA_GATEWAY))
        if info is None or "1" not in s["concurrency"]:
            continue
        per_token = bytes_per_token(info, context)
        bound = copy_gb_s * 1e9 / per_token
        rate = s["concurrency"]["1"]["steady_decode_tokens_per_s"]
        out[name] = {"bytes_per_token_mb": per_token / 1e6, "bound_tokens_per_s": bound,
                     "steady_decode_tokens_per_s": rate, "share": rate / bound}
    return out


def machine_info() -> dict:
    import torch

    cpu_model, flags = platform.processor(), set()
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu_model, flags = info.get("model name", cpu_model), set(info.get("flags", "").split())
    except OSError:
        pass
    # what decides the matmul paths: bf16 is emulated (slow) without AMX or AVX512-BF16
    features = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f in flags]
    features += [f"no {f}" for f in ("amx_tile", "avx512_bf16") if f not in flags]
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "llama_cpp"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    root = Path(__file__).resolve().parent.parent
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model, "cpu_features": features, "torch_threads": torch.get_num_threads(),
            "versions": versions, "git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def print_table(result: dict) -> None:
    systems = result["systems"]
    print(f"\n{'system':<26}{'c':>4}{'out tok/s':>11}{'decode tok/s':>14}{'TTFT p50/p99 ms':>18}"
          f"{'TPOT p50 ms':>13}{'ITL p50/p99 ms':>17}")
    for s in systems.values():
        for c, m in s["concurrency"].items():
            print(f"{s['label']:<26}{c:>4}{m['output_tokens_per_s']:>11.1f}{m['decode_tokens_per_s']:>14.1f}"
                  f"{m['ttft_ms']['p50']:>10.0f}/{m['ttft_ms']['p99']:<7.0f}{m['tpot_ms']['p50']:>13.1f}"
                  f"{m['itl_ms']['p50']:>10.1f}/{m['itl_ms']['p99']:<6.1f}")
        print(f"{s['label']:<26}{'prefill':>15}{s['prefill']['prompt_tokens_per_s']:>10.1f} prompt tok/s")
        if "memory" in s:
            m = s["memory"]
            print(f"{s['label']:<26} RSS {m['rss_mb']:.0f} MiB (peak {m['peak_rss_mb']:.0f}); file {m['model_file_mb']:.0f} "
                  f"+ KV pool {m['kv_pool_mb']:.0f} + {MEMORY_HEADROOM_MB} = {m['target_mb']:.0f} MiB; "
                  f"`import torch` alone: {m['torch_runtime_mb']:.0f} MiB")
    bw = result["memory_bandwidth"]
    for name, b in bw["systems"].items():
        print(f"{systems[name]['label']:<26} one stream: {b['steady_decode_tokens_per_s']:.1f} tok/s = {b['share']:.0%} of "
              f"the bound {b['bound_tokens_per_s']:.0f} ({bw['copy_gb_s']:.1f} GB/s copy / {b['bytes_per_token_mb']:.1f} MB a token)")
    for name, t in result["targets"].items():
        if t["met"] is None:
            print(f"target {name}: >= {t['target']}x: n/a (a system was not measured)")
        else:
            print(f"target {name}: >= {t['target']}x, got {t['ratio']:.2f}x: {'met' if t['met'] else 'MISSED'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=0, help="requests per run; 0 = the concurrency (one wave)")
    p.add_argument("--prefill-prompts", type=int, default=32, help="prompts per prefill run")
    p.add_argument("--prefill-batch", type=int, default=32, help="prompts in flight / per batch in prefill runs")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="Strata's dtype; auto = bfloat16 only where the CPU multiplies it natively (AMX, AVX512-BF16)")
    p.add_argument("--strata-args", action="append", metavar="FLAGS",
                   help="extra `strata serve inference` flags of one Strata configuration, as one string "
                        "(write --strata-args='--quantization int8'); repeat it to measure several; "
                        f"default: {' and '.join(repr(x) for x in DEFAULT_STRATA_CONFIGS)}")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="how each Strata configuration is reached: its replica's gRPC API, and the gateway "
                        "(`strata up`'s suite: gateway, router, one replica, the cache bypassed)")
    p.add_argument("--no-strata", action="store_true", help="peers only (debugging the peers)")
    p.add_argument("--no-in-process", action="store_true",
                   help="skip the in-process measurement of each Strata configuration (the service's yardstick)")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="peers' threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-path", type=Path, default=None,
                   help="the GGUF every system serves (default: Strata's, $STRATA_MODEL_PATH or SmolLM2); its "
                        "architecture picks the targets (gemma3: issue 22's) and the results' name "
                        "(bench/results/serving_<architecture>.json unless --out)")
    smoke.add_args(p, "serving")
    a = p.parse_args(argv)
    if a.model_path is not None and a.out is None and not a.smoke:
        # another model's results go beside SmolLM2's, never over them: serving_<architecture>.json
        from services.inference.models.gguf_file import GGUFFile
        a.out = smoke.RESULTS / f"serving_{GGUFFile(a.model_path).architecture}.json"
    if a.smoke and not a.strata_args:
        a.strata_args = [DEFAULT_STRATA_CONFIGS[0]]       # the defaults only
    smoke.resolve(a, concurrency=[1, 2], prompt_len=16, output_len=8, repeats=1, prefill_prompts=2, prefill_batch=2)
    if not a.strata_args:
        a.strata_args = list(DEFAULT_STRATA_CONFIGS)
    if a.repeats < 1 or a.prompt_len < 1 or a.output_len < 2 or min(a.concurrency) < 1:
        p.error("--repeats, --prompt-len, --concurrency must be >= 1 and --output-len >= 2")
    return a


def main(argv: list[str] | None = None) -> None:
    from services.inference.models.gguf_file import default_model_path

    a = parse_args(argv)
    if a.model_path is not None:          # the replicas, the suite and the peers all read it from here
        os.environ["STRATA_MODEL_PATH"] = str(a.model_path.resolve())
    gguf_path = default_model_path()
    systems: dict = {}
    skipped: dict = {}
    strata_names = [] if a.no_strata else [strata_key(args) for args in a.strata_args]
    a.words = word_tokens()
    copy_gb_s = copy_bandwidth_gbs(*COPY_SIZE[a.smoke])
    for name, args in zip(strata_names, a.strata_args):
        systems.update(bench_strata(a, name, args))
    for peer in a.peers:
        why = peer_missing(peer)
        if why:
            print(f"skipping {peer}: {why}", file=sys.stderr, flush=True)
            skipped[peer] = why
            continue
        print(f"{peer}: loading {gguf_path.name}", flush=True)
        systems[peer] = bench_llamacpp(a, gguf_path) if peer == "llama.cpp" else bench_hf(a, gguf_path)
    copy_gb_s = statistics.fmean([copy_gb_s, copy_bandwidth_gbs(*COPY_SIZE[a.smoke])])   # before and after: drift
    infos = {name.removesuffix(VIA_GATEWAY): s["resolved"] for name, s in systems.items() if "resolved" in s}
    rs = ratios(systems)
    cost = service_cost(systems)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
              if k not in ("out", "no_strata", "words")}
    result = {"config": {**config, "model": gguf_path.name}, "machine": machine_info(), "systems": systems,
              "skipped": skipped, "ratios": rs, "service": cost,
              "memory_bandwidth": {"copy_gb_s": copy_gb_s, "mean_context_tokens": a.prompt_len + a.output_len / 2,
                                   "systems": bandwidth_share(systems, infos, copy_gb_s, a.prompt_len + a.output_len / 2)},
              "targets": {**targets(rs, strata_names), **service_targets(cost)}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    if a.smoke:
        print(f"\nwrote {a.out} (a smoke run: its figures mean nothing)")
        return
    from bench.plot import plot

    png = a.out.with_suffix(".png")
    plot(result, png)
    print(f"\nwrote {a.out} and {png}")


if __name__ == "__main__":
    main()
