"""`strata generate`: offline batch generation over a JSONL file, like vLLM's LLM.generate."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from services.inference.config import engine_config_from_args
from services.inference.engine.engine import LLMEngine
from services.inference.engine.factory import build_engine
from services.inference.sampling import SamplingParams

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_TUPLE_FIELDS = ("stop", "stop_token_ids")


def _line_params(base: SamplingParams, line: dict, where: str) -> SamplingParams:
    extra = {k: v for k, v in line.items() if k in _SAMPLING_FIELDS}
    for k in _TUPLE_FIELDS:
        if k in extra:
            extra[k] = tuple([extra[k]] if isinstance(extra[k], str) else extra[k])
    unknown = set(line) - _SAMPLING_FIELDS - {"prompt", "messages"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    if extra.get("n", 1) != 1:
        raise ValueError(f"{where}: 'n' must be 1 here (one output line per prompt); several samples of a prompt "
                         "are served by the inference service and the gateway")
    return replace(base, **extra)


def read_prompts(engine: LLMEngine, path: Path, base: SamplingParams) -> list[tuple[list[int], SamplingParams]]:
    items = []
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            line = json.loads(raw)
            if ("prompt" in line) == ("messages" in line):
                raise ValueError(f"{where}: give exactly one of 'prompt' or 'messages'")
            text = line["prompt"] if "prompt" in line else engine.render_chat(line["messages"])
            items.append((engine.tokenizer.encode(text), _line_params(base, line, where)))
    return items


def run(args: argparse.Namespace) -> None:
    base = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                          ignore_eos=args.ignore_eos)
    engine = build_engine(engine_config_from_args(args))
    try:
        items = read_prompts(engine, Path(args.prompts), base)
        for i, (ids, params) in enumerate(items):
            engine.check_request(ids, params)
    except (ValueError, json.JSONDecodeError) as exc:
        sys.exit(f"strata generate: {exc}")
    outputs = engine.generate([ids for ids, _ in items], [p for _, p in items])
    with Path(args.output).open("w", encoding="utf-8") as f:
        for i, ((ids, _), out) in enumerate(zip(items, outputs)):
            f.write(json.dumps({"index": i, "prompt_token_ids": ids, "token_ids": out.new_token_ids,
                                "text": out.text, "finish_reason": out.finish_reason}, ensure_ascii=False) + "\n")
    print(f"wrote {len(outputs)} outputs to {args.output}", file=sys.stderr)
