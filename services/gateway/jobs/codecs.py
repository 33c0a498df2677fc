"""A job item's encodings. "pb": a serialized GatewayRequest, its result a serialized JobResult (gRPC's
SubmitJob). "openai": one line of an OpenAI batch input file ({"custom_id", "method", "url", "body"}), its result
the batch output line ({"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"})."""

from __future__ import annotations

import json
import uuid
from typing import Any, Protocol

from services.common.errors import InvalidArgumentError
from services.common.pb import gateway_pb2
from services.gateway.http import HttpError, completion_body, completion_request, error_status
from services.gateway.servicer import request_from_pb, result_to_pb
from services.gateway.types import Request, Result

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BATCH_ENDPOINTS = (CHAT, COMPLETIONS)


class ItemCodec(Protocol):
    def request(self, item: bytes) -> Request:
        """The item as the gateway's Request (InvalidArgumentError: it cannot be run)."""

    def answer(self, n: int, item: bytes, result: Result, attempts: int) -> bytes: ...

    def failure(self, n: int, item: bytes, code: str, message: str, attempts: int) -> bytes: ...


class PbCodec:
    def request(self, item: bytes) -> Request:
        return request_from_pb(gateway_pb2.GatewayRequest.FromString(item))

    def answer(self, n: int, item: bytes, result: Result, attempts: int) -> bytes:
        return gateway_pb2.JobResult(index=n, ok=True, response=result_to_pb(result), attempts=attempts).SerializeToString()

    def failure(self, n: int, item: bytes, code: str, message: str, attempts: int) -> bytes:
        return gateway_pb2.JobResult(index=n, ok=False, error_code=code, error_message=message,
                                     attempts=attempts).SerializeToString()


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


class OpenAICodec:
    def request(self, item: bytes) -> Request:
        d = json.loads(item)
        try:
            return completion_request(d["body"], d["url"] == CHAT)
        except HttpError as exc:
            raise InvalidArgumentError(exc.message) from None

    def answer(self, n: int, item: bytes, result: Result, attempts: int) -> bytes:
        d = json.loads(item)
        body = completion_body(result, self.request(item), d["url"] == CHAT)
        return _line(d["custom_id"], {"status_code": 200, "request_id": result.request_id, "body": body}, None)

    def failure(self, n: int, item: bytes, code: str, message: str, attempts: int) -> bytes:
        status, kind = error_status(code)
        name = code.lower()
        if attempts == 0:                 # never run: OpenAI's names for a batch's cancelled and expired requests
            name = {"CANCELLED": "batch_cancelled", "DEADLINE_EXCEEDED": "batch_expired"}.get(code, name)
        body = {"error": {"message": message, "type": kind, "param": None, "code": name}}
        try:
            custom_id = json.loads(item)["custom_id"]
        except (ValueError, KeyError, TypeError):
            custom_id = ""
        return _line(custom_id, {"status_code": status, "request_id": "", "body": body},
                     {"code": name, "message": message})


def _line(custom_id: str, response: dict[str, Any], error: dict[str, str] | None) -> bytes:
    return json.dumps({"id": "batch_req_" + uuid.uuid4().hex[:24], "custom_id": custom_id, "response": response,
                       "error": error}).encode()


CODECS: dict[str, ItemCodec] = {"pb": PbCodec(), "openai": OpenAICodec()}
