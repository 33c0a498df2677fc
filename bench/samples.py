"""Several samples of one prompt: `n` in one request (the prompt's KV blocks shared) against n separate requests.

    python -m bench.samples [--models smollm2 gemma] [--n 4 8] [--prompt-tokens 512] [--max-tokens 64]
                            [--repeats 3] [--smoke] [--out PATH]

The engine runs in process on the served path (the GGUF kernels), sampling at temperature 1 with a seed and
ignore_eos, so both ways generate the same number of tokens (checked). For each model and n, two runs alternate
--repeats times (this host drifts by up to 1.5x within minutes): one request with `n` samples, and n requests of
the same prompt submitted together, seeds seed + i (what a client without `n` sends). SmolLM2 has prefix caching
(emptied before each run): there the n requests already share the prompt's full blocks, which are registered when
the first request's chunk is scheduled, so the others find them in the same step, as in vLLM; `n` saves nothing
more there. Gemma 3 has sliding-window layers, so prefix caching is off (engine/kv_cache_manager.py), and only
`n` shares the prompt. Measured per run: the time until every
sample has its first token, the whole time, the tokens the model computed (prompt and generated), and the most
KV blocks in use at once. Medians, and the same-round ratio separate / n. JSON + PNG in bench/results/ (--out
moves both); --smoke: a seconds-long run (n 2, a 64-token prompt, 4 tokens, one round), the JSON only, to a
temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench import smoke
from bench.engines import MODELS, weights

TEXT = (Path(__file__).parents[1] / "tests" / "data" / "heldout.txt").read_text()


def _engine(model: str):
    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine

    kw = weights(model)
    return build_engine(engine_config(quantization="gguf", kv_cache_memory_gb=1.0, num_speculative_tokens=0), **kw)


def _prompt(engine, tokens: int) -> list[int]:
    words = TEXT.split()
    ids, take = [], 16
    while len(ids) < tokens and take <= len(words):
        text = " ".join(words[:take])
        if engine.tokenizer.chat_template is None:           # a pretrained model: a raw prompt
            ids = engine.tokenizer.encode(f"{text}\n\nIn summary,")
        else:
            ids = engine.tokenizer.encode(engine.render_chat([{"role": "user", "content": f"Summarise this:\n{text}"}]))
        take += 16
    return ids


def run(engine, prompt: list[int], n: int, max_tokens: int, together: bool, seed: int) -> dict:
    """One run: `n` samples in one request (together) or n requests; what it took."""
    from services.inference.sampling import SamplingParams

    computed = []
    schedule = engine.scheduler.schedule

    def counting():
        out = schedule()
        computed.append(out.num_batched_tokens)
        return out
    engine.scheduler.schedule = counting
    engine.scheduler.kv.pool.reset_prefix_cache()          # nothing left from the previous run
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=seed)
    t0 = time.perf_counter()
    try:
        if together:
            engine.add_request(prompt, SamplingParams(**{**_fields(params), "n": n}))
        else:
            for i in range(n):
                engine.add_request(prompt, SamplingParams(**{**_fields(params), "seed": seed + i}))
        first: dict[tuple[str, int], float] = {}
        tokens = 0
        peak = 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter() - t0
            stats = engine.stats()
            peak = max(peak, stats.num_total_blocks - stats.num_free_blocks)
            for out in outs:
                if out.new_token_ids:
                    first.setdefault((out.request_id, out.index), now)
                tokens += len(out.new_token_ids)
        total = time.perf_counter() - t0
    finally:
        del engine.scheduler.schedule
    assert len(first) == n and tokens == n * max_tokens, (len(first), tokens)
    return {"all_first_tokens_s": max(first.values()), "total_s": total, "computed_tokens": sum(computed),
            "peak_blocks": peak, "generated_tokens": tokens}


def measure(engine, prompt: list[int], n: int, max_tokens: int, repeats: int) -> dict:
    rounds = []
    for r in range(repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        got = {together: run(engine, prompt, n, max_tokens, together, seed=1000 * r) for together in order}
        rounds.append({"n": got[True], "separate": got[False]})
    med = lambda way, key: statistics.median(x[way][key] for x in rounds)  # noqa: E731
    keys = ("all_first_tokens_s", "total_s", "computed_tokens", "peak_blocks")
    return {"n": n, "prompt_tokens": len(prompt), "max_tokens": max_tokens,
            "prefix_caching": engine.scheduler.kv.enable_prefix_caching,
            "one_request": {k: med("n", k) for k in keys}, "separate": {k: med("separate", k) for k in keys},
            "ratio_separate_over_n": {k: statistics.median(x["separate"][k] / x["n"][k] for x in rounds) for k in keys},
            "rounds": rounds}


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    keys = [("all_first_tokens_s", "time to every first token, s"), ("total_s", "whole time, s"),
            ("computed_tokens", "tokens computed"), ("peak_blocks", "KV blocks in use at most")]
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, keys):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["one_request"][key] for r in rows], 0.4, label="one request, n samples")
        ax.bar([i + 0.2 for i in x], [r["separate"][key] for r in rows], 0.4, label="n requests")
        ax.set_xticks(list(x), [f"{r['model']}\nn={r['n']}" for r in rows], fontsize=7)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"n samples of a ~{rows[0]['prompt_tokens']}-token prompt, {rows[0]['max_tokens']} tokens each "
                 "(GGUF kernels; medians; SmolLM2 has prefix caching, Gemma 3 cannot)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.samples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--n", nargs="+", type=int, default=[4, 8])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per n")
    smoke.add_args(p, "samples")
    a = smoke.resolve(p.parse_args(argv), models=["smollm2"], n=[2], prompt_tokens=64, max_tokens=4, repeats=1)
    from bench.serving import machine_info

    rows = []
    for model in a.models:
        engine = _engine(model)
        prompt = _prompt(engine, a.prompt_tokens)
        for n in a.n:
            rows.append({"model": model, **measure(engine, prompt, n, a.max_tokens, a.repeats)})
            _report(rows[-1])
        del engine
    result = {"config": {"models": a.models, "n": a.n, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
                         "repeats": a.repeats, "quantization": "gguf", "smoke": a.smoke},
              "machine": machine_info(), "rows": rows}
    smoke.write(a, result, plot)


def _report(row: dict) -> None:
    one, sep, ratio, n = row["one_request"], row["separate"], row["ratio_separate_over_n"], row["n"]
    print(f"{row['model']:8s} n={n}: every first token {one['all_first_tokens_s']:.2f} s vs {sep['all_first_tokens_s']:.2f} s "
              f"(x{ratio['all_first_tokens_s']:.2f}), whole {one['total_s']:.2f} s vs {sep['total_s']:.2f} s "
              f"(x{ratio['total_s']:.2f}), computed {one['computed_tokens']:.0f} vs {sep['computed_tokens']:.0f} tokens, "
              f"peak {one['peak_blocks']:.0f} vs {sep['peak_blocks']:.0f} blocks", flush=True)


def _fields(p) -> dict:
    return {f: getattr(p, f) for f in p.__slots__}


if __name__ == "__main__":
    main()
