"""The gateway's OpenAI-compatible HTTP face (Starlette on uvicorn), beside its gRPC port:

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings   GET /v1/models
    GET /healthz   GET /readyz

It runs the gateway's own pipeline (`Gateway.stream` / `Gateway.generate` / `Gateway.embed`), as the gRPC servicer does: the
key from `Authorization: Bearer`, validation, guardrails, limits, budgets, cache, routing, usage, and a
SERVER span continuing the caller's W3C `traceparent`. Streaming is server-sent events as OpenAI sends
them (a role delta, content deltas, a last chunk with `finish_reason`, the usage chunk when
`stream_options.include_usage`, then `data: [DONE]`). Errors are OpenAI's body (`{"error": {"message",
"type", "param", "code"}}`) with 400, 401, 403, 404, 429 (and `Retry-After`), 503 or 504; one raised after
a stream began arrives as a last `data: {"error": ...}` event.

Strata's own fields go in an extension object, `"strata": {"cache_policy": "use" | "bypass" | "refresh",
"priority": int, "allow_sampled_cache": bool, "top_k": int, "min_p": float, "repetition_penalty": float}`,
and every answer carries `"strata": {"source": {...}, "flags": [...]}`. Embeddings take `"strata": {"truncate":
bool}` (cut texts past the model's 256-token window instead of a 400) and `encoding_format` float or base64
(little-endian float32, what the openai SDK asks for by default); `dimensions` may only be the model's own. Fields this
face does not serve (`logit_bias`, `echo`, `best_of`, ...) are a 400 that names them, never silently dropped.
`response_format` (json_object, json_schema, and Strata's regex and grammar) constrains decoding in the replica;
`tools` as OpenAI's; `n` samples share the prompt's KV blocks; `logprobs` / `top_logprobs` are the model's raw
distribution; `user` is counted in usage (GetUsage, by user).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Sequence

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common import telemetry
from services.common.errors import StrataError
from services.common.tls import PLAINTEXT, TlsConfig
from services.embedding import EMBEDDING_DIM
from services.gateway.service import Gateway
from services.gateway.types import (CachePolicy, Chunk, Finish, FinishReason, Message, Request, ResponseFormat, Result,
                                    Sampling, TokenLogprob, Tool, ToolCall, Tools)

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type)
_STATUS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "FAILED_PRECONDITION": (400, "invalid_request_error"),
           "OUT_OF_RANGE": (400, "invalid_request_error"), "UNAUTHENTICATED": (401, "authentication_error"),
           "PERMISSION_DENIED": (403, "permission_error"), "NOT_FOUND": (404, "not_found_error"),
           "RESOURCE_EXHAUSTED": (429, "rate_limit_error"), "UNAVAILABLE": (503, "service_unavailable"),
           "DEADLINE_EXCEEDED": (504, "timeout"), "CANCELLED": (499, "cancelled")}
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort",
           FinishReason.ERROR: "error", FinishReason.TOOL_CALLS: "tool_calls"}
_POLICIES = {p.value: p for p in CachePolicy}
# accepted and ignored: what they ask for is what Strata does anyway
_NEUTRAL = {"stream_options", "service_tier", "store", "metadata"}
_UNSERVED = ("functions", "function_call", "logit_bias", "echo", "best_of", "suffix", "prediction", "audio", "modalities")
MAX_TOP_LOGPROBS = 20


class HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.headers = status, kind, message, param, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def _bad(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, "invalid_request_error", message, param)


def error_status(code: str) -> tuple[int, str]:
    """A gRPC status name as OpenAI's HTTP status and error type."""
    return _STATUS.get(code, (500, "api_error"))


def http_error(exc: BaseException) -> HttpError:
    """A domain error as OpenAI's status and body; anything else is a 500 saying nothing of its inside."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, StrataError):
        status, kind = error_status(exc.status)
        headers = {}
        retry = getattr(exc, "retry_after_s", None)
        if status == 429 and retry is not None:
            headers["Retry-After"] = str(max(1, round(retry)))
        return HttpError(status, kind, str(exc), headers=headers)
    log.exception("unexpected error in the HTTP front door")
    return HttpError(500, "api_error", "internal error")


# ---- request bodies

def _get(body: dict, name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise _bad(f"'{name}' must be {_kind_name(kinds)}", name)
    if not isinstance(value, kinds):
        raise _bad(f"'{name}' must be {_kind_name(kinds)}", name)
    return value


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array", dict: "an object"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds if not (k is int and float in kinds)))


def _served(name: str, value: Any) -> bool:
    """Whether an _UNSERVED field's value asks for nothing beyond plain text (its default)."""
    return value is None or value is False or value == [] or value == {} or value == 0


def _check_fields(body: dict, known: set[str]) -> None:
    for name in _UNSERVED:
        if not _served(name, body.get(name)):
            raise _bad(f"'{name}' is not served by this endpoint yet", name)
    unknown = sorted(set(body) - known - _NEUTRAL - set(_UNSERVED))
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}", unknown[0])


_SAMPLING = {"model", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "presence_penalty", "frequency_penalty", "response_format", "strata", "n", "logprobs", "user"}


_TOOLS = {"tools", "tool_choice", "parallel_tool_calls"}


def _logprobs(body: dict, chat: bool) -> int | None:
    """The top-n the engine is asked for (0: only the chosen token's), or None. Chat: `logprobs` a boolean and
    `top_logprobs` 0-20; completions: `logprobs` the top-n itself."""
    if not chat:
        n = _get(body, "logprobs", int)
        if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
            raise _bad(f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
        return n
    asked, top = _get(body, "logprobs", bool, False), _get(body, "top_logprobs", int)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _bad(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    if top and not asked:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if asked else None


def _sampling(body: dict, ext: dict, chat: bool) -> Sampling:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = (stop,)
    elif stop is None:
        stop = ()
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
        raise _bad("'stop' must be a string or up to 4 strings", "stop")
    max_tokens = _get(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int)
    number = (int, float)
    return Sampling(temperature=_float(_get(body, "temperature", number)), top_p=_float(_get(body, "top_p", number)),
                    seed=_get(body, "seed", int), max_tokens=max_tokens, stop=tuple(stop),
                    presence_penalty=_float(_get(body, "presence_penalty", number)),
                    frequency_penalty=_float(_get(body, "frequency_penalty", number)),
                    top_k=_get(ext, "top_k", int), min_p=_float(_get(ext, "min_p", number)),
                    repetition_penalty=_float(_get(ext, "repetition_penalty", number)),
                    response_format=_response_format(body.get("response_format")), n=_get(body, "n", int),
                    logprobs=_logprobs(body, chat))


def _response_format(value: Any) -> ResponseFormat | None:
    """OpenAI's `response_format` ({"type": "text" | "json_object"}, or {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}), plus Strata's {"type": "regex", "regex": ...} and {"type": "grammar",
    "grammar": ...} (EBNF, as xgrammar reads it). The replica compiles the format: one it cannot read is a
    400 with the grammar engine's message."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        js = value.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise _bad("'response_format.json_schema.schema' must be a JSON Schema object", "response_format")
        strict = js.get("strict") or False
        if not isinstance(strict, bool):
            raise _bad("'response_format.json_schema.strict' must be a boolean", "response_format")
        return ResponseFormat("json_schema", json.dumps(js["schema"]), strict)
    if kind in ("regex", "grammar") and isinstance(value.get(kind), str) and value[kind]:
        return ResponseFormat(kind, value[kind])
    raise _bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"}, {\"type\": "
               "\"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}, or Strata's {\"type\": \"regex\", "
               "\"regex\": ...} or {\"type\": \"grammar\", \"grammar\": ...}", "response_format")


def _float(v: Any) -> float | None:
    if v is None:
        return None
    if not math.isfinite(v):                # Python's json reads NaN and Infinity
        raise _bad("numbers must be finite")
    return float(v)


_EXTENSION = {"cache_policy", "priority", "allow_sampled_cache", "top_k", "min_p", "repetition_penalty"}


def _extension(body: dict) -> dict:
    ext = body.get("strata")
    if ext is None:
        return {}
    if not isinstance(ext, dict):
        raise _bad("'strata' must be an object", "strata")
    unknown = sorted(set(ext) - _EXTENSION)
    if unknown:
        raise _bad(f"unknown field 'strata.{unknown[0]}' (known: {', '.join(sorted(_EXTENSION))})", "strata")
    return ext


def _request(body: dict, *, chat: bool) -> Request:
    ext = _extension(body)
    policy = _get(ext, "cache_policy", str, "use")
    if policy not in _POLICIES:
        raise _bad(f"'strata.cache_policy' must be one of {', '.join(_POLICIES)}", "strata")
    model = _get(body, "model", str)
    if not model:
        raise _bad("'model' is required (GET /v1/models lists them; \"auto\" lets the gateway choose)", "model")
    common = {"model": model, "sampling": _sampling(body, ext, chat), "cache_policy": _POLICIES[policy],
              "priority": _get(ext, "priority", int, 0),
              "allow_sampled_cache": bool(_get(ext, "allow_sampled_cache", bool, False)),
              "user": _get(body, "user", str, "")}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty array", "messages")
        return Request(messages=tuple(_message(m, i) for i, m in enumerate(messages)), tools=_tools(body), **common)
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if body.get(name) is not None:
            raise _bad(f"'{name}' needs chat messages (/v1/chat/completions)", name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    return Request(prompt=prompt, **common)


def _tools(body: dict) -> Tools | None:
    """OpenAI's `tools` (functions), `tool_choice` and `parallel_tool_calls`; None when none is given."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if tools is None and choice is None and parallel is None:
        return None
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array of function tools", "tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"'tools[{i}].function.parameters' must be a JSON Schema object", "tools")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise _bad(f"'tools[{i}].function.description' must be a string", "tools")
        out.append(Tool(fn["name"], description, json.dumps(params) if params is not None else ""))
    function = ""
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}", "tool_choice")
        choice, function = "function", fn["name"]
    elif choice not in ("none", "auto", "required"):
        raise _bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                   "{\"name\": ...}}", "tool_choice")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return Tools(tuple(out), choice, function, parallel)


def _message(m: Any, i: int) -> Message:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(f"'{param}' must be an object", param)
    role, content = m.get("role"), m.get("content")
    if role == "developer":                 # OpenAI's newer name for the system role
        role = "system"
    if not isinstance(role, str):
        raise _bad(f"'{param}.role' must be a string", param)
    calls = m.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise _bad(f"'{param}.tool_calls' must be an array", param)
        parsed = []
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)
                    and isinstance(c.get("id", ""), str)):
                raise _bad(f"'{param}.tool_calls' entries must be {{\"id\", \"type\": \"function\", \"function\": "
                           "{\"name\", \"arguments\": a JSON string}}", param)
            parsed.append(ToolCall(c.get("id", ""), fn["name"], fn["arguments"]))
        return Message(role, _content(content if content is not None else "", param), tuple(parsed))
    if role == "tool":
        call_id = m.get("tool_call_id", "")
        if not isinstance(call_id, str):
            raise _bad(f"'{param}.tool_call_id' must be a string", param)
        return Message(role, _content(content, param), (), call_id)
    return Message(role, _content(content, param))


def _content(content: Any, param: str) -> str:
    if isinstance(content, list):           # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"'{param}.content' parts must be text parts", param)
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise _bad(f"'{param}.content' must be a string or an array of text parts", param)
    return content


_EMBED_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "strata"}
EMBED_BODY_LIMIT = 16 << 20            # 2048 texts of a few thousand characters each


def _embed_request(body: dict, model_name: str) -> tuple[list[str], str, bool]:
    """(texts, encoding format, truncate) of an embeddings body; the model is checked by the gateway, `user`
    read by the caller."""
    unknown = sorted(set(body) - _EMBED_FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}", unknown[0])
    if not _get(body, "model", str):
        raise _bad(f"'model' is required (the embedding model is {model_name!r})", "model")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, list) and texts and all(isinstance(t, int) and not isinstance(t, bool) for t in texts) \
            or isinstance(texts, list) and any(isinstance(t, list) for t in texts):
        raise _bad("token-id input is not served: send the text (a string or an array of strings)", "input")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _bad("'input' must be a non-empty string or a non-empty array of strings", "input")
    encoding = _get(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise _bad("'encoding_format' must be float or base64", "encoding_format")
    dims = _get(body, "dimensions", int)
    if dims is not None and dims != EMBEDDING_DIM:
        raise _bad(f"'dimensions' must be {EMBEDDING_DIM}: {model_name} cannot shorten its vectors", "dimensions")
    ext = body.get("strata") or {}
    if not isinstance(ext, dict) or set(ext) - {"truncate"}:
        raise _bad("'strata' takes only 'truncate' (a boolean) here", "strata")
    return texts, encoding, bool(_get(ext, "truncate", bool, False))


# ---- answers

def _usage(f: Finish) -> dict[str, int]:
    u = f.usage
    out = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens}
    if u.cached_prompt_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": u.cached_prompt_tokens}
    return out


def _call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def _token(t: bytes) -> str:
    return t.decode("utf-8", errors="replace")       # a piece of a character reads as U+FFFD; `bytes` has it whole


def _chat_logprobs(lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: each token with its logprob, its bytes and its top alternatives."""
    return {"content": [{"token": _token(lp.token), "logprob": lp.logprob, "bytes": list(lp.token),
                         "top_logprobs": [{"token": _token(t.token), "logprob": t.logprob, "bytes": list(t.token)}
                                          for t in lp.top]} for lp in lps], "refusal": None}


def _completion_logprobs(lps: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions `logprobs` (tokens, token_logprobs, top_logprobs as {token: logprob}, text_offset:
    each token's offset in the answer's text, from `offset`)."""
    tokens = [_token(lp.token) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_token(t.token): t.logprob for t in lp.top} for lp in lps], "text_offset": offsets}


def _strata(f: Finish) -> dict[str, Any]:
    s = f.source
    out: dict[str, Any] = {"source": {"kind": s.kind.value, "model": s.model, "replica": s.replica,
                                      "entry_id": s.entry_id, "route": s.route}, "flags": list(f.flags)}
    if f.mean_logprob is not None:
        out["mean_logprob"] = f.mean_logprob
    return out


def completion_request(body: dict, chat: bool) -> Request:
    """A /v1/chat/completions (chat) or /v1/completions body as the gateway's Request (HttpError 400 naming what
    is wrong)."""
    _check_fields(body, _SAMPLING | _TOOLS | ({"messages", "top_logprobs"} if chat else {"prompt"}))
    return _request(body, chat=chat)


def completion_body(result: Result, request: Request, chat: bool) -> dict[str, Any]:
    """A whole answer as OpenAI's chat.completion (chat) or text_completion object."""
    f = result.finish
    asked = request.sampling.logprobs is not None
    choices = []
    for c in result.choices:
        choice: dict[str, Any] = {"index": c.index, "finish_reason": _FINISH[c.reason], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
            if c.tool_calls:
                choice["message"] = {"role": "assistant", "content": c.text or None,
                                     "tool_calls": [_call(t) for t in c.tool_calls]}
            if asked:
                choice["logprobs"] = _chat_logprobs(c.logprobs)
        else:
            choice["text"] = c.text
            if asked:
                choice["logprobs"] = _completion_logprobs(c.logprobs)
        choices.append(choice)
    kind, prefix = ("chat.completion", "chatcmpl-") if chat else ("text_completion", "cmpl-")
    return {"id": prefix + result.request_id, "object": kind, "created": int(time.time()),
            "model": f.source.model or request.model, "choices": choices, "usage": _usage(f), "strata": _strata(f)}


class HttpFrontDoor:
    def __init__(self, gateway: Gateway, ready=lambda: True, extra_routes: Sequence[Route] = ()) -> None:
        """extra_routes: more endpoints on the same app (the batch API: services/gateway/http_batches.py)."""
        self.gateway, self.ready, self.tracer = gateway, ready, gateway.tracer
        self.app = Starlette(routes=[
            *extra_routes,
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    async def _not_found(self, request: HttpRequest, exc: Exception) -> Response:
        return HttpError(404, "not_found_error", f"no route {request.method} {request.url.path}").response()

    async def _not_allowed(self, request: HttpRequest, exc: Exception) -> Response:
        return HttpError(405, "invalid_request_error", f"{request.method} is not allowed on {request.url.path}").response()

    async def healthz(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: HttpRequest) -> Response:
        ok = bool(self.ready())
        return JSONResponse({"status": "ready" if ok else "not ready"}, 200 if ok else 503)

    async def models(self, request: HttpRequest) -> Response:
        # the served names are not a secret, but only a caller with a key sees them (as the other endpoints)
        try:
            await self.gateway.authenticator.authenticate(request_bearer(request), request_client(request))
        except Exception as exc:  # noqa: BLE001 - answered as OpenAI's error
            return http_error(exc).response()
        created = int(time.time())
        names = [*self.gateway.config.models, self.gateway.config.embedding.name]
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                                         "owned_by": "strata"} for name in names]})

    async def _body(self, http: HttpRequest, limit: int = 0) -> Any:
        """The JSON body, read up to a bound (by default a prompt of the gateway's most characters, each
        escaped into up to 6 bytes, plus room for the rest): a larger one is a 413 before it is all in memory."""
        limit = limit or 6 * self.gateway.config.max_prompt_chars + (1 << 20)
        if int(http.headers.get("content-length") or 0) > limit:
            raise HttpError(413, "invalid_request_error", f"the body is larger than {limit} bytes")
        data = bytearray()
        async for part in http.stream():
            data += part
            if len(data) > limit:
                raise HttpError(413, "invalid_request_error", f"the body is larger than {limit} bytes")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _bad("the body is not JSON") from None

    async def chat(self, request: HttpRequest) -> Response:
        return await self._answer(request, chat=True)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._answer(request, chat=False)

    def _span(self, http: HttpRequest, route: str) -> trace.Span:
        """The request's SERVER span, continuing the caller's W3C trace."""
        ctx = telemetry.context_from_traceparent(http.headers.get("traceparent", ""))
        return self.tracer.start_span(f"POST {route}", context=ctx, kind=SpanKind.SERVER,
                                      attributes={"http.request.method": "POST", "http.route": route})

    @staticmethod
    def _failed(span: trace.Span, exc: BaseException) -> Response:
        err = http_error(exc)
        span.set_attributes({"http.response.status_code": err.status, "error.type": err.kind})
        span.set_status(Status(StatusCode.ERROR, err.kind))
        span.end()
        return err.response()

    async def embeddings(self, http: HttpRequest) -> Response:
        span = self._span(http, "/v1/embeddings")
        try:
            with trace.use_span(span, end_on_exit=False):
                body = await self._body(http, EMBED_BODY_LIMIT)
                if not isinstance(body, dict):
                    raise _bad("the body must be a JSON object")
                texts, encoding, truncate = _embed_request(body, self.gateway.config.embedding.name)
                out = await self.gateway.embed(body["model"], texts, request_bearer(http), request_client(http), truncate,
                                               user=_get(body, "user", str, ""))
        except Exception as exc:  # noqa: BLE001 - every error is OpenAI's body and status
            return self._failed(span, exc)
        span.set_attribute("http.response.status_code", 200)
        span.end()
        if encoding == "base64":
            rows = [base64.b64encode(v.astype("<f4", copy=False).tobytes()).decode() for v in out.vectors]
        else:
            rows = out.vectors.tolist()
        return JSONResponse({"object": "list", "model": out.model,
                             "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
                             "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}})

    async def _answer(self, http: HttpRequest, *, chat: bool) -> Response:
        route = "/v1/chat/completions" if chat else "/v1/completions"
        span = self._span(http, route)
        try:
            with trace.use_span(span, end_on_exit=False):
                body = await self._body(http)
                if not isinstance(body, dict):
                    raise _bad("the body must be a JSON object")
                request = completion_request(body, chat)
                stream = _get(body, "stream", bool, False)
                usage_chunk = bool(stream and isinstance(body.get("stream_options"), dict)
                                   and body["stream_options"].get("include_usage"))
                if stream:
                    chunks = self.gateway.stream(request, request_bearer(http), request_client(http))
                    try:
                        first = await anext(chunks)        # errors before the first chunk get their status
                    except BaseException:
                        await chunks.aclose()
                        raise
                    span.set_attribute("http.response.status_code", 200)

                    async def close() -> None:
                        await chunks.aclose()              # a caller gone: the request is aborted downstream
                        if span.is_recording():
                            span.end()
                    return _EventStream(self._events(span, first, chunks, chat, request, usage_chunk), close)
                result = await self.gateway.generate(request, request_bearer(http), request_client(http))
        except Exception as exc:  # noqa: BLE001 - every error is OpenAI's body and status
            return self._failed(span, exc)
        span.set_attribute("http.response.status_code", 200)
        span.end()
        return JSONResponse(completion_body(result, request, chat))

    async def _events(self, span: trace.Span, first: Chunk, rest: AsyncIterator[Chunk], chat: bool, request: Request,
                      usage_chunk: bool) -> AsyncIterator[str]:
        created = int(time.time())
        prefix, kind = ("chatcmpl-", "chat.completion.chunk") if chat else ("cmpl-", "text_completion")
        rid, model, samples = prefix + first.request_id, request.model, request.samples
        asked = request.sampling.logprobs is not None
        calls = [0] * samples                      # a call's index in its sample's answer, as OpenAI numbers deltas
        offsets = [0] * samples                    # completions: the next token's text offset

        def event(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                          "choices": choices, **extra}, separators=(",", ":")) + "\n\n"

        def piece(c: Chunk, text: str, finish: Finish | None) -> dict:
            reason = None if finish is None else _FINISH[finish.reason]
            logprobs = None
            if asked and c.logprobs:
                if chat:
                    logprobs = _chat_logprobs(c.logprobs)
                else:
                    logprobs = _completion_logprobs(c.logprobs, offsets[c.index])
                    offsets[c.index] += sum(len(t) for t in logprobs["tokens"])
            if chat:
                return {"index": c.index, "delta": {"content": text} if text else {}, "finish_reason": reason,
                        "logprobs": logprobs}
            return {"index": c.index, "text": text, "finish_reason": reason, "logprobs": logprobs}

        try:
            with trace.use_span(span, end_on_exit=False):
                if chat:
                    for i in range(samples):
                        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                      "logprobs": None}])
                chunk: Chunk | None = first
                finished, flags = 0, {}               # flags: every sample's findings, sent with the last finish
                while chunk is not None:
                    for c in chunk.tool_calls:
                        yield event([{"index": chunk.index, "delta": {"tool_calls": [{"index": calls[chunk.index], **_call(c)}]},
                                      "finish_reason": None, "logprobs": None}])
                        calls[chunk.index] += 1
                    f = chunk.finish
                    if chunk.text or (asked and chunk.logprobs):
                        yield event([piece(chunk, chunk.text, None)])
                    if f is not None:
                        finished += 1
                        flags.update(dict.fromkeys(f.flags))
                        model = f.source.model or model
                        last = finished == samples
                        yield event([piece(replace(chunk, logprobs=()), "", f)],
                                    **({"strata": _strata(replace(f, flags=tuple(flags)))} if last else {}))
                        if last and usage_chunk:
                            yield event([], usage=_usage(f))
                    chunk = await anext(rest, None)
                yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - after the status line: the error is the stream's last event
            err = http_error(exc)
            span.set_attributes({"error.type": err.kind})
            span.set_status(Status(StatusCode.ERROR, err.kind))
            yield "data: " + json.dumps(err.body()) + "\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that close the gateway's stream however the response ends: finished, failed, or
    the caller gone (even before the first event was sent, when the events' own generator never started),
    so that the request is aborted downstream and its slot and KV blocks come back at once."""

    def __init__(self, events: AsyncIterator[str], close) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


def request_bearer(request: HttpRequest) -> str:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else ""


def request_client(request: HttpRequest) -> str:
    """What failed key attempts are counted by: the peer's address, as the gRPC face names it."""
    host = request.client.host if request.client else ""
    return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}" if host else ""


class HttpServer:
    """uvicorn serving the front door inside the gateway's event loop; port 0 picks a free one. HTTPS with
    the gRPC port's certificate where that serves TLS, requiring client certificates where it does."""

    def __init__(self, door: HttpFrontDoor, host: str, port: int, tls: TlsConfig = PLAINTEXT) -> None:
        import ssl

        import uvicorn

        certs = {}
        if tls.serves_tls:
            certs = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
            if tls.client_ca_file:
                certs |= {"ssl_ca_certs": tls.client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.config = uvicorn.Config(door.app, host=host, port=port, log_level="warning", access_log=False,
                                     lifespan="off", timeout_graceful_shutdown=2, **certs)
        self.server = uvicorn.Server(self.config)
        self._task = None

    async def start(self) -> int:
        import asyncio

        self.server.config.setup_event_loop = lambda: None          # noqa: E731 - the running loop is ours
        self._task = asyncio.create_task(self.server.serve(), name="gateway-http")
        while not self.server.started:
            if self._task.done():
                self._task.result()                                  # raises why it could not start
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.01)
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            await self._task
            self._task = None
