"""The Inference gRPC service on a real socket (port 0): streaming, cancellation, deadlines, bad input."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.pb import common_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import engine_config
from services.inference.main import InferenceService, InferenceServiceConfig

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def service(make_engine):
    engine = make_engine("float32", max_model_len=512)
    svc = InferenceService(InferenceServiceConfig(engine=engine_config(dtype="float32"), port=0,
                                                  replica_id="test-replica"), engine=engine)
    port = await svc.start()
    yield svc, port
    await svc.stop()


@pytest.fixture(scope="module")
async def stub(service):
    _, port = service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


async def wait_all_blocks_free(svc: InferenceService, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        s = svc.engine.stats
        if s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"blocks not freed: {svc.engine.stats}")


def chat(text: str, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)]),
        sampling=common_pb2.SamplingParams(**sampling))


async def test_chat_to_a_model_without_a_template_is_invalid_argument(stub, service, monkeypatch):
    """A GGUF without tokenizer.chat_template (Gemma 3 270M's) serves raw prompts; messages are refused, saying
    why, and a raw prompt still runs."""
    svc, _ = service
    monkeypatch.setattr(svc.engine.engine.tokenizer, "chat_template", None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [c async for c in stub.Generate(chat("Hi", max_tokens=2))]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no chat template" in err.value.details() and "raw prompt" in err.value.details()
    raw = inference_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=2))
    assert len([c async for c in stub.Generate(raw)]) >= 1
    await wait_all_blocks_free(svc)


async def test_generate_streams_chunks_and_ends_with_usage_and_source(stub, service):
    chunks = [c async for c in stub.Generate(chat("Name a color.", temperature=0, max_tokens=12, ignore_eos=True))]
    assert len(chunks) == 12
    assert chunks[0].prompt_token_ids and not chunks[1].prompt_token_ids
    final = chunks[-1]
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert final.usage.completion_tokens == 12
    assert final.usage.prompt_tokens == len(chunks[0].prompt_token_ids)
    assert final.source.kind == common_pb2.Source.KIND_MODEL and final.source.replica == "test-replica"
    token_ids = [t for c in chunks for t in c.token_ids]
    engine = service[0].llm
    assert "".join(c.text for c in chunks) == engine.tokenizer.decode(token_ids)
    await wait_all_blocks_free(service[0])


async def test_grpc_greedy_output_equals_the_offline_engine(stub, service, make_engine):
    from services.inference.sampling import SamplingParams

    prompt = "The three primary colors are"
    chunks = [c async for c in stub.Generate(inference_pb2.GenerateRequest(
        prompt=prompt, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=16)))]
    offline = make_engine("float32")
    ids = offline.tokenizer.encode(prompt)
    ref = offline.generate([ids], SamplingParams(temperature=0, max_tokens=16))[0]
    assert list(chunks[0].prompt_token_ids) == ids
    assert [t for c in chunks for t in c.token_ids] == ref.new_token_ids
    assert "".join(c.text for c in chunks) == ref.text
    await wait_all_blocks_free(service[0])


async def test_cancelling_mid_stream_frees_all_blocks(stub, service):
    call = stub.Generate(chat("Tell me a long story about a dragon.", temperature=0, max_tokens=400, ignore_eos=True))
    got = 0
    async for _ in call:
        got += 1
        if got == 5:
            call.cancel()
            break
    assert got == 5
    await wait_all_blocks_free(service[0])


async def test_deadline_aborts_the_request_and_frees_blocks(stub, service):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(chat("Count to one thousand.", temperature=0, max_tokens=450,
                                          ignore_eos=True), timeout=0.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_all_blocks_free(service[0])


BAD = [
    ("prompt longer than the context", inference_pb2.GenerateRequest(prompt="hello " * 600), "context window"),
    ("max_tokens < 1", chat("hi", max_tokens=0), "max_tokens"),
    ("max_tokens past the context", chat("hi", max_tokens=100000), "context window"),
    ("unknown model", inference_pb2.GenerateRequest(model="gpt-9", prompt="hi"), "unknown model"),
    ("temperature < 0", chat("hi", temperature=-1), "temperature"),
    ("temperature huge", chat("hi", temperature=1e9), "temperature"),
    ("top_p 0", chat("hi", top_p=0), "top_p"),
    ("top_p > 1", chat("hi", top_p=1.5), "top_p"),
    ("top_k negative", chat("hi", top_k=-3), "top_k"),
    ("min_p > 1", chat("hi", min_p=2), "min_p"),
    ("repetition_penalty 0", chat("hi", repetition_penalty=0), "repetition_penalty"),
    ("presence_penalty", chat("hi", presence_penalty=5), "presence_penalty"),
    ("frequency_penalty", chat("hi", frequency_penalty=-5), "frequency_penalty"),
    ("logprobs", chat("hi", logprobs=50), "logprobs"),
    ("min_tokens > max_tokens", chat("hi", max_tokens=2, min_tokens=5), "min_tokens"),
    ("stop_token_ids out of vocab", chat("hi", stop_token_ids=[10**6]), "stop_token_ids"),
    ("empty stop string", chat("hi", stop=[""]), "stop"),
    ("no input", inference_pb2.GenerateRequest(), "required"),
    ("empty prompt", inference_pb2.GenerateRequest(prompt=""), "empty"),
    ("empty messages", inference_pb2.GenerateRequest(messages=common_pb2.ChatMessages()), "empty"),
    ("bad role", inference_pb2.GenerateRequest(messages=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role="wizard", content="x")])), "role"),
    ("token id out of vocab", inference_pb2.GenerateRequest(prompt_token_ids=[1, 99999999]), "token ids"),
]


@pytest.mark.parametrize("case,request_,needle", BAD, ids=[b[0] for b in BAD])
async def test_bad_input_gets_invalid_argument_with_a_message(stub, service, case, request_, needle):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(request_, timeout=30):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in err.value.details()
    await wait_all_blocks_free(service[0])


async def test_concurrent_streams_are_batched_and_all_complete(stub, service):
    async def one(i: int) -> int:
        n = 0
        async for c in stub.Generate(chat(f"Say something about the number {i}.", temperature=0.7, seed=i,
                                          max_tokens=10, ignore_eos=True)):
            n += len(c.token_ids)
        return n
    assert await asyncio.gather(*(one(i) for i in range(16))) == [10] * 16
    await wait_all_blocks_free(service[0])


async def test_get_load_and_model_info_describe_the_replica(stub, service):
    info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
    assert info.model == "SmolLM2-135M-Instruct" and info.vocab_size == 49152 and info.max_model_len == 512
    assert info.num_layers == 30 and info.eos_token_id == 2 and info.replica == "test-replica"
    call = stub.Generate(chat("Write a poem.", temperature=0, max_tokens=200, ignore_eos=True))
    async for _ in call:
        break
    load = await stub.GetLoad(inference_pb2.GetLoadRequest())
    assert load.num_running == 1 and load.pending_tokens > 0 and 0 < load.kv_cache_usage <= 1
    call.cancel()
    await wait_all_blocks_free(service[0])
    load = await stub.GetLoad(inference_pb2.GetLoadRequest())
    assert load.num_running == 0 and load.num_free_blocks == load.num_total_blocks


async def test_health_and_reflection_are_served(service):
    _, port = service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="strata.v1.Inference"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            names = {s.name for s in r.list_services_response.service}
            assert "strata.v1.Inference" in names and "grpc.health.v1.Health" in names


async def test_a_stream_interval_sends_tokens_n_at_a_time_and_the_same_answer(stub, make_engine):
    """--stream-interval 4: the first token at once, then chunks of 4, the end at once; the same tokens, text and
    usage as one token a chunk (greedy), and every KV block back."""
    engine = make_engine("float32", max_model_len=512)
    svc = InferenceService(InferenceServiceConfig(engine=engine_config(dtype="float32"), port=0, replica_id="batched",
                                                  stream_interval=4), engine=engine)
    port = await svc.start()
    try:
        request = chat("Name a color.", temperature=0, max_tokens=11, ignore_eos=True, logprobs=1)
        one_by_one = [c async for c in stub.Generate(request)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            batched = [c async for c in inference_pb2_grpc.InferenceStub(channel).Generate(request)]
        assert [len(c.token_ids) for c in one_by_one] == [1] * 11
        assert [len(c.token_ids) for c in batched] == [1, 4, 4, 2]         # first at once, then 4s, the end
        assert [t for c in batched for t in c.token_ids] == [t for c in one_by_one for t in c.token_ids]
        assert "".join(c.text for c in batched) == "".join(c.text for c in one_by_one)
        assert [lp.token_id for c in batched for lp in c.logprobs] == [t for c in batched for t in c.token_ids]
        assert list(batched[0].prompt_token_ids) == list(one_by_one[0].prompt_token_ids)
        assert not any(c.prompt_token_ids for c in batched[1:])
        assert batched[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in batched[:-1])
        assert batched[-1].usage.completion_tokens == 11 and batched[-1].source.replica == "batched"
        await wait_all_blocks_free(svc)
    finally:
        await svc.stop()


async def test_a_stream_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        InferenceServiceConfig(engine=engine_config(dtype="float32"), stream_interval=0)
