"""`make test` runs the tests in two pytest runs (two workers for those with nothing timed, then one at a time):
together they must name every directory of tests, so that a new one cannot be left out of CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_two_runs_of_make_test_name_every_directory_of_tests():
    recipe = (ROOT / "Makefile").read_text().split("\ntest: install\n", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"\btests/(\w+)", recipe))
    dirs = {p.parent.relative_to(ROOT / "tests").parts[0] for p in (ROOT / "tests").rglob("test_*.py")
            if p.parent != ROOT / "tests"}
    assert dirs == {"unit", "kernels", "deploy", "integration", "e2e"}
    assert named >= dirs, sorted(dirs - named)
