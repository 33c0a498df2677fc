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
from services.gateway.jobs.batch_lines import CHAT
from services.gateway.servicer import request_from_pb, result_to_pb
from services.gateway.types import Request, Result

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
