"""Where a Strata decode step's time goes, in-process (no gRPC).

    python -m bench.profile_engine [--streams 1 32] [--dtype bfloat16] [--steps 30] [--smoke] [--out PATH]

For each batch size: that many 128-token prompts are prefilled, then `--steps` decode steps are
timed twice. Pass 1 (no profiler) splits `LLMEngine.step` into its phases with wall clocks around
scheduler, input preparation, model forward, logits, sampling and postprocess. Pass 2 runs the
forward under torch.profiler and groups the operators' self time: linear matmuls (aten::mm),
attention (bmm/softmax/sdpa), KV cache gather and write, and the element-wise rest; forward wall
time minus all operator time is Python and dispatch overhead. Achieved weight bandwidth and matmul
FLOP/s are printed next to the times (gpt-fast's habit). JSON in bench/results/profile.json (--out moves
it); --smoke: a short run (1 and 2 streams, 16-token prompts, 2 steps), its JSON to a temporary
directory (bench/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from bench import smoke
from services.inference.engine import model_runner as runner_module
from services.inference.config import engine_config
from services.inference.engine.engine import LLMEngine
from services.inference.engine.factory import build_engine
from services.inference.models.linear import DenseLinear
from services.inference.sampling import SamplingParams

_OP_GROUPS = {  # operator name -> group; anything else is "elementwise/other"
    "aten::mm": "linear matmuls (mm)", "aten::addmm": "linear matmuls (mm)", "aten::_int_mm": "linear matmuls (mm)",
    "aten::bmm": "attention (bmm, softmax, sdpa)", "aten::_softmax": "attention (bmm, softmax, sdpa)",
    "aten::masked_fill_": "attention (bmm, softmax, sdpa)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (bmm, softmax, sdpa)",
    "aten::index_select": "KV gather/write (index_select, index_copy)",
    "aten::index_copy_": "KV gather/write (index_select, index_copy)",
    "aten::embedding": "embedding",
}
_WRAPPER_OPS = {"aten::matmul", "aten::linear", "aten::scaled_dot_product_attention", "aten::softmax",
                "aten::masked_fill", "aten::index_copy"}   # dispatch to a leaf op counted above


class PhaseClock:
    """Wall-clock totals of named phases, by wrapping callables in place; `restore()` undoes it."""

    def __init__(self) -> None:
        self.totals_s: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object | None]] = []

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)
        self._undo.append((owner, attr, vars(owner).get(attr)))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals_s[phase] += time.perf_counter() - t0

        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            if original is None:
                delattr(owner, attr)          # an instance's bound method: fall back to the class's
            else:
                setattr(owner, attr, original)
        self._undo.clear()


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(length)] for _ in range(n)]


def _fill(engine: LLMEngine, streams: int, prompt_len: int, max_tokens: int, seed: int) -> list[str]:
    """Add `streams` requests and step until every one is decoding."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in _prompts(streams, prompt_len, seed)]
    while any(engine.scheduler.requests[i].num_output_tokens == 0 for i in ids):
        engine.step()
    return ids


@contextmanager
def _drained(engine: LLMEngine, ids: list[str]):
    try:
        yield
    finally:
        for i in ids:
            engine.abort_request(i)


def profile_streams(engine: LLMEngine, streams: int, steps: int, prompt_len: int, seed: int) -> dict:
    hp = engine.hparams
    # pass 1: phase wall clocks
    clock = PhaseClock()
    runner, model = engine.runner, engine.model
    ids = _fill(engine, streams, prompt_len, 2 * steps + 20, seed)
    with _drained(engine, ids):
        for _ in range(5):
            engine.step()
        clock.wrap(engine.scheduler, "schedule", "schedule")
        clock.wrap(runner, "_prepare", "prepare inputs")
        clock.wrap(model, "forward", "model forward")
        clock.wrap(model, "compute_logits", "lm head (logits)")
        clock.wrap(runner_module, "build_sampling_metadata", "sampling")
        clock.wrap(runner_module, "sample", "sampling")
        clock.wrap(engine, "_postprocess", "postprocess (detokenize, finish)")
        # the compiled calls that carry a quantized decode step, on a clock of their own (they run inside the
        # phases above): the layers in one call, the LM head's product
        native = PhaseClock()
        if runner.compute.layer_stack is not None:
            native.wrap(type(runner.compute.layer_stack), "run", "stack")
        native.wrap(model, "lm_head", "lm head product")
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_s = (time.perf_counter() - t0) / steps
        clock.restore()
        native.restore()
        phases_ms = {k: 1e3 * v / steps for k, v in clock.totals_s.items()}
        phases_ms["other (step glue, sampled-token bookkeeping)"] = 1e3 * step_s - sum(phases_ms.values())
        # issue 21's measure: a step's time outside the layer stack and the LM head product (None when the
        # step did not run the stack: dense models' forward is Python over torch ops, counted in pass 2)
        python_ms = 1e3 * (step_s - sum(native.totals_s.values()) / steps) if native.totals_s.get("stack") else None

        # pass 2: operators of the whole step, under the profiler (which slows each op a little)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            profiled_step_s = (time.perf_counter() - t0) / steps
    ops: dict[str, float] = defaultdict(float)
    counts = 0
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::") or ev.key in _WRAPPER_OPS:
            continue
        ops[_OP_GROUPS.get(ev.key, "elementwise/other (norm, rope, silu, add, cat, copies)")] += \
            ev.self_cpu_time_total / 1e3 / steps
        counts += ev.count
    groups_ms = dict(ops)
    groups_ms["python, dispatch, profiler (step wall - op time)"] = 1e3 * profiled_step_s - sum(ops.values())
    projections = [getattr(layer, n) for layer in model.layers for n in ("qkv", "o", "gate_up", "down")]
    projections.append(model.lm_head)
    def stored(p) -> int:      # the bytes a decode step reads: dense weights, int8 codes or GGUF blocks
        return p.weight.nbytes if isinstance(p, DenseLinear) else p.kernel.nbytes if hasattr(p.kernel, "qs") else p.qweight.nbytes
    weight_bytes = sum(stored(p) for p in projections)
    flops = 2 * streams * sum(p.in_features * (p.weight.shape[1] if isinstance(p, DenseLinear) else p.kernel.n)
                              for p in projections)
    # the time the weights are read in: torch's matmuls, or on the quantized path the layer stack (attention
    # and row ops included) and the LM head product
    mm_ms = ops.get("linear matmuls (mm)", float("nan")) if python_ms is None else 1e3 * step_s - python_ms
    return {
        "streams": streams, "step_ms": 1e3 * step_s, "tokens_per_s": streams / step_s,
        "phases_ms": phases_ms, "python_ms_per_step": python_ms, "profiled_step_ms": 1e3 * profiled_step_s, "operators_ms": groups_ms, "aten_ops_per_step": counts / steps,
        "matmul_weight_GB_per_s": weight_bytes / (mm_ms / 1e3) / 1e9,
        "matmul_GFLOP_per_s": flops / (mm_ms / 1e3) / 1e9,
        "num_layers": hp.num_layers,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--quantization", choices=["auto", "none", "int8", "gguf"], default="auto",
                   help="the engine's --quantization (default: its default, auto)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    smoke.add_args(p, "profile")
    a = smoke.resolve(p.parse_args(argv), streams=[1, 2], steps=2, prompt_len=16)
    engine = build_engine(engine_config(dtype=a.dtype, enable_prefix_caching=False,
                                        quantization=None if a.quantization == "none" else a.quantization))
    quantization = engine.config.model.quantization or "none"      # auto resolved by build_engine
    label = f"{engine.config.model.dtype}, quantization {quantization}"
    results = []
    for n in a.streams:
        r = profile_streams(engine, n, a.steps, a.prompt_len, a.seed + n)
        results.append(r)
        print(f"\n== {n} stream(s), {label}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
              f"{r['aten_ops_per_step']:.0f} aten ops/step; matmuls {r['matmul_weight_GB_per_s']:.1f} GB/s of "
              f"weights, {r['matmul_GFLOP_per_s']:.0f} GFLOP/s")
        if r["python_ms_per_step"] is not None:
            print(f"  Python per step (outside the layer stack and the LM head product): {r['python_ms_per_step']:.2f} ms")
        for title, d, total in (("step phases (wall)", r["phases_ms"], r["step_ms"]),
                                (f"operators (self time; profiled step {r['profiled_step_ms']:.1f} ms)",
                                 r["operators_ms"], r["profiled_step_ms"])):
            print(f"  {title}:")
            for k, v in sorted(d.items(), key=lambda kv: -kv[1]):
                print(f"    {v:8.2f} ms  {100 * v / total:5.1f}%  {k}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"dtype": engine.config.model.dtype, "quantization": quantization, "torch_threads": torch.get_num_threads(),
                                 "smoke": a.smoke, "results": results}, indent=2) + "\n")
    print(f"\nwrote {a.out}" + (" (a smoke run: its figures mean nothing)" if a.smoke else ""))


if __name__ == "__main__":
    main()
