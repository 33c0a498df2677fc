"""The PNG of a `bench.serving` result: throughput, latency and prefill per system."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.ticker import FuncFormatter  # noqa: E402

_COLORS = {"strata": "tab:blue", "llama.cpp": "tab:orange", "hf": "tab:green"}
_MORE_STRATA_COLORS = ("tab:purple", "tab:cyan", "tab:red", "tab:brown")


def _color(name: str, systems: dict) -> str | None:
    """Fixed colours for the default Strata and the peers; further Strata configurations take the next free one."""
    name = name.removeprefix("in-process ")      # the engine in process: its service's colour, dashed
    if name in _COLORS:
        return _COLORS[name]
    others = [n for n in systems if n.startswith("strata") and n not in _COLORS]
    return _MORE_STRATA_COLORS[others.index(name) % len(_MORE_STRATA_COLORS)] if name in others else None


def _series(system: dict, key: str, sub: str | None = None) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for c, m in sorted(system["concurrency"].items(), key=lambda kv: int(kv[0])):
        xs.append(int(c))
        ys.append(m[key][sub] if sub else m[key])
    return xs, ys


def _minor_label(value: float, _pos: int) -> str:
    """Label the 2x and 5x minor ticks of a log axis, leave the rest blank."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa) in (2, 5) else ""


def plot(result: dict, path: Path) -> None:
    systems = result["systems"]
    cfg = result["config"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [
        (axes[0, 0], "output_tokens_per_s", None, "output tokens/s (aggregate)", True),
        (axes[0, 1], "tpot_ms", "p50", "TPOT median (ms / token / stream)", True),
        (axes[1, 0], "ttft_ms", "p50", "TTFT median (ms)", True),
    ]
    for ax, key, sub, title, logy in panels:
        series = {name: _series(system, key, sub) for name, system in systems.items()}
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=systems[name]["label"], color=_color(name, systems),
                    linestyle="--" if name.startswith("in-process ") else "-")
        # value labels right of each point, stacked in value order so close values stay readable
        for x in cfg["concurrency"]:
            points = sorted(((ys[xs.index(x)], name) for name, (xs, ys) in series.items() if x in xs), reverse=True)
            for rank, (y, name) in enumerate(points):
                ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(7, 9 - 11 * rank),
                            fontsize=8, color=_color(name, systems), va="center")
        ax.margins(x=0.15, y=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg["concurrency"], [str(c) for c in cfg["concurrency"]])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    # prefill
    ax = axes[1, 1]
    names = [n for n in systems if "prefill" in systems[n]]
    vals = [systems[n]["prefill"]["prompt_tokens_per_s"] for n in names]
    bars = ax.bar([systems[n]["label"] for n in names], vals, color=[_color(n, systems) for n in names])
    ax.bar_label(bars, fmt="%.0f", fontsize=9)
    ax.set_title(f"prefill: prompt tokens/s ({cfg['prefill_batch']} x {cfg['prompt_len']}-token prompts)")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    m = result["machine"]
    fig.suptitle(f"SmolLM2-135M-Instruct, {cfg['prompt_len']}-token prompts, {cfg['output_len']} output tokens, "
                 f"greedy; median of {cfg['repeats']} runs\n{m['cpu_count']} CPUs: {m['cpu_model']} "
                 f"({', '.join(m.get('cpu_features', [])) or 'no AVX512'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
