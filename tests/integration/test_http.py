"""The gateway's OpenAI-compatible HTTP face, called with the official `openai` package (sync and async)
and plain HTTP, over real sockets: gateway (HTTP port 0) → router → SmolLM2 replica, with Redis and the
cache. The answers are the gRPC face's, streamed as OpenAI streams them; errors are OpenAI's."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import grpc
import httpx
import jsonschema
import numpy as np
import openai
import pydantic
import pytest

from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewayConfig
from services.gateway.main import GatewayService, GatewayServiceConfig
from tests.integration.downstream import running_downstream

pytestmark = pytest.mark.asyncio(loop_scope="session")
ADMIN, PEPPER = "admin-token-for-tests", "pepper-for-tests-0123456789"
MODEL = "SmolLM2-135M-Instruct"
BYPASS = {"strata": {"cache_policy": "bypass"}}


@pytest.fixture()
async def suite(redis_url, make_engine, embedder):
    async with running_downstream(redis_url, make_engine("float32"), embedder) as down:
        svc = GatewayService(GatewayServiceConfig(GatewayConfig(), redis_url, down.router_address, down.cache_address,
                                                  PEPPER, ADMIN), embedder=embedder, http_port=0)
        port = await svc.start()
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        admin = gateway_pb2_grpc.GatewayAdminStub(ch)

        key_ids: dict[str, str] = {}

        async def new_key(**kw) -> str:
            kw.setdefault("tenant", "acme")
            out = await admin.CreateKey(gateway_pb2.CreateKeyRequest(**kw), metadata=(("authorization", f"Bearer {ADMIN}"),))
            key_ids[out.key] = out.key_id
            return out.key

        async def usage(key: str) -> gateway_pb2.GetUsageResponse:
            return await admin.GetUsage(gateway_pb2.GetUsageRequest(key_id=key_ids[key]),
                                        metadata=(("authorization", f"Bearer {ADMIN}"),))
        try:
            yield SimpleNamespace(base=f"http://127.0.0.1:{svc.http_port}", key=await new_key(), new_key=new_key,
                                  usage=usage, grpc=gateway_pb2_grpc.GatewayStub(ch), replica=down.replica,
                                  router=down.router)
        finally:
            await ch.close()
            await svc.stop(0)


def clients(suite, key: str | None = None) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    kw = {"base_url": suite.base + "/v1", "api_key": key or suite.key, "max_retries": 0, "timeout": 60}
    return openai.OpenAI(**kw), openai.AsyncOpenAI(**kw)


async def test_sdk_chat_and_completions_sync_and_async_answer_as_the_grpc_face_does(suite):
    sync, aclient = clients(suite)
    messages = [{"role": "user", "content": "Name a colour."}]
    # the sync client blocks: it runs on a thread while this loop serves the suite
    chat = await asyncio.to_thread(sync.chat.completions.create, model=MODEL, messages=messages, max_tokens=6,
                                   temperature=0, extra_body=BYPASS)
    rpc = await suite.grpc.Generate(gateway_pb2.GatewayRequest(
        model=MODEL, messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="Name a colour.")]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=6), cache_policy=common_pb2.CACHE_POLICY_BYPASS),
        metadata=(("authorization", f"Bearer {suite.key}"),))
    assert chat.object == "chat.completion" and chat.model == MODEL and chat.id.startswith("chatcmpl-")
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == rpc.text
    assert choice.finish_reason == ("length" if rpc.usage.completion_tokens == 6 else "stop")
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (rpc.usage.prompt_tokens, rpc.usage.completion_tokens)
    assert chat.model_extra["strata"]["source"]["kind"] == "model"

    done = await aclient.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                            temperature=0, extra_body=BYPASS)
    assert done.object == "text_completion" and done.choices[0].text and done.usage.completion_tokens <= 5
    assert MODEL in [m.id for m in (await aclient.models.list()).data]
    await aclient.close()
    sync.close()


async def test_a_stream_is_openais_events_and_equals_the_whole_answer(suite):
    _, aclient = clients(suite)
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Write a short poem about rain."}],
          "max_tokens": 12, "temperature": 0, "extra_body": BYPASS}
    whole = await aclient.chat.completions.create(**kw)
    events = [c async for c in await aclient.chat.completions.create(stream=True,
                                                                     stream_options={"include_usage": True}, **kw)]
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in events if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in events if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in events}) == 1

    async with httpx.AsyncClient(base_url=suite.base, timeout=60) as http:     # the wire: SSE, then [DONE]
        async with http.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {suite.key}"},
                               json={"model": MODEL, "prompt": "One, two,", "max_tokens": 4, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"
    await aclient.close()


async def test_errors_are_openais_status_and_body(suite):
    _, bad = clients(suite, key="sk-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    _, aclient = clients(suite)
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        await aclient.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        await aclient.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="'logit_bias' is not served"):
        await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              logit_bias={"1": 5})
    with pytest.raises(openai.BadRequestError, match="unknown field 'strata.speed'"):
        await aclient.completions.create(model=MODEL, prompt="hi", extra_body={"strata": {"speed": 1}})
    limited = await suite.new_key(limits=gateway_pb2.KeyLimits(requests_per_minute=1))
    _, once = clients(suite, key=limited)
    await once.completions.create(model=MODEL, prompt="hi", max_tokens=1, extra_body=BYPASS)
    with pytest.raises(openai.RateLimitError) as err:
        await once.completions.create(model=MODEL, prompt="hi", max_tokens=1, extra_body=BYPASS)
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["type"] == "rate_limit_error" and err.value.body["message"]
    async with httpx.AsyncClient(base_url=suite.base) as http:
        r = await http.post("/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {suite.key}"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert (await http.get("/v1/nothing")).status_code == 404
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        for _ in range(100):                     # ready once the gateway has the router's view of the models
            if (r := await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 200
    for c in (bad, aclient, once):
        await c.close()


async def test_a_call_continues_the_callers_w3c_trace_through_every_service(suite):
    from tests.integration.test_observability import _new_spans, _trace_file_size

    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    before = _trace_file_size()
    async with httpx.AsyncClient(base_url=suite.base, timeout=60) as http:
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, **BYPASS,
                                                          "messages": [{"role": "user", "content": "Hi"}]},
                            headers={"Authorization": f"Bearer {suite.key}", "traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status_code == 200, r.text
    spans = [s for s in _new_spans(before) if s["trace_id"] == trace_id]
    root = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    assert len(root) == 1 and root[0]["parent_span_id"] == parent and root[0]["kind"] == "server"
    assert root[0]["attributes"]["http.response.status_code"] == 200
    assert {"strata-gateway", "strata-router", "strata-inference"} <= {s["service"] for s in spans}
    assert not any("Hi" in json.dumps(s["attributes"]) for s in spans)       # no prompt text in the spans


BAD_BODIES = [
    [], "text", 3, None, {}, {"model": MODEL}, {"model": 5, "messages": [{"role": "user", "content": "hi"}]},
    {"model": MODEL, "messages": []}, {"model": MODEL, "messages": "hi"}, {"model": MODEL, "messages": [3]},
    {"model": MODEL, "messages": [{"role": 1, "content": "hi"}]}, {"model": MODEL, "messages": [{"role": "user"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -3},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 7},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 1.5},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": "3"},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": 1},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": -1},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "user": 42},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "strata": []},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "strata": {"cache_policy": "always"}},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "strata": {"priority": "first"}},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": "json"},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
     "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
     "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "grammar", "grammar": ""}},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50": 100}},
    {"model": MODEL, "messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x" * 1_000_000}]},
]


async def test_every_malformed_body_is_a_400_with_openais_error_and_nothing_breaks(suite):
    async with httpx.AsyncClient(base_url=suite.base, timeout=60,
                                 headers={"Authorization": f"Bearer {suite.key}"}) as http:
        for body in BAD_BODIES:
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (body if len(str(body)) < 300 else "long", r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], error
        for body in ({"model": MODEL, "prompt": ""}, {"model": MODEL, "prompt": ["a", "b"]}, {"prompt": "hi"}):
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["message"], r.text
        r = await http.post("/v1/completions", content=b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL.encode())
        assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, **BYPASS,
                                                          "messages": [{"role": "user", "content": "still there?"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


async def test_a_body_past_the_bound_is_a_413_before_it_is_read_whole(suite):
    async with httpx.AsyncClient(base_url=suite.base, timeout=60,
                                 headers={"Authorization": f"Bearer {suite.key}"}) as http:
        async def chunks():
            yield b'{"model": "x", "prompt": "'
            for _ in range(64):
                yield b"a" * (1 << 20)             # 64 MiB, sent without a Content-Length
        r = await http.post("/v1/completions", content=chunks())
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


async def test_streaming_callers_hanging_up_leave_no_blocks_or_engine_work(suite):
    """Eight streaming callers hang up: after the headers, after 1 to 3 events, or before any answer. The
    replica ends with no request running or waiting and every KV block free, the router with nothing in
    flight."""
    from tests.integration.test_inference_grpc import wait_all_blocks_free

    body = {"model": MODEL, "max_tokens": 60, "stream": True, **BYPASS,
            "messages": [{"role": "user", "content": "Count slowly from one to fifty."}]}

    async def caller(events: int) -> None:
        async with httpx.AsyncClient(base_url=suite.base, timeout=60,
                                     headers={"Authorization": f"Bearer {suite.key}"}) as http:
            if events < 0:                                  # gone before the answer starts
                task = asyncio.create_task(http.post("/v1/chat/completions", json=body))
                await asyncio.sleep(0.05)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                got = 0
                async for line in r.aiter_lines():
                    got += line.startswith("data: ")
                    if got > events:
                        break
    await asyncio.gather(*(caller(n) for n in (0, 1, 2, 3, -1, 0, 2, -1)))
    await wait_all_blocks_free(suite.replica)
    for _ in range(100):
        if all(b.in_flight == 0 for b in suite.router.router.backends.values()):
            break
        await asyncio.sleep(0.05)
    assert all(b.in_flight == 0 for b in suite.router.router.backends.values())


EMBEDDER = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def sentence_transformers_model():
    """What sentence-transformers computes for all-MiniLM-L6-v2, by the package's own modules.json: the BERT
    encoder (HF transformers, truncating at 256 tokens), mean pooling over the tokens, L2 normalisation.
    (sentence-transformers 6.3 itself agreed with Strata's vectors to 1.5e-7 on 2026-12-03; its install pulls
    scipy and scikit-learn, a minute of every CI run, for this one reference.)"""
    transformers = pytest.importorskip("transformers")
    from services.embedding.embedder import default_model_dir

    path = str(default_model_dir())
    modules = [m["type"] for m in json.loads((default_model_dir() / "modules.json").read_text())]
    assert modules == ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                       "sentence_transformers.models.Normalize"], modules
    assert json.loads((default_model_dir() / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    class Reference:
        @staticmethod
        def encode(texts, convert_to_numpy=True):
            import torch

            batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    return Reference()


async def test_embeddings_with_the_sdk_and_grpc_equal_sentence_transformers(suite, sentence_transformers_model,
                                                                            embedder):
    texts = ["How do I learn Python?", "What is the capital of France?", "Ünïcödé and emoji 🙂", "a"]
    ref = sentence_transformers_model.encode(texts, convert_to_numpy=True)
    tokens = sum(embedder.num_tokens(t) for t in texts)
    sync, aclient = clients(suite)
    # the SDK asks for base64 unless told: little-endian float32
    out = await asyncio.to_thread(sync.embeddings.create, model=EMBEDDER, input=texts)
    assert out.model == EMBEDDER and [d.index for d in out.data] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.array([d.embedding for d in out.data]), ref, atol=1e-5)
    assert out.usage.prompt_tokens == out.usage.total_tokens == tokens
    one = await aclient.embeddings.create(model=EMBEDDER, input=texts[0], encoding_format="float", dimensions=384)
    np.testing.assert_allclose(one.data[0].embedding, ref[0], atol=1e-5)
    rpc = await suite.grpc.Embed(gateway_pb2.EmbedRequest(input=texts),       # no model: the embedding model
                                 metadata=(("authorization", f"Bearer {suite.key}"),))
    assert rpc.model == EMBEDDER and rpc.usage.prompt_tokens == tokens and rpc.usage.completion_tokens == 0
    np.testing.assert_allclose(np.array([list(e.values) for e in rpc.embeddings]), ref, atol=1e-5)

    # a text past the model's 256-token window is a 400 unless the caller asks to cut it, as sentence-transformers does
    long = "word " * 300
    with pytest.raises(openai.BadRequestError, match="text 1 has 302 tokens"):
        await aclient.embeddings.create(model=EMBEDDER, input=["short", long])
    cut = await aclient.embeddings.create(model=EMBEDDER, input=[long], extra_body={"strata": {"truncate": True}})
    np.testing.assert_allclose(cut.data[0].embedding, sentence_transformers_model.encode([long])[0], atol=1e-5)
    assert cut.usage.prompt_tokens == 256
    assert EMBEDDER in [m.id for m in (await aclient.models.list()).data]
    await aclient.close()
    sync.close()


async def test_embeddings_take_the_keys_models_limits_and_usage(suite):
    _, aclient = clients(suite)
    for model, error in ((MODEL, "a generation model"), ("text-embedding-3-small", "unknown embedding model")):
        with pytest.raises(openai.NotFoundError, match=error):
            await aclient.embeddings.create(model=model, input="hi")
    for kw, error in (({"input": []}, "'input' must be"), ({"input": [1, 2, 3]}, "token-id input"),
                      ({"input": [[1, 2]]}, "token-id input"), ({"input": ["ok", ""]}, "input 1 is empty"),
                      ({"input": "hi", "dimensions": 128}, "'dimensions' must be 384"),
                      ({"input": ["x"] * 2049}, "1 to 2048 texts")):
        with pytest.raises(openai.BadRequestError, match=error):
            await aclient.embeddings.create(model=EMBEDDER, **kw)
    async with httpx.AsyncClient(base_url=suite.base, timeout=60) as http:
        r = await http.post("/v1/embeddings", json={"model": EMBEDDER, "input": "hi", "encoding_format": "hex"},
                            headers={"Authorization": f"Bearer {suite.key}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"
        r = await http.post("/v1/embeddings", json={"model": EMBEDDER, "input": "hi"})
        assert r.status_code == 401

    gen_only = await suite.new_key(models=[MODEL])              # a key limited to a generation model
    with pytest.raises(openai.PermissionDeniedError):
        await clients(suite, key=gen_only)[1].embeddings.create(model=EMBEDDER, input="hi")
    limited = await suite.new_key(tenant="metered", limits=gateway_pb2.KeyLimits(requests_per_minute=2))
    _, metered = clients(suite, key=limited)
    first = await metered.embeddings.create(model=EMBEDDER, input=["one text", "and another"])
    await metered.embeddings.create(model=EMBEDDER, input="a third")
    with pytest.raises(openai.RateLimitError) as err:
        await metered.embeddings.create(model=EMBEDDER, input="a fourth")
    assert int(err.value.response.headers["retry-after"]) >= 1
    used = await suite.usage(limited)          # two answered calls, charged the tokens the model read
    assert used.requests == 2 and used.completion_tokens == 0
    assert used.prompt_tokens == first.usage.prompt_tokens + (await suite.grpc.Embed(
        gateway_pb2.EmbedRequest(model=EMBEDDER, input=["a third"]),
        metadata=(("authorization", f"Bearer {suite.key}"),))).usage.prompt_tokens
    for c in (aclient, metered):
        await c.close()


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=120)


async def test_structured_output_through_the_sdk_grpc_and_the_cache(suite):
    """response_format constrains decoding in the replica: the SDK's `parse` (a strict json_schema from a
    pydantic model), json_object, and gRPC's regex; a schema the grammar engine cannot read is a 400 with its
    message; the format is part of the cache key, so a cached free-text answer never answers a JSON request."""
    sync, aclient = clients(suite)
    messages = [{"role": "user", "content": "Describe a person."}]
    parsed = await asyncio.to_thread(sync.chat.completions.parse, model=MODEL, messages=messages, max_tokens=64,
                                     temperature=0, response_format=Person, extra_body=BYPASS)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and parsed.choices[0].finish_reason == "stop"

    schema = {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                          "minItems": 1, "maxItems": 3}},
              "required": ["colors"], "additionalProperties": False}
    out = await aclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name some colours."}], max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "colours", "schema": schema}},
        extra_body=BYPASS)
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    rpc = await suite.grpc.Generate(gateway_pb2.GatewayRequest(
        model=MODEL, prompt="Is the sky blue?", cache_policy=common_pb2.CACHE_POLICY_BYPASS,
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=16, response_format=common_pb2.ResponseFormat(
            type=common_pb2.ResponseFormat.TYPE_REGEX, spec="(Yes|No)[.!]"))),
        metadata=(("authorization", f"Bearer {suite.key}"),))
    assert rpc.text in ("Yes.", "No.", "Yes!", "No!") and rpc.finish_reason == common_pb2.FINISH_REASON_STOP

    for bad, message in (({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}},
                          'Unsupported type "objec"'),
                         ({"type": "regex", "regex": "[a-"}, "Unclosed '\\['"),
                         ({"type": "json_schema", "json_schema": {"name": "x"}}, "must be a JSON Schema object"),
                         ({"type": "xml"}, "'response_format' must be")):
        with pytest.raises(openai.BadRequestError, match=message):
            await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, response_format=bad)

    # the cache: a free answer stored, then the same question asking for JSON is answered by the model, and
    # that answer (stored under its own key) is what the JSON question gets from the cache next
    question = [{"role": "user", "content": "Tell me about the moon in one sentence."}]
    kw = {"model": MODEL, "messages": question, "max_tokens": 24, "temperature": 0}
    free = await aclient.chat.completions.create(**kw)
    again = await aclient.chat.completions.create(**kw)
    assert again.model_extra["strata"]["source"]["kind"] == "cache_exact"
    as_json = await aclient.chat.completions.create(response_format={"type": "json_object"}, **kw)
    assert as_json.model_extra["strata"]["source"]["kind"] == "model"
    assert as_json.choices[0].message.content != free.choices[0].message.content
    assert as_json.choices[0].message.content.startswith("{")
    json_again = await aclient.chat.completions.create(response_format={"type": "json_object"}, **kw)
    assert json_again.model_extra["strata"]["source"]["kind"] == "cache_exact"
    assert json_again.choices[0].message.content == as_json.choices[0].message.content
    await aclient.close()
    sync.close()


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}


async def test_a_tool_loop_with_the_sdk_call_result_and_final_answer(suite):
    """OpenAI's tool contract on a real suite: a required call (constrained, so it parses), its result in a
    tool message, then the final answer; a named function; streamed tool_call deltas; the gRPC shape."""
    _, aclient = clients(suite)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # one call: with parallel calls allowed this 135M model goes on calling the same function to max_tokens
    first = await aclient.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                                  tool_choice="required", parallel_tool_calls=False, max_tokens=64,
                                                  temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}]
    final = await aclient.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                                  max_tokens=48, temperature=0)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content and not answer.message.tool_calls

    named = await aclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi!"}], tools=[WEATHER, TIME], max_tokens=64,
        temperature=0, tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"] and named.choices[0].finish_reason == "tool_calls"
    json.loads(calls[0].function.arguments)

    stream = await aclient.chat.completions.create(model=MODEL, messages=messages[:1], tools=[WEATHER],
                                                   tool_choice="required", max_tokens=64, temperature=0, stream=True,
                                                   parallel_tool_calls=False)
    deltas = [c async for c in stream]
    streamed = [tc for c in deltas if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert len(streamed) == 1 and streamed[0].index == 0 and streamed[0].function.name == "get_weather"
    assert deltas[-1].choices[0].finish_reason == "tool_calls"

    tool = common_pb2.Tool(name="get_weather", parameters=json.dumps(WEATHER["function"]["parameters"]))
    rpc = await suite.grpc.Generate(gateway_pb2.GatewayRequest(
        model=MODEL, messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="user", content="Weather in Rome?")], tools=[tool],
            tool_choice=common_pb2.ToolChoice(mode=common_pb2.ToolChoice.MODE_REQUIRED), parallel_tool_calls=False),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=64)),
        metadata=(("authorization", f"Bearer {suite.key}"),))
    assert rpc.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS and rpc.tool_calls[0].name == "get_weather"
    assert "<tool_call>" not in rpc.text and isinstance(json.loads(rpc.tool_calls[0].arguments)["city"], str)
    await aclient.close()


async def test_bad_tool_requests_are_400s_naming_what_is_wrong(suite):
    _, aclient = clients(suite)
    hi = [{"role": "user", "content": "hi"}]
    for kw, message in (
            ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "must be 1-64 of"),
            ({"tools": [WEATHER, WEATHER]}, "two tools have the same name"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
            ({"tool_choice": "required"}, "needs tools"),
            ({"tools": [WEATHER], "tool_choice": "sometimes"}, "'tool_choice' must be"),
            ({"tools": [{"type": "retrieval"}]}, "'tools\\[0\\]' must be"),
            ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools and response_format together"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
              "tool_choice": "required"}, 'Unsupported type "objec"')):
        with pytest.raises(openai.BadRequestError, match=message):
            await aclient.chat.completions.create(model=MODEL, messages=hi, max_tokens=4, **kw)
    with pytest.raises(openai.BadRequestError, match="needs chat messages"):
        await aclient.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"tools": [WEATHER]})
    await aclient.close()


async def test_logprobs_samples_and_user_through_the_sdk_and_grpc(suite):
    """Per-token logprobs (chat and completions, whole and streamed, equal to the gRPC face's), n samples (each
    its own choice, the prompt charged once, a stream's events numbered by sample), and `user` in the usage."""
    from tests.integration.test_inference_grpc import wait_all_blocks_free

    _, aclient = clients(suite)
    messages = [{"role": "user", "content": "Write a short poem about rain."}]
    kw = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "user": "end-user-42"}
    chat = await aclient.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    choice = chat.choices[0]
    content = choice.logprobs.content
    assert choice.finish_reason == "length" and len(content) == chat.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert sum(np.exp(x.logprob) for x in t.top_logprobs) <= 1 + 1e-5 and t.logprob <= 0

    rpc = await suite.grpc.Generate(gateway_pb2.GatewayRequest(
        model=MODEL, messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=messages[0]["content"])]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)),
        metadata=(("authorization", f"Bearer {suite.key}"),))
    assert [lp.token.decode() for lp in rpc.logprobs] == [t.token for t in content]
    assert [lp.logprob for lp in rpc.logprobs] == pytest.approx([t.logprob for t in content], abs=1e-4)
    assert rpc.source.kind == common_pb2.Source.KIND_MODEL                     # logprobs bypass the cache

    streamed = [c async for c in await aclient.chat.completions.create(stream=True, logprobs=True, **kw)]
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in content] and all(t.top_logprobs == [] for t in tokens)

    done = await aclient.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                            logprobs=2, extra_body=BYPASS)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text and len(lp.token_logprobs) == done.usage.completion_tokens
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 for top in lp.top_logprobs)

    # n samples: the prompt once, each sample its own choice, its own draw (seed + i), the same whole or streamed
    one = await aclient.chat.completions.create(**{**kw, "max_tokens": 12})
    three = await aclient.chat.completions.create(n=3, seed=11, logprobs=True, **{**kw, "max_tokens": 12, "temperature": 1.0})
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == sum(len(c.logprobs.content) for c in three.choices)
    assert len({c.message.content for c in three.choices}) > 1
    events = [c async for c in await aclient.chat.completions.create(
        n=3, seed=11, stream=True, stream_options={"include_usage": True}, **{**kw, "max_tokens": 12, "temperature": 1.0})]
    texts, finishes = {}, {}
    for e in events:
        for c in e.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in three.choices}
    assert finishes == {c.index: c.finish_reason for c in three.choices}
    assert events[-1].usage.completion_tokens == three.usage.completion_tokens
    rpc = await suite.grpc.Generate(gateway_pb2.GatewayRequest(
        model=MODEL, prompt="Once upon a time", sampling=common_pb2.SamplingParams(temperature=1.0, max_tokens=5, n=2, seed=3)),
        metadata=(("authorization", f"Bearer {suite.key}"),))
    assert [c.index for c in rpc.choices] == [0, 1] and rpc.text == rpc.choices[0].text
    assert rpc.usage.completion_tokens == sum(len(c.token_ids) for c in rpc.choices)
    await wait_all_blocks_free(suite.replica)

    for bad, match in (({"n": 17}, "n must be in"), ({"top_logprobs": 3}, "needs 'logprobs'"),
                       ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"user": "u" * 300}, "user must be")):
        with pytest.raises(openai.BadRequestError, match=match):
            await aclient.chat.completions.create(**{**kw, "user": "x", **bad})

    await aclient.embeddings.create(model=EMBEDDER, input=["a", "b"], user="end-user-42")
    usage = await suite.usage(suite.key)
    users = {u.user: u for u in usage.users}
    assert set(users) == {"end-user-42"}
    mine = users["end-user-42"]
    assert mine.requests == 6 and mine.completion_tokens == 8 + 8 + 12 + 2 * three.usage.completion_tokens
    assert 0 < mine.prompt_tokens < usage.prompt_tokens
    await aclient.close()
