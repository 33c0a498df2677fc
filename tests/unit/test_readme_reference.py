"""The README's configuration reference names every flag of every `strata` command."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from services.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _commands(parser: argparse.ArgumentParser, prefix: str = "strata"):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _commands(child, f"{prefix} {name}")


def test_every_flag_of_every_command_is_in_the_readme():
    commands = dict(_commands(build_parser()))
    assert {"strata serve gateway", "strata up", "strata chat", "strata status"} <= set(commands)
    missing = {name: [o for a in p._actions for o in a.option_strings
                      if o.startswith("--") and o != "--help" and not re.search(rf"`{re.escape(o)}[` =]", README)]
               for name, p in commands.items()}
    assert not {k: v for k, v in missing.items() if v}, missing
