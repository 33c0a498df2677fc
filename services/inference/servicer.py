"""gRPC adapter for the inference engine: protobuf in, domain objects to the engine, chunks out."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import grpc
from opentelemetry import trace

from services.common import telemetry
from services.common.errors import InvalidArgumentError
from services.common.grpc_errors import map_errors
from services.common.metrics import InferenceMetrics
from services.common.pb import FORMAT_KINDS, TOOL_CHOICES, common_pb2, inference_pb2, inference_pb2_grpc
from services.inference.engine.async_engine import AsyncEngine
from services.inference.engine.outputs import RequestOutput
from services.inference.sampling import ResponseFormat, SamplingParams
from services.inference.tools import ROLES as TOOL_ROLES, Conversation, Tool, ToolCall, ToolCallParser, parse_parameters

_OPTIONAL_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                      "frequency_penalty", "seed", "max_tokens", "min_tokens", "logprobs", "n")
_MAX_CHARS_PER_TOKEN = 128   # cheap pre-check before tokenizing a huge prompt
_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
}


def sampling_from_proto(sp: common_pb2.SamplingParams) -> SamplingParams:
    fields = {name: getattr(sp, name) for name in _OPTIONAL_SAMPLING if sp.HasField(name)}
    return SamplingParams(**fields, stop=tuple(sp.stop), stop_token_ids=tuple(sp.stop_token_ids),
                          ignore_eos=sp.ignore_eos, response_format=format_from_proto(sp.response_format))


def format_from_proto(f: common_pb2.ResponseFormat) -> ResponseFormat | None:
    if f.type == common_pb2.ResponseFormat.TYPE_TEXT:
        return None
    kind = FORMAT_KINDS.get(f.type)
    if kind is None:
        raise InvalidArgumentError(f"unknown response_format type {f.type}")
    return ResponseFormat(kind, f.spec, f.strict)


def conversation_from_proto(msgs: common_pb2.ChatMessages) -> Conversation:
    """The conversation and its tools, checked (INVALID_ARGUMENT naming what is wrong)."""
    if not msgs.messages:
        raise InvalidArgumentError("messages is empty")
    out: list[dict] = []
    for i, m in enumerate(msgs.messages):
        if m.role not in TOOL_ROLES:
            raise InvalidArgumentError(f"messages[{i}].role must be one of {', '.join(TOOL_ROLES)}; got {m.role!r}")
        if m.tool_calls and m.role != "assistant":
            raise InvalidArgumentError(f"messages[{i}]: only an assistant message carries tool_calls")
        message: dict = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    choice = TOOL_CHOICES.get(msgs.tool_choice.mode)
    if choice is None:
        raise InvalidArgumentError(f"unknown tool_choice mode {msgs.tool_choice.mode}")
    conversation = Conversation(out, [Tool(t.name, t.description, parse_parameters(t.name, t.parameters))
                                      for t in msgs.tools], choice, msgs.tool_choice.function,
                                msgs.parallel_tool_calls if msgs.HasField("parallel_tool_calls") else True)
    conversation.check()
    return conversation


def chunk_from_output(out: RequestOutput, first: bool, prompt_token_ids: list[int], model: str,
                      replica: str, tool_calls: Sequence[ToolCall] = (),
                      token_bytes: Callable[[int], bytes] | None = None) -> inference_pb2.GenerateChunk:
    """`token_bytes`: a token id's bytes (the tokenizer's), sent with each logprob."""
    chunk = inference_pb2.GenerateChunk(request_id=out.request_id, token_ids=out.new_token_ids, text=out.text,
                                        index=out.index)
    for c in tool_calls:
        chunk.tool_calls.add(id=c.id, name=c.name, arguments=c.arguments)
    spell = token_bytes or (lambda _: b"")
    for lp in out.logprobs:
        chunk.logprobs.add(token_id=lp.token_id, logprob=lp.logprob, token=spell(lp.token_id),
                           top=[common_pb2.TopLogprob(token_id=t, logprob=p, token=spell(t)) for t, p in lp.top])
    if first:
        chunk.prompt_token_ids.extend(prompt_token_ids)
    if out.finished:
        chunk.finish_reason = _FINISH[out.finish_reason or "error"]
        chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=out.num_prompt_tokens,
                                              completion_tokens=out.num_output_tokens,
                                              cached_prompt_tokens=out.num_cached_tokens))
        chunk.source.CopyFrom(common_pb2.Source(kind=common_pb2.Source.KIND_MODEL, model=model, replica=replica))
    return chunk


def merge_outputs(held: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: their tokens, text and logprobs in order, the last one's
    state (finish, counts)."""
    last = held[-1]
    return RequestOutput(
        request_id=last.request_id, new_token_ids=[t for o in held for t in o.new_token_ids],
        text="".join(o.text for o in held), logprobs=[lp for o in held for lp in o.logprobs],
        finished=last.finished, finish_reason=last.finish_reason, num_prompt_tokens=last.num_prompt_tokens,
        num_output_tokens=last.num_output_tokens, num_cached_tokens=last.num_cached_tokens, error=last.error,
        first_scheduled_time=held[0].first_scheduled_time, index=last.index)


class _Timing:
    """One request's milestones, turned into the queue / prefill / decode spans (children of the
    Generate span, stamped with the engine's times) and the latency histograms."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.last: float | None = None
        self.outputs = 0
        self.tokens = 0
        self.finish_reason: str | None = None

    def output(self, out: RequestOutput, metrics: InferenceMetrics) -> None:
        now = time.monotonic()
        self.outputs += 1
        if out.first_scheduled_time is not None and self.scheduled is None:
            self.scheduled = out.first_scheduled_time
        if out.new_token_ids:
            if self.first_token is None:
                self.first_token = now
                metrics.ttft.observe(now - self.arrival)
            elif self.last is not None:
                per_token = (now - self.last) / len(out.new_token_ids)
                for _ in out.new_token_ids:
                    metrics.itl.observe(per_token)
            self.last = now
            self.tokens += len(out.new_token_ids)
        if out.finished:
            self.finish_reason = out.finish_reason

    def finish(self, tracer: trace.Tracer, metrics: InferenceMetrics) -> None:
        end = time.monotonic()
        reason = self.finish_reason or "abort"
        metrics.requests.labels(reason).inc()
        if self.finish_reason is not None:
            metrics.e2e.observe(end - self.arrival)
        if self.scheduled is not None:
            metrics.queue_time.observe(max(0.0, self.scheduled - self.arrival))
        if not trace.get_current_span().is_recording():
            return
        ns = telemetry.monotonic_to_unix_ns
        phases = [("queue", self.arrival, self.scheduled or end)]
        if self.scheduled is not None:
            phases.append(("prefill", self.scheduled, self.first_token or end))
        if self.first_token is not None:
            phases.append(("decode", self.first_token, end))
        for name, start, stop in phases:
            span = tracer.start_span(name, start_time=ns(start))
            if name == "decode":
                span.set_attributes({"strata.completion_tokens": self.tokens, "strata.finish_reason": reason})
            span.end(end_time=ns(max(start, stop)))


@dataclass(slots=True)
class _Sample:
    """One sample's stream state in Generate: its tool-call parser, and what waits for --stream-interval."""

    parser: ToolCallParser | None
    held: list[RequestOutput] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    tokens: int = 0
    sent: bool = False


def speculative_from_proto(request: inference_pb2.GenerateRequest) -> int | None:
    """The request's k: 0 when `speculative.enabled` is false, its num_speculative_tokens when given
    (checked by the engine), else None (the replica's setting)."""
    if not request.HasField("speculative"):
        return None
    spec = request.speculative
    if spec.HasField("enabled") and not spec.enabled:
        return 0
    return spec.num_speculative_tokens if spec.HasField("num_speculative_tokens") else None


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    SERVICE = "strata.v1.Inference"
    UNTRACED = frozenset({"GetLoad", "GetModelInfo"})      # polled by every router

    def __init__(self, engine: AsyncEngine, replica_id: str, tracer: trace.Tracer | None = None,
                 metrics: InferenceMetrics | None = None, stream_interval: int = 1) -> None:
        """stream_interval (main.py's --stream-interval): a chunk waits until it holds at least this many
        tokens (a speculative step can bring several at once), but for the first chunk and the last, which go
        at once."""
        self.engine = engine
        self.stream_interval = stream_interval
        self.llm = engine.engine
        self.replica_id = replica_id
        self.tracer = tracer or telemetry.tracer("inference")
        self.metrics = metrics or InferenceMetrics()

    async def _prompt_token_ids(self, request: inference_pb2.GenerateRequest,
                                conversation: Conversation | None) -> list[int]:
        kind = request.WhichOneof("input")
        if request.prompt_token_ids:
            if kind is not None:
                raise InvalidArgumentError("give exactly one of prompt, messages or prompt_token_ids")
            return list(request.prompt_token_ids)
        if kind is None:
            raise InvalidArgumentError("one of prompt, messages or prompt_token_ids is required")
        if kind == "prompt":
            text = request.prompt
        else:
            assert conversation is not None
            with_tools = self.llm.tokenizer.template_renders_tools
            text = self.llm.render_chat(conversation.template_messages(with_tools),
                                        [t.openai() for t in conversation.tools] if with_tools and
                                        conversation.offers_tools else None)
        if len(text) > self.llm.max_model_len * _MAX_CHARS_PER_TOKEN:
            raise InvalidArgumentError(f"prompt is far longer than the context window ({self.llm.max_model_len} tokens)")
        return await asyncio.to_thread(self.llm.tokenizer.encode, text)

    @map_errors
    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        arrival = time.monotonic()
        conversation = (conversation_from_proto(request.messages) if request.WhichOneof("input") == "messages"
                        and not request.prompt_token_ids else None)
        prompt_ids = await self._prompt_token_ids(request, conversation)
        params = sampling_from_proto(request.sampling)
        tools = conversation is not None and conversation.offers_tools
        if tools:                                  # the answer is constrained to the calls' syntax
            if params.response_format is not None:
                raise InvalidArgumentError("tools and response_format together are not served: give one")
            params = replace(params, response_format=ResponseFormat("structural_tag", conversation.structural_tag()))
        request_id = request.request_id or uuid.uuid4().hex
        model = self.llm.config.model.model_name
        trace.get_current_span().set_attributes({"strata.request_id": request_id, "strata.replica": self.replica_id,
                                                 "strata.prompt_tokens": len(prompt_ids)})
        timing = _Timing(arrival)
        samples: dict[int, _Sample] = {}         # by index, made as each sample's first output comes (n is not
                                                  # checked until the engine has the request)
        tokenizer = self.llm.tokenizer
        token_bytes = lambda t: tokenizer.token_bytes(t) if t < tokenizer.vocab_size else b""  # noqa: E731 - padded vocab
        first = True
        try:
            async for out in self.engine.generate(prompt_ids, params, request_id=request_id,
                                                  priority=request.priority, model=request.model,
                                                  num_speculative_tokens=speculative_from_proto(request)):
                if out.finish_reason == "error":
                    raise RuntimeError(out.error or "engine error")
                sample = samples.get(out.index)
                if sample is None:
                    sample = samples[out.index] = _Sample(ToolCallParser() if tools else None)
                if sample.parser is not None:      # calls out of the text, as they complete
                    out.text, calls = sample.parser.feed(out.text)
                    sample.calls += calls
                    if out.finished:
                        out.text += sample.parser.finish()
                        if sample.parser.calls and out.finish_reason == "stop":
                            out.finish_reason = "tool_calls"
                timing.output(out, self.metrics)
                sample.held.append(out)
                sample.tokens += len(out.new_token_ids)
                if sample.sent and not out.finished and sample.tokens < self.stream_interval:
                    continue
                yield chunk_from_output(sample.held[0] if len(sample.held) == 1 else merge_outputs(sample.held), first,
                                        prompt_ids, model, self.replica_id, sample.calls, token_bytes)
                sample.held, sample.calls, sample.tokens, sample.sent, first = [], [], 0, True, False
        finally:
            timing.finish(self.tracer, self.metrics)

    @map_errors
    async def GetModelInfo(self, request: inference_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> inference_pb2.ModelInfo:
        hp, cfg = self.llm.hparams, self.llm.config
        return inference_pb2.ModelInfo(
            model=cfg.model.model_name, architecture=self.llm.model.architecture, max_model_len=self.llm.max_model_len,
            vocab_size=hp.vocab_size, dtype=cfg.model.dtype, block_size=cfg.cache.block_size,
            num_kv_blocks=self.llm.num_kv_blocks, eos_token_id=self.llm.tokenizer.eos_token_id,
            replica=self.replica_id, num_layers=hp.num_layers, hidden_size=hp.hidden_size,
            quantization=cfg.model.quantization or "", chat=self.llm.tokenizer.chat_template is not None)

    @map_errors
    async def GetLoad(self, request: inference_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> inference_pb2.Load:
        s = self.engine.stats
        return inference_pb2.Load(
            num_running=s.num_running, num_waiting=s.num_waiting, pending_tokens=s.num_pending_tokens,
            kv_cache_usage=s.kv_cache_usage, num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks, replica=self.replica_id,
            max_num_seqs=self.llm.config.scheduler.max_num_seqs)
