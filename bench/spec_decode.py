"""Speculative decoding benchmark: n-gram (prompt lookup) speculation against none, in one run.

    python -m bench.spec_decode [--quantization gguf] [--repeats 5] [--max-tokens 160] [--smoke] [--out PATH]

The engine runs in process (no gRPC: this isolates what speculation changes) with greedy decoding, so
both configurations produce the same tokens (checked). Single stream: input-grounded tasks (summarise,
extract from and rewrite a given passage; edit given code) and open-ended chat for contrast; decode
tokens/s = (tokens - 1) / (the time of the steps after the first, which computes the cached prompt's last
token and samples the first). 32 streams: the same tasks mixed, 64 tokens each, aggregate tokens/s. The two engines run
the same requests side by side, one step of each in turn with every step timed (this host's speed drifts
by up to 1.5x within seconds), for --repeats rounds; a speedup is the median of the per-round ratios.
Acceptance rate and tokens per verification step from the engine's counters.
Verification cost: the time of a single-stream step verifying k proposals against a plain step, k = 0..8,
and the per-row cost fitted to it (what --spec-row-cost should be on this machine). Targets
(issue 7): >= 2x on input-grounded tasks, >= 0.95x on open chat, no loss at 32 streams (>= 0.95x: the
run-to-run noise of this machine). Draft model (--draft-tasks, default all): a float32 target with the
same GGUF through the Q4_1/Q8_0 kernels as its draft, against the float32 target alone, single stream.
JSON + PNG in bench/results/ (--out moves both); --smoke: a short run at tiny sizes (one grounded and
one chat task, 8 tokens, one draft-model task, 2 streams of 4 tokens, 2 steps per verification size, one
round), the JSON only, to a temporary directory (bench/smoke.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench import smoke

PASSAGE = (
    "The Harbour Street library reopened on 14 March 2025 after an eighteen-month renovation that cost "
    "4.2 million euros. The building, first opened in 1911, now has a children's wing of 320 square metres, "
    "a roof garden and 48 study desks with power outlets. Opening hours were extended to 9 p.m. on weekdays, "
    "and the library expects 1,500 visitors a week, twice as many as before the works began. The city council "
    "paid for most of the project; a local foundation contributed 600,000 euros for the new reading room, "
    "which is named after the librarian Ada Brennan, who worked there from 1962 to 2001."
)
CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            averages.append(total / window)
    return averages
'''
TASKS = {
    "summarise": ("grounded", f"Summarise the following passage in three sentences.\n\n{PASSAGE}"),
    "extract": ("grounded", f"List every number and date in this passage, each with the sentence it comes from.\n\n{PASSAGE}"),
    "rewrite": ("grounded", f"Rewrite this passage in the past tense, changing nothing else.\n\n{PASSAGE}"),
    "code_edit": ("grounded", f"Add type hints and a docstring to this function. Reply with the full code.\n\n{CODE}"),
    "chat_story": ("chat", "Tell me a short story about a lighthouse keeper and a lost cat."),
    "chat_advice": ("chat", "What are five good habits for someone learning to cook?"),
}
TARGETS = {"grounded": 2.0, "chat": 0.95, "streams_32": 0.95}


def _engines(quantization: str | None, k: int):
    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine

    plain = build_engine(engine_config(dtype="float32", quantization=quantization, kv_cache_memory_gb=1.0))
    spec = build_engine(engine_config(dtype="float32", quantization=quantization, kv_cache_memory_gb=1.0,
                                      speculative="ngram", num_speculative_tokens=k), model=plain.model,
                        tokenizer=plain.tokenizer)
    return plain, spec


def interleaved(off_engine, on_engine, prompts: list[list[int]], params) -> dict:
    """Runs the same requests on both engines one step of each in turn, timing every step: this host's
    speed drifts by up to 1.5x within seconds, and stepping the two side by side gives both the same
    conditions. Per engine: decode tokens/s (the tokens after each request's first, over the steps
    after the first one, which prefills a cached prompt), aggregate tokens/s (all tokens over all step
    time) and the tokens."""
    runs = []
    for engine in (off_engine, on_engine):
        ids = [engine.add_request(p, params) for p in prompts]
        runs.append({"engine": engine, "ids": ids, "tokens": {i: [] for i in ids}, "step_s": []})
    while any(r["engine"].has_unfinished_requests() for r in runs):
        for r in runs:
            if not r["engine"].has_unfinished_requests():
                continue
            t0 = time.perf_counter()
            outs = r["engine"].step()
            r["step_s"].append(time.perf_counter() - t0)
            for out in outs:
                r["tokens"][out.request_id].extend(out.new_token_ids)
    result = []
    for r in runs:
        tokens = [r["tokens"][i] for i in r["ids"]]
        total = sum(map(len, tokens))
        result.append({"decode_tokens_per_s": (total - len(tokens)) / max(1e-9, sum(r["step_s"][1:])),
                       "tokens_per_s": total / max(1e-9, sum(r["step_s"])), "tokens": tokens})
    return result


def paired(off_engine, on_engine, prompts: list[list[int]], params, repeats: int, rate: str) -> dict:
    """`repeats` interleaved rounds (after one that puts the prompts in both prefix caches); the speedup
    is the median of the per-round ratios of `rate`."""
    interleaved(off_engine, on_engine, prompts, replace(params, max_tokens=1))
    offs, ons, ratios = [], [], []
    for _ in range(repeats):
        off, on = interleaved(off_engine, on_engine, prompts, params)
        offs.append(off[rate])
        ons.append(on[rate])
        ratios.append(on[rate] / off[rate])
    return {"off": statistics.median(offs), "on": statistics.median(ons), "speedup": statistics.median(ratios),
            "ratios": ratios, "identical_output": on["tokens"] == off["tokens"], "tokens": on["tokens"][0]}


def single_stream(off_engine, on_engine, prompt: list[int], max_tokens: int, repeats: int) -> dict:
    from services.inference.sampling import SamplingParams

    return paired(off_engine, on_engine, [prompt], SamplingParams(temperature=0, max_tokens=max_tokens), repeats,
                  "decode_tokens_per_s")


def spec_counts(before, after) -> dict:
    """Acceptance rate and tokens per verification step between two EngineStats."""
    drafts = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    runs = after.spec_drafts_total - before.spec_drafts_total
    return {"acceptance_rate": (after.spec_accepted_tokens_total - before.spec_accepted_tokens_total) / drafts
            if drafts else 0.0,
            "tokens_per_verification_step": (after.spec_emitted_tokens_total - before.spec_emitted_tokens_total) / runs
            if runs else 1.0}


def many_streams(off_engine, on_engine, prompts: list[list[int]], max_tokens: int, repeats: int) -> dict:
    from services.inference.sampling import SamplingParams

    return paired(off_engine, on_engine, prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                  repeats, "tokens_per_s")


def verification_cost(engine, prompt: list[int], max_k: int = 8, steps: int = 15, repeats: int = 3) -> dict:
    """Step time of one request verifying k fixed proposals (all rejected: the cost does not depend on the
    outcome) relative to a plain step, k = 0..max_k, each k timed in every round; and the per-row cost c
    of C(k) = 1 + c k fitted over the k whose rows fit one pass of the GEMV kernels (k + 1 <= 8)."""
    from services.inference.sampling import SamplingParams

    class Fixed:                                   # proposes `k` copies of one token
        k = 0

        def propose(self, requests, ks):
            return [[5] * min(self.k, k) for k in ks]

        def release(self, request_id):
            pass

    saved = engine.proposer, engine.config
    engine.proposer = Fixed()
    engine.config = engine.config.with_settings(num_speculative_tokens=max_k, spec_row_cost=0.0)
    times: dict[int, list[float]] = {k: [] for k in range(max_k + 1)}
    try:
        for _ in range(repeats):
            for k in times:
                engine.proposer.k = k
                rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=steps + max_k + 2, ignore_eos=True))
                engine.step()                                            # prefill (cached prompt)
                per_step = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    engine.step()
                    per_step.append(time.perf_counter() - t0)
                engine.abort_request(rid)
                times[k].append(statistics.median(per_step))
    finally:
        engine.proposer, engine.config = saved
    base = statistics.median(times[0])
    relative = {k: statistics.median(v) / base for k, v in times.items()}
    fit = [k for k in relative if 1 <= k <= 7]
    row_cost = sum(k * (relative[k] - 1) for k in fit) / sum(k * k for k in fit)
    return {"plain_step_ms": base * 1e3, "relative_step_time": relative, "fitted_row_cost": row_cost,
            "configured_row_cost": saved[1].spec.spec_row_cost}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["single_stream"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["tokens_per_s_off"] for r in rows], 0.4, label="no speculation", color="tab:gray")
    ax.bar([i + 0.2 for i in x], [r["tokens_per_s_ngram"] for r in rows], 0.4, label="n-gram speculation",
           color=["tab:blue" if r["kind"] == "grounded" else "tab:orange" for r in rows])
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["tokens_per_s_ngram"], f"x{r['speedup']:.2f}\nacc {r['acceptance_rate']:.2f}",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [r["task"] for r in rows], fontsize=8)
    ax.set(ylabel="decode tokens/s, 1 stream", title=f"n-gram speculation, {result['config']['quantization']} (same run)")
    ax.legend(fontsize=8)
    s = result["streams_32"]
    ax2.bar([0, 1], [s["tokens_per_s_off"], s["tokens_per_s_ngram"]], color=["tab:gray", "tab:blue"])
    ax2.set_xticks([0, 1], ["off", "ngram"])
    ax2.set(title=f"32 streams: x{s['speedup']:.2f}", ylabel="aggregate tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.spec_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantization", choices=["none", "int8", "gguf"], default="gguf",
                   help="the target's precision (default gguf: the fastest single stream here)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--repeats", type=int, default=5, help="alternating off/on rounds per measurement")
    p.add_argument("--draft-tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                   help="tasks for the draft-model comparison (float32 target; none: skip it)")
    p.add_argument("--draft-max-tokens", type=int, default=96)
    smoke.add_args(p, "spec_decode")
    # sizes without flags, which --smoke shrinks
    p.set_defaults(tasks=list(TASKS), streams=32, stream_tokens=64, verify_steps=15)
    a = smoke.resolve(p.parse_args(argv), max_tokens=8, repeats=1, draft_tasks=["summarise"], draft_max_tokens=8,
                      tasks=["summarise", "chat_story"], streams=2, stream_tokens=4, verify_steps=2)
    from bench.serving import machine_info

    quant = None if a.quantization == "none" else a.quantization
    plain, spec = _engines(quant, a.num_speculative_tokens)
    render = lambda text: plain.tokenizer.encode(plain.render_chat([{"role": "user", "content": text}]))  # noqa: E731
    rows = []
    for task in a.tasks:
        kind, text = TASKS[task]
        prompt = render(text)
        before = spec.stats()
        r = single_stream(plain, spec, prompt, a.max_tokens, a.repeats)
        row = {"task": task, "kind": kind, "prompt_tokens": len(prompt), "output_tokens": len(r["tokens"]),
               "tokens_per_s_off": r["off"], "tokens_per_s_ngram": r["on"], "speedup": r["speedup"],
               "round_speedups": r["ratios"], "identical_output": r["identical_output"],
               **spec_counts(before, spec.stats())}
        rows.append(row)
        print(f"{task:12s} {kind:8s} off {r['off']:6.1f} tok/s  ngram {r['on']:6.1f} tok/s  x{row['speedup']:.2f}  "
              f"acceptance {row['acceptance_rate']:.2f}  tokens/step {row['tokens_per_verification_step']:.2f}  "
              f"identical {row['identical_output']}", flush=True)
    draft_rows = []
    if a.draft_tasks:
        from services.inference.config import engine_config
        from services.inference.engine.factory import build_engine
        from services.inference.models.gguf_file import GGUFFile, default_model_path
        from services.inference.models.registry import load_model

        target = build_engine(engine_config(dtype="float32", kv_cache_memory_gb=1.0), tokenizer=plain.tokenizer)
        gguf_model = plain.model if quant == "gguf" else load_model(GGUFFile(default_model_path()), quantization="gguf")
        drafted = build_engine(engine_config(dtype="float32", kv_cache_memory_gb=1.0, speculative="draft",
                                             num_speculative_tokens=a.num_speculative_tokens),
                               model=target.model, tokenizer=plain.tokenizer, draft_model=gguf_model)
        for task in a.draft_tasks:
            kind, text = TASKS[task]
            prompt = render(text)
            before = drafted.stats()
            r = single_stream(target, drafted, prompt, a.draft_max_tokens, a.repeats)
            row = {"task": task, "kind": kind, "tokens_per_s_off": r["off"], "tokens_per_s_draft": r["on"],
                   "speedup": r["speedup"], "round_speedups": r["ratios"], "identical_output": r["identical_output"],
                   **spec_counts(before, drafted.stats())}
            draft_rows.append(row)
            print(f"draft {task:12s} float32 {r['off']:6.1f} tok/s  + gguf draft {r['on']:6.1f} tok/s  x{row['speedup']:.2f}  "
                  f"acceptance {row['acceptance_rate']:.2f}  identical {row['identical_output']}", flush=True)
        del target, drafted
    cost = verification_cost(spec, render(TASKS["chat_story"][1]), steps=a.verify_steps, repeats=a.repeats)
    print("verification step time / plain step, by k: " +
          " ".join(f"{k}:{v:.2f}" for k, v in cost["relative_step_time"].items()) +
          f"; fitted row cost {cost['fitted_row_cost']:.3f} (configured {cost['configured_row_cost']})", flush=True)
    prompts = [render(TASKS[t][1]) for t in a.tasks for _ in range(a.streams // len(a.tasks) + 1)][:a.streams]
    r = many_streams(plain, spec, prompts, a.stream_tokens, a.repeats)
    streams = {"streams": a.streams, "tokens_per_s_off": r["off"], "tokens_per_s_ngram": r["on"],
               "speedup": r["speedup"], "round_speedups": r["ratios"], "identical_output": r["identical_output"]}
    print(f"{a.streams} streams: off {r['off']:.1f} tok/s, ngram {r['on']:.1f} tok/s, x{r['speedup']:.2f}", flush=True)

    def geomean(xs: list[float]) -> float:
        return statistics.geometric_mean(xs) if xs else float("nan")
    grounded = geomean([r["speedup"] for r in rows if r["kind"] == "grounded"])
    chat = geomean([r["speedup"] for r in rows if r["kind"] == "chat"])
    targets = {"grounded_speedup": {"target": TARGETS["grounded"], "value": grounded, "met": grounded >= TARGETS["grounded"]},
               "chat_speedup": {"target": TARGETS["chat"], "value": chat, "met": chat >= TARGETS["chat"]},
               "streams_32_speedup": {"target": TARGETS["streams_32"], "value": streams["speedup"],
                                      "met": streams["speedup"] >= TARGETS["streams_32"]}}
    result = {"config": {"quantization": a.quantization, "num_speculative_tokens": a.num_speculative_tokens,
                         "max_tokens": a.max_tokens, "repeats": a.repeats, "smoke": a.smoke,
                         "spec_max_batch": spec.config.spec.spec_max_batch,
                         "ngram": [spec.config.spec.ngram_min, spec.config.spec.ngram_max]},
              "machine": machine_info(), "single_stream": rows, "verification_cost": cost,
              "streams_32": streams, "draft_model": draft_rows,
              "targets": targets}
    print(f"grounded x{grounded:.2f} (target {TARGETS['grounded']}), chat x{chat:.2f} (target {TARGETS['chat']})")
    smoke.write(a, result, plot)


if __name__ == "__main__":
    main()
