"""Configuration helpers shared by every service's flags: defaults come from STRATA_* environment variables."""

from __future__ import annotations

import os


def env(name: str, default: str | None = None) -> str | None:
    """The environment variable `name`, or `default` when it is unset."""
    return os.environ.get(name, default)
