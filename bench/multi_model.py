"""Two real models behind one gateway: the cascade table, and premium time to first token under a
saturating free-tier load.

    python -m bench.multi_model [--threshold -1.0] [--free-clients 16] [--load-seconds 20] [--smoke] [--out PATH]

`strata up` runs the default suite, every service in its own process: SmolLM2-135M-Instruct (the small,
cheap model: $0.01 / $0.02 per 1k prompt / completion tokens) and Gemma 3 270M pretrained (the larger one:
$0.02 / $0.04), one replica each, with a models file that adds a cascade SmolLM2 → Gemma at --threshold
(mean token log-probability) and the default tiers.

Cascade, on the labelled completions of bench/data/cascade_prompts.jsonl (greedy, 8 tokens, cache bypassed):
each prompt is streamed to each model alone (its answer, whether it contains a labelled answer, tokens,
time to first token and to the whole answer, and SmolLM2's mean log-probability), then sent once as a
unary call with the cascade configured (escalated or not, its time to the answer). From the per-prompt
figures the table gives, for a sweep of thresholds, the fraction escalated, accuracy, tokens and cost
against always asking Gemma, and the time to the answer; the live cascade calls check the row at
--threshold.

Premium under load: a premium key's time to first token (a 2-token chat to SmolLM2, streamed) idle
(--ttft-samples), then while --free-clients free-tier keys (bench/load.py, a process of their own) keep
SmolLM2 saturated with 32-token completions, each retrying after the retry-after it is given (at most
0.25 s). Every free request is counted as answered, refused (RESOURCE_EXHAUSTED with retry-after) or other
(lost: must be 0).

JSON + PNG in bench/results/ (--out moves both). --smoke: a few prompts and seconds, the JSON only, with
SmolLM2's file behind both names (no Gemma to load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import smoke
from bench.serving import machine_info

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "bench" / "data" / "cascade_prompts.jsonl"
SMALL, LARGE = "SmolLM2-135M-Instruct", "gemma-3-270m"
PRICES = {SMALL: (0.01, 0.02), LARGE: (0.02, 0.04)}
THRESHOLDS = (-0.25, -0.5, -0.75, -1.0, -1.25, -1.5, -2.0, -2.5, -3.0)
MAX_TOKENS = 8
NOTES = ("SmolLM2-135M-Instruct and Gemma 3 270M pretrained are both far below the models a cascade is for; the "
         "labelled prompts are short factual completions whose answers either model may or may not know, scored by "
         "whether the 8-token continuation contains a labelled answer. The table shows the mechanism (what fraction "
         "escalates at each threshold, what it saves against always asking the larger model, what it costs in time) "
         "and whether the small model's mean token log-probability tells its right answers from its wrong ones on "
         "this set. It says nothing about answer quality on open-ended tasks, about larger models, or about prompts "
         "unlike these.")


class Suite:
    """`strata up` with the default suite and a cascade, in a process group of its own."""

    def __init__(self, run_dir: Path, threshold: float, smoke: bool = False) -> None:
        self.run_dir = run_dir
        models = (ROOT / "deploy" / "models.toml").read_text()
        if smoke:   # the same names, both served by SmolLM2's file: no second model to load for a smoke run
            models = models.replace('file = "gemma-3-270m-q4_k_m"', 'file = ""')
        self.models_file = run_dir / "models.toml"
        self.models_file.write_text(models + f'\n[cascades.{SMALL}]\nto = "{LARGE}"\nmin_mean_logprob = {threshold}\n')
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("STRATA_", "OTEL_"))}
        self.env.update({"STRATA_RUN_DIR": str(run_dir / "run"), "STRATA_TRACE_FILE": "off",
                         "STRATA_KEY_PEPPER": "bench-pepper-0123456789abcdef", "STRATA_ADMIN_TOKEN": "bench-admin"})
        self.ready = threading.Event()
        self.lines: list[str] = []

    def __enter__(self) -> "Suite":
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--free-ports", "--quiet",
                                      "--models-file", str(self.models_file)], cwd=ROOT, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(600):
            self.__exit__()
            raise SystemExit("strata up did not get ready:\n" + "\n".join(self.lines[-30:]))
        env = dict(line.split("=", 1) for line in (self.run_dir / "run" / "env").read_text().splitlines())
        self.gateway, self.key = env["STRATA_GATEWAY_ADDRESS"], env["STRATA_API_KEY"]
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if line.startswith(">> READY"):
                self.ready.set()

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(2)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def correct(text: str, answers: list[str]) -> bool:
    return any(a.lower() in text.lower() for a in answers)


async def measure(a: argparse.Namespace, suite: Suite) -> dict:
    import grpc

    from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc

    async with grpc.aio.insecure_channel(suite.gateway) as ch:
        gw, admin = gateway_pb2_grpc.GatewayStub(ch), gateway_pb2_grpc.GatewayAdminStub(ch)
        admin_md = (("authorization", f"Bearer {suite.env['STRATA_ADMIN_TOKEN']}"),)

        async def key(tier: str, tenant: str) -> tuple:
            r = await admin.CreateKey(gateway_pb2.CreateKeyRequest(tenant=tenant, tier=tier), metadata=admin_md)
            return (("authorization", f"Bearer {r.key}"),)

        def request(model: str, prompt: str = "", chat: str = "", max_tokens: int = MAX_TOKENS):
            kw = {"messages": common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=chat)])} \
                if chat else {"prompt": prompt}
            return gateway_pb2.GatewayRequest(model=model, sampling=common_pb2.SamplingParams(
                temperature=0.0, max_tokens=max_tokens), cache_policy=common_pb2.CACHE_POLICY_BYPASS, **kw)

        async def stream(req, md) -> dict:
            t0, first, text, last = time.perf_counter(), None, [], None
            async for c in gw.GenerateStream(req, metadata=md, timeout=120):
                if first is None and c.token_ids:
                    first = time.perf_counter() - t0
                text.append(c.text)
                last = c
            return {"text": "".join(text), "ttft_s": first, "latency_s": time.perf_counter() - t0,
                    "prompt_tokens": last.usage.prompt_tokens, "completion_tokens": last.usage.completion_tokens,
                    "mean_logprob": last.mean_logprob if last.HasField("mean_logprob") else None}

        md = await key("standard", "bench")
        prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()][:a.num_prompts]
        rows = []
        for p in prompts:
            small = await stream(request(SMALL, p["prompt"]), md)
            large = await stream(request(LARGE, p["prompt"]), md)
            t0 = time.perf_counter()
            live = await gw.Generate(request(SMALL, p["prompt"]), metadata=md, timeout=120)
            rows.append({"prompt": p["prompt"], "answers": p["answers"],
                         "small": {**small, "correct": correct(small["text"], p["answers"])},
                         "large": {**large, "correct": correct(large["text"], p["answers"])},
                         "live_cascade": {"model": live.source.model, "route": live.source.route,
                                          "escalated": live.source.model == LARGE,
                                          "latency_s": time.perf_counter() - t0}})
            print(f"  {p['prompt'][:40]:<40} small {rows[-1]['small']['correct']!s:<5} "
                  f"({small['mean_logprob']:.2f})  large {rows[-1]['large']['correct']!s:<5}  "
                  f"live {'escalated' if rows[-1]['live_cascade']['escalated'] else 'kept'}", flush=True)

        # premium time to first token, idle and under a saturating free-tier load
        premium = await key("premium", "vip")
        free = [await key("free", f"free{i}") for i in range(a.free_clients)]

        async def premium_ttfts(n: int) -> list[float]:
            return [(await stream(request(SMALL, chat="Name a colour.", max_tokens=2), premium))["ttft_s"] for _ in range(n)]
        await premium_ttfts(2)
        idle = await premium_ttfts(a.ttft_samples)
        tokens = [md[0][1].removeprefix("Bearer ") for md in free]
        load = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.load", "--gateway", suite.gateway, "--keys", ",".join(tokens), "--model", SMALL,
            "--seconds", str(a.load_seconds + 2.0), "--max-tokens", "32", stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        await load.stdout.readline()                       # "load started"
        await asyncio.sleep(2.0)
        loaded, t_end = [], time.monotonic() + a.load_seconds
        while time.monotonic() < t_end and len(loaded) < 10 * a.ttft_samples:
            loaded += await premium_ttfts(1)
            await asyncio.sleep(0.1)
        listed = await admin.ListModels(gateway_pb2.ListModelsRequest(), metadata=admin_md)
        small_state = next(m for m in listed.models if m.name == SMALL)
        outcomes = json.loads((await load.communicate())[0].decode().splitlines()[-1])
    return {"rows": rows, "premium": {
        "idle_ttft_s": idle, "loaded_ttft_s": loaded, "idle_ttft_p50_s": statistics.median(idle),
        "loaded_ttft_p50_s": statistics.median(loaded),
        "ratio_p50": statistics.median(loaded) / statistics.median(idle),
        "free_requests": outcomes, "small_model_at_the_end": {"running": small_state.running,
                                                              "waiting": small_state.waiting}}}


def cost(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    p, c = PRICES[model]
    return (prompt_tokens * p + completion_tokens * c) / 1000


def table(rows: list[dict], threshold: float) -> dict:
    """Per threshold: what the cascade would do with these answers (escalate iff the small answer's mean
    log-probability < t), against always the small model and always the large one."""
    n = len(rows)

    def tokens(r, side):
        return r[side]["prompt_tokens"] + r[side]["completion_tokens"]
    always_large_cost = sum(cost(LARGE, r["large"]["prompt_tokens"], r["large"]["completion_tokens"]) for r in rows)
    always_large_tokens = sum(tokens(r, "large") for r in rows)
    sweep = []
    for t in sorted({*THRESHOLDS, threshold}):
        up = [r["small"]["mean_logprob"] is not None and r["small"]["mean_logprob"] < t for r in rows]
        acc = sum(r["large"]["correct"] if e else r["small"]["correct"] for r, e in zip(rows, up)) / n
        c = sum(cost(SMALL, r["small"]["prompt_tokens"], r["small"]["completion_tokens"])
                + (cost(LARGE, r["large"]["prompt_tokens"], r["large"]["completion_tokens"]) if e else 0)
                for r, e in zip(rows, up))
        tok = sum(tokens(r, "small") + (tokens(r, "large") if e else 0) for r, e in zip(rows, up))
        wait = [r["small"]["latency_s"] + (r["large"]["latency_s"] if e else 0) for r, e in zip(rows, up)]
        sweep.append({"threshold": t, "escalated": sum(up) / n, "accuracy": acc, "cost_usd": c,
                      "cost_saved_vs_large": 1 - c / always_large_cost, "tokens": tok,
                      "tokens_saved_vs_large": 1 - tok / always_large_tokens,
                      "time_to_answer_p50_s": statistics.median(wait)})
    live = [r["live_cascade"]["escalated"] for r in rows]
    predicted = [r["small"]["mean_logprob"] is not None and r["small"]["mean_logprob"] < threshold for r in rows]
    right = [r["small"]["mean_logprob"] for r in rows if r["small"]["correct"]]
    wrong = [r["small"]["mean_logprob"] for r in rows if not r["small"]["correct"]]
    return {
        "always_small": {"accuracy": sum(r["small"]["correct"] for r in rows) / n,
                         "ttft_p50_s": statistics.median(r["small"]["ttft_s"] for r in rows),
                         "time_to_answer_p50_s": statistics.median(r["small"]["latency_s"] for r in rows)},
        "always_large": {"accuracy": sum(r["large"]["correct"] for r in rows) / n, "cost_usd": always_large_cost,
                         "tokens": always_large_tokens,
                         "ttft_p50_s": statistics.median(r["large"]["ttft_s"] for r in rows),
                         "time_to_answer_p50_s": statistics.median(r["large"]["latency_s"] for r in rows)},
        "sweep": sweep,
        "live": {"threshold": threshold, "escalated": sum(live) / n,
                 "agrees_with_the_table": sum(x == y for x, y in zip(live, predicted)) / n,
                 "time_to_answer_p50_s": statistics.median(r["live_cascade"]["latency_s"] for r in rows)},
        "small_mean_logprob": {"right_p50": statistics.median(right) if right else None,
                               "wrong_p50": statistics.median(wrong) if wrong else None},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    sweep = result["cascade"]["sweep"]
    t = [s["threshold"] for s in sweep]
    ax1.plot(t, [s["escalated"] for s in sweep], "o-", label="escalated")
    ax1.plot(t, [s["accuracy"] for s in sweep], "s-", label="cascade accuracy")
    ax1.plot(t, [s["cost_saved_vs_large"] for s in sweep], "^-", label="cost saved vs always Gemma")
    ax1.axhline(result["cascade"]["always_small"]["accuracy"], ls=":", c="gray", label="always SmolLM2 accuracy")
    ax1.axhline(result["cascade"]["always_large"]["accuracy"], ls="--", c="gray", label="always Gemma accuracy")
    ax1.set_xlabel("threshold (mean token log-probability)")
    ax1.set_title(f"cascade SmolLM2 -> Gemma 3 270M, {len(result['rows'])} labelled prompts")
    ax1.legend(fontsize=8)
    p = result["premium"]
    ax2.bar(["idle", f"{result['config']['free_clients']} free clients"],
            [p["idle_ttft_p50_s"] * 1000, p["loaded_ttft_p50_s"] * 1000], color=["tab:green", "tab:orange"])
    ax2.axhline(2 * p["idle_ttft_p50_s"] * 1000, ls="--", c="red", label="2x idle")
    ax2.set_ylabel("premium time to first token, p50 (ms)")
    ax2.set_title(f"free requests: {p['free_requests']['answered']} answered, {p['free_requests']['refused']} "
                  f"refused, {p['free_requests']['other']} lost")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threshold", type=float, default=-1.0, help="the live cascade's mean log-probability threshold")
    p.add_argument("--num-prompts", type=int, default=10_000, help="the first N labelled prompts")
    p.add_argument("--free-clients", type=int, default=16)
    p.add_argument("--load-seconds", type=float, default=20.0)
    p.add_argument("--ttft-samples", type=int, default=20, help="premium requests measured idle (10x as many at most "
                                                                    "under load)")
    smoke.add_args(p, "multi_model")
    a = smoke.resolve(p.parse_args(argv), num_prompts=3, free_clients=4, load_seconds=2.0, ttft_samples=2)
    with tempfile.TemporaryDirectory(prefix="strata-multi-model-") as tmp, \
            Suite(Path(tmp), a.threshold, a.smoke) as suite:
        print(f">> suite up: {SMALL} and {LARGE}; measuring", flush=True)
        measured = asyncio.run(measure(a, suite))
    result = {"config": {"threshold": a.threshold, "prompts": str(PROMPTS.relative_to(ROOT)), "max_tokens": MAX_TOKENS,
                         "free_clients": a.free_clients, "load_seconds": a.load_seconds, "prices_per_1k": PRICES,
                         "smoke": a.smoke},
              "machine": machine_info(), "notes": NOTES, "rows": measured["rows"],
              "cascade": table(measured["rows"], a.threshold), "premium": measured["premium"]}
    result["targets"] = {"premium_ttft_within_2x_idle": {"ratio": result["premium"]["ratio_p50"], "target": 2.0,
                                                         "met": result["premium"]["ratio_p50"] <= 2.0},
                         "nothing_lost": {"lost": result["premium"]["free_requests"]["other"], "met":
                                          result["premium"]["free_requests"]["other"] == 0}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    if not a.smoke:
        plot(result, a.out.with_suffix(".png"))
    c, pr = result["cascade"], result["premium"]
    live = next(s for s in c["sweep"] if s["threshold"] == a.threshold)
    print(f">> always SmolLM2 {c['always_small']['accuracy']:.2f}, always Gemma {c['always_large']['accuracy']:.2f}; "
          f"cascade at {a.threshold}: {live['escalated']:.0%} escalated, accuracy {live['accuracy']:.2f}, "
          f"cost saved {live['cost_saved_vs_large']:.0%}, tokens saved {live['tokens_saved_vs_large']:.0%}")
    print(f">> premium TTFT p50 idle {pr['idle_ttft_p50_s'] * 1000:.0f} ms, under free load "
          f"{pr['loaded_ttft_p50_s'] * 1000:.0f} ms ({pr['ratio_p50']:.2f}x); free requests {pr['free_requests']}")
    print(f">> {a.out}")


if __name__ == "__main__":
    main()
