"""Same-run A/B of two checkouts, alternating: decode through the inference service's gRPC API (1 and 32
streams, `--quantization gguf` and the default flags) and the gateway's cache-hit rate, as a change that
should not move them (a refactor) is checked.

    python -m bench.ab --before-dir ../base --before-python ../basevenv/bin/python [--rounds 3] [--smoke]
                       [--out PATH]

Each round runs one sample in the `before` checkout, then one in this one; every sample starts its own
servers (bench.strata.StrataServer, bench.cache.RedisAndCache and bench.gateway.Gateway of the checkout it
runs in). The `before` interpreter must import that checkout's code, not this one's: an editable install
redirects `services` and `kernels` to its own checkout, so use a plain venv whose .pth names the checkout
and this venv's site-packages (and copy the checkout's `_C` module and generated stubs in). Medians per
side and their ratio (after / before) go to JSON (default bench/results/ab.json), with a plot beside it
where matplotlib is installed. --smoke: one round of tiny samples on both sides (the default flags only,
1 and 2 streams of 16-token prompts, 8 tokens each, no gateway sample), the JSON only, to a
temporary directory (bench/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench import smoke
from bench.serving import machine_info

_ROOT = Path(__file__).resolve().parent.parent
MARK = "ABSAMPLE "
# a sample's sizes (SAMPLE's argument, as JSON): a full run's, and a smoke run's
SIZES = {"flags": ["--quantization gguf", ""], "concurrency": [1, 32], "prompt_len": 128, "output_len": 64,
         "prefill_prompts": 8, "gateway": {"rate": 300.0, "seconds": 4.0, "concurrency": 64, "questions": 200}}
SMOKE_SIZES = {"flags": [""], "concurrency": [1, 2], "prompt_len": 16, "output_len": 8, "prefill_prompts": 2,
               "gateway": None}           # no gateway sample: `bench.gateway --smoke` runs that code
# run with `python -c` in a checkout, so that the checkout's own bench and services are imported
SAMPLE = r'''
import argparse, inspect, json, os, sys, tempfile
import bench.serving
from bench.serving import bench_strata
from services.common import aio
size = json.loads(sys.argv[1])
out = {}
# a checkout whose serving benchmark draws its prompts from the model's word tokens needs them given
words = bench.serving.word_tokens() if hasattr(bench.serving, "word_tokens") else None
for flags in size["flags"]:
    a = argparse.Namespace(concurrency=size["concurrency"], prompt_len=size["prompt_len"],
                           output_len=size["output_len"], num_prompts=0, prefill_prompts=size["prefill_prompts"],
                           prefill_batch=size["prefill_prompts"], repeats=1, dtype="auto", seed=0)
    if words is not None:
        a.words = words
    a.paths, a.no_in_process = ["grpc"], True
    if len(inspect.signature(bench_strata).parameters) == 3:    # (a, name, flags): the paths of one configuration
        result = bench_strata(a, "strata", flags)["strata"]
    else:                                                        # (a, flags): a checkout from before that
        result = bench_strata(a, flags)
    for c, m in result["concurrency"].items():
        out[f"{flags.split()[-1] if flags else 'default'} decode tok/s, {c} stream(s)"] = m["decode_tokens_per_s"]
os.environ.setdefault("STRATA_TRACE_FILE", os.path.join(tempfile.mkdtemp(prefix="strata-ab-"), "traces.jsonl"))
os.environ.setdefault("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
os.environ.setdefault("OTEL_TRACES_SAMPLER_ARG", "0.01")
from bench.cache import RedisAndCache
from bench.gateway import Gateway, run
if size["gateway"]:
    g = argparse.Namespace(**size["gateway"], repeats=1, trace_sample=0.01)
    with RedisAndCache() as svc, Gateway(svc.redis_port, svc.port) as gw:
        out["gateway cache hits/s"] = aio.run(run(svc.port, gw.port, g))["median"]["sustained_rps"]
print("ABSAMPLE " + json.dumps(out), flush=True)
'''


def sample(python: str, checkout: Path, size: dict = SIZES) -> dict[str, float]:
    done = subprocess.run([python, "-c", SAMPLE, json.dumps(size)], cwd=checkout, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith(MARK)]
    if done.returncode or not lines:
        raise RuntimeError(f"the sample in {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["ratio"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, [result["ratio"][n] for n in names], color="tab:blue")
    ax.axvline(1.0, color="black", lw=1)
    for i, n in enumerate(names):
        runs = result["runs"]
        for side, x in (("before", 0.0), ("after", 0.15)):
            spread = [r[n] for r in runs[side]]
            ax.text(1.02, i + x - 0.1, f"{side} {min(spread):.0f}-{max(spread):.0f}", fontsize=7)
    ax.set(xlabel="after / before (medians)", title=f"A/B {result['before']} -> {result['after']}", xlim=(0, 1.6))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before-dir", type=Path, required=True, help="the checkout measured as `before`")
    p.add_argument("--before-python", required=True, help="an interpreter importing that checkout's code")
    p.add_argument("--rounds", type=int, default=3)
    smoke.add_args(p, "ab")
    p.set_defaults(size=SIZES)              # a sample's sizes, which --smoke shrinks
    a = smoke.resolve(p.parse_args(argv), rounds=1, size=SMOKE_SIZES)
    git = lambda d: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=d, capture_output=True,  # noqa: E731
                                   text=True).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(a.rounds):
        runs["before"].append(sample(a.before_python, a.before_dir.resolve(), a.size))
        runs["after"].append(sample(sys.executable, _ROOT, a.size))
        print(f"round {i + 1}: before {runs['before'][-1]}\n         after  {runs['after'][-1]}", flush=True)
    median = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    result = {"before": git(a.before_dir), "after": git(_ROOT), "smoke": a.smoke, "machine": machine_info(),
              "runs": runs, "median": median,
              "ratio": {k: median["after"][k] / median["before"][k] for k in median["after"]}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, r in result["ratio"].items():
        print(f"{k:40s} before {median['before'][k]:8.1f}  after {median['after'][k]:8.1f}  ratio {r:.3f}")
    if a.smoke:
        print(f"wrote {a.out} (a smoke run: its figures mean nothing)")
        return
    try:
        plot(result, a.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing (the bench extra): no plot")


if __name__ == "__main__":
    main()
