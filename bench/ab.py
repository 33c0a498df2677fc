"""Same-run A/B of two checkouts, alternating: decode through the inference service's gRPC API (1 and 32
streams, `--quantization gguf` and the default flags) and the gateway's cache-hit rate, as a change that
should not move them (a refactor) is checked.

    python -m bench.ab --before-dir ../base --before-python ../basevenv/bin/python [--rounds 3]

Each round runs one sample in the `before` checkout, then one in this one; every sample starts its own
servers (bench.strata.StrataServer, bench.cache.RedisAndCache and bench.gateway.Gateway of the checkout it
runs in). The `before` interpreter must import that checkout's code, not this one's: an editable install
redirects `services` and `kernels` to its own checkout, so use a plain venv whose .pth names the checkout
and this venv's site-packages (and copy the checkout's `_C` module and generated stubs in). Medians per
side and their ratio (after / before) go to JSON, with a plot where matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.serving import machine_info

_ROOT = Path(__file__).resolve().parent.parent
MARK = "ABSAMPLE "
# run with `python -c` in a checkout, so that the checkout's own bench and services are imported
SAMPLE = r'''
import argparse, json, os, tempfile
from bench.serving import bench_strata
from services.common import aio
out = {}
for flags in ("--quantization gguf", ""):
    a = argparse.Namespace(concurrency=[1, 32], prompt_len=128, output_len=64, num_prompts=0, prefill_prompts=8,
                           prefill_batch=8, repeats=1, dtype="auto", seed=0)
    for c, m in bench_strata(a, flags)["concurrency"].items():
        out[f"{flags.split()[-1] if flags else 'default'} decode tok/s, {c} stream(s)"] = m["decode_tokens_per_s"]
os.environ.setdefault("STRATA_TRACE_FILE", os.path.join(tempfile.mkdtemp(prefix="strata-ab-"), "traces.jsonl"))
os.environ.setdefault("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
os.environ.setdefault("OTEL_TRACES_SAMPLER_ARG", "0.01")
from bench.cache import RedisAndCache
from bench.gateway import Gateway, run
g = argparse.Namespace(rate=300.0, seconds=4.0, concurrency=64, questions=200, repeats=1, trace_sample=0.01)
with RedisAndCache() as svc, Gateway(svc.redis_port, svc.port) as gw:
    out["gateway cache hits/s"] = aio.run(run(svc.port, gw.port, g))["median"]["sustained_rps"]
print("ABSAMPLE " + json.dumps(out), flush=True)
'''


def sample(python: str, checkout: Path) -> dict[str, float]:
    done = subprocess.run([python, "-c", SAMPLE], cwd=checkout, capture_output=True, text=True)
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
    p.add_argument("--out", type=Path, default=Path("bench/results/ab.json"))
    a = p.parse_args(argv)
    git = lambda d: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=d, capture_output=True,  # noqa: E731
                                   text=True).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(a.rounds):
        runs["before"].append(sample(a.before_python, a.before_dir.resolve()))
        runs["after"].append(sample(sys.executable, _ROOT))
        print(f"round {i + 1}: before {runs['before'][-1]}\n         after  {runs['after'][-1]}", flush=True)
    median = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    result = {"before": git(a.before_dir), "after": git(_ROOT), "machine": machine_info(), "runs": runs,
              "median": median, "ratio": {k: median["after"][k] / median["before"][k] for k in median["after"]}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, r in result["ratio"].items():
        print(f"{k:40s} before {median['before'][k]:8.1f}  after {median['after'][k]:8.1f}  ratio {r:.3f}")
    try:
        plot(result, a.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing (the bench extra): no plot")


if __name__ == "__main__":
    main()
