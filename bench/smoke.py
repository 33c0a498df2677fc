"""Every benchmark's --smoke mode: seconds long, so that `make test` runs them all and a benchmark cannot
silently break (tests/integration/test_bench_smoke.py).

A smoke run takes tiny sizes and one repeat, draws no plot, and writes its JSON to --out, or to a fresh
temporary directory when --out is not given, so that bench/results/ only ever holds full runs. Its
figures mean nothing: it shows that the benchmark still runs end to end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

RESULTS = Path("bench/results")


def add_args(p: argparse.ArgumentParser, name: str) -> None:
    """--smoke, and --out (default bench/results/<name>.json; in smoke mode a temporary directory)."""
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run (tiny sizes, one repeat, no plot) that checks the benchmark still works; "
                        "its JSON goes to --out, else to a temporary directory")
    p.add_argument("--out", type=Path, default=None, help=f"the JSON (default {RESULTS / (name + '.json')})")
    p.set_defaults(_smoke_name=name)


def resolve(a: argparse.Namespace, **tiny: Any) -> argparse.Namespace:
    """After parsing: in smoke mode, `tiny`'s values replace the parsed ones; --out gets its default."""
    name = a._smoke_name
    if a.smoke:
        for key, value in tiny.items():
            setattr(a, key, value)
    if a.out is None:
        a.out = (Path(tempfile.mkdtemp(prefix=f"strata-smoke-{name}-")) if a.smoke else RESULTS) / f"{name}.json"
    del a._smoke_name
    return a


def write(a: argparse.Namespace, result: dict, plot: Callable[[dict, Path], None] | None = None) -> None:
    """The result as JSON at --out and, for a full run, `plot`'s PNG beside it; says what it wrote."""
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    if a.smoke or plot is None:
        print(f"wrote {a.out}" + (" (a smoke run: its figures mean nothing)" if a.smoke else ""))
        return
    plot(result, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
