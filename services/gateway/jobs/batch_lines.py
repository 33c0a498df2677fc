"""OpenAI's batch input lines ({"custom_id", "method": "POST", "url", "body"}), checked when a batch is created
(over HTTP's /v1/batches or gRPC's SubmitJob with an input_file_id)."""

from __future__ import annotations

import json
from typing import Any

from services.common.errors import InvalidArgumentError
from services.gateway.http import HttpError, completion_request

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BATCH_ENDPOINTS = (CHAT, COMPLETIONS)


def parse_line(line: bytes | str, endpoint: str) -> dict[str, Any]:
    """One batch input line, checked: an object with a string custom_id, method POST, url the batch's endpoint and
    an object body (InvalidArgumentError naming what is wrong)."""
    try:
        d = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgumentError("not JSON") from None
    if not isinstance(d, dict):
        raise InvalidArgumentError("not a JSON object")
    if not isinstance(d.get("custom_id"), str) or not d["custom_id"]:
        raise InvalidArgumentError("'custom_id' must be a non-empty string")
    if d.get("method") != "POST":
        raise InvalidArgumentError("'method' must be POST")
    if d.get("url") != endpoint:
        raise InvalidArgumentError(f"'url' must be the batch's endpoint {endpoint}")
    if not isinstance(d.get("body"), dict):
        raise InvalidArgumentError("'body' must be a JSON object")
    if d["body"].get("stream"):
        raise InvalidArgumentError("'stream' is not served in a batch")
    return d


def batch_items(data: bytes, endpoint: str, file_id: str) -> list[bytes]:
    """An uploaded batch input file's requests, each line checked (its envelope, and its body as the endpoint
    reads it) and its custom_id unique: InvalidArgumentError naming the file and line."""
    if endpoint not in BATCH_ENDPOINTS:
        raise InvalidArgumentError(f"the endpoint must be one of {', '.join(BATCH_ENDPOINTS)}")
    items, seen = [], set()
    for i, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = parse_line(line, endpoint)
            completion_request(d["body"], endpoint == CHAT)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{file_id} line {i}: {exc}") from None
        except HttpError as exc:
            raise InvalidArgumentError(f"{file_id} line {i}: {exc.message}") from None
        if d["custom_id"] in seen:
            raise InvalidArgumentError(f"{file_id} line {i}: custom_id {d['custom_id']!r} is used twice")
        seen.add(d["custom_id"])
        items.append(line.strip())
    if not items:
        raise InvalidArgumentError(f"{file_id} holds no requests")
    return items
