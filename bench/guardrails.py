"""Guardrail rates on the labelled corpora in tests/data (the same numbers the tests hold to floors).

    python -m bench.guardrails [--threshold 0.55] [--per-category N] [--smoke] [--out PATH]

PII: per kind, the share of labelled values `redact` removes, and the share of lines without personal
data that it changes anyway. Injection: the share of attacks flagged (per category) and of benign
prompts flagged, for the rules, the MiniLM similarity screen at the gateway's default threshold, and
both; plus a sweep of the threshold. The corpora are written by us (synthetic values; attacks kept
apart from the similarity screen's phrasings): read the rates as a regression baseline, not as a
claim about traffic in the wild. JSON + PNG in bench/results/ (--out moves both). Code: tools/guardrails_eval.py.
--smoke: two injection cases per category (embedding the whole corpus takes most of the run), the
JSON only, to a temporary directory (bench/smoke.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench import smoke
from bench.serving import machine_info
from tools.guardrails_eval import INJECTION_CORPUS, METHODS, PII_CORPUS, injection_rates, measure

_ROOT = Path(__file__).resolve().parent.parent
SWEEP = [round(0.40 + 0.05 * i, 2) for i in range(7)]     # 0.40 .. 0.70


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 2, 1]})
    pii = result["pii"]
    kinds = list(pii["per_kind"])
    labels = ["\n".join(k.split("_") + [f"n={pii['per_kind'][k]['values']}"]) for k in kinds]
    labels.append(f"no PII:\nchanged\nn={pii['negatives']['lines']}")
    rates = [pii["per_kind"][k]["recall"] for k in kinds] + [pii["negatives"]["false_positive_rate"]]
    a1.bar(labels, rates, color=["tab:blue"] * len(kinds) + ["tab:red"])
    for i, r in enumerate(rates):
        a1.text(i, r + 0.01, f"{r:.2f}", ha="center", fontsize=7)
    a1.set(ylim=(0, 1.1), ylabel="share of values gone (blue), of lines changed (red)",
           title=f"PII redaction, {pii['lines']} lines")
    a1.tick_params(axis="x", labelsize=7)

    inj = result["injection"]
    cats = list(inj["rules"]["per_category"]["attack"]) + ["benign\n(flagged)"]
    x = np.arange(len(cats))
    colors = {"rules": "tab:orange", "similarity": "tab:green", "rules+similarity": "tab:blue"}
    for j, m in enumerate(METHODS):
        rates = [v["rate"] for v in inj[m]["per_category"]["attack"].values()] + [inj[m]["false_positive_rate"]]
        a2.bar(x + (j - 1) * 0.27, rates, 0.27, color=colors[m],
               label=f"{m}: recall {inj[m]['recall']:.2f}, benign flagged {inj[m]['false_positive_rate']:.2f}")
    a2.set_xticks(x, cats, fontsize=8)
    a2.set(ylim=(0, 1.05), ylabel="share flagged",
           title=f"injection: {inj['attacks']} attacks, {inj['benign']} benign; similarity ≥ {inj['threshold']}")
    a2.legend(fontsize=7)

    sweep = result["threshold_sweep"]
    xs = [s["threshold"] for s in sweep]
    for key, style, color, label in (("similarity_recall", "o-", "tab:green", "similarity: attacks"),
                                     ("similarity_false_positive_rate", "o--", "tab:green", "similarity: benign"),
                                     ("combined_recall", "o-", "tab:blue", "rules+sim: attacks"),
                                     ("combined_false_positive_rate", "o--", "tab:blue", "rules+sim: benign")):
        a3.plot(xs, [s[key] for s in sweep], style, color=color, label=label)
    a3.axvline(inj["threshold"], color="gray", ls=":", label="gateway default")
    a3.set(xlabel="similarity threshold", ylabel="share flagged", ylim=(0, 1.05), title="threshold sweep")
    a3.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"Strata guardrails on the labelled corpora (git {m['git_commit']}{' dirty' if m['git_dirty'] else ''})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from services.gateway.config import GatewayConfig

    p = argparse.ArgumentParser(prog="python -m bench.guardrails", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threshold", type=float, default=GatewayConfig().injection_similarity,
                   help="similarity threshold (default: the gateway's, GatewayConfig.injection_similarity)")
    p.add_argument("--per-category", type=int, default=None, metavar="N",
                   help="at most N cases of each category of the injection corpus (default: all; the PII corpus "
                        "is always measured whole)")
    smoke.add_args(p, "guardrails")
    a = smoke.resolve(p.parse_args(argv), per_category=2)

    from services.embedding.embedder import MiniLMEmbedder

    embedder = MiniLMEmbedder()
    t0 = time.perf_counter()
    res = asyncio.run(measure(embedder.embed, a.threshold, a.per_category))
    seconds = time.perf_counter() - t0
    attacks = res["injection_cases"]
    sweep = []
    for t in SWEEP:
        r = injection_rates(attacks, res["scores"], t)
        sweep.append({"threshold": t, "similarity_recall": r["similarity"]["recall"],
                      "similarity_false_positive_rate": r["similarity"]["false_positive_rate"],
                      "combined_recall": r["rules+similarity"]["recall"],
                      "combined_false_positive_rate": r["rules+similarity"]["false_positive_rate"]})
    result = {"config": {"threshold": a.threshold, "pii_corpus": str(PII_CORPUS.relative_to(_ROOT)),
                         "injection_corpus": str(INJECTION_CORPUS.relative_to(_ROOT)),
                         "injection_per_category": a.per_category, "smoke": a.smoke, "embedder": "all-MiniLM-L6-v2",
                         "measure_seconds": round(seconds, 2)},
              "machine": machine_info(), "pii": res["pii"], "injection": res["injection"], "threshold_sweep": sweep}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if not a.smoke:
        plot(result, a.out.with_suffix(".png"))

    pii, inj = res["pii"], res["injection"]
    print(f"PII: {pii['values']} values in {pii['lines']} lines, recall {pii['recall']:.3f}; "
          f"{pii['negatives']['flagged']} of {pii['negatives']['lines']} lines without PII changed "
          f"({pii['negatives']['false_positive_rate']:.3f})")
    for k, v in pii["per_kind"].items():
        print(f"  {k:<12} recall {v['recall']:.3f} ({v['removed']}/{v['values']})")
    print(f"injection: {inj['attacks']} attacks, {inj['benign']} benign, similarity threshold {a.threshold}")
    for m in METHODS:
        print(f"  {m:<17} recall {inj[m]['recall']:.3f}, benign flagged {inj[m]['false_positive_rate']:.3f}")
    print(f"wrote {a.out}" if a.smoke else f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
