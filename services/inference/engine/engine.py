"""LLMEngine: runs steps over one model, its KV cache and scheduler; `step()` reads schedule -> run ->
postprocess. engine/factory.py's build_engine loads, sizes and wires it."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Sequence

import torch

from kernels import MAX_DECODE_ROWS
from services.common.errors import InvalidArgumentError, UnavailableError
from services.inference.config import MAX_SPECULATIVE_TOKENS, EngineConfig
from services.inference.engine.detokenize import TextState
from services.inference.engine.model_runner import ModelRunner, ModelRunnerOutput
from services.inference.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from services.inference.engine.request import Request, RequestStatus
from services.inference.engine.scheduler import Scheduler, SchedulerOutput
from services.inference.models.compute import StepPath
from services.inference.models.tokenizer import Tokenizer
from services.inference.sampling import ResponseFormat, SamplingParams
from services.inference.sampling.structured import GrammarError, Grammars
from services.inference.spec_decode import Proposer, SpecDecodeStats
from services.inference.spec_decode.policy import choose_k

log = logging.getLogger(__name__)


class InvalidRequestError(InvalidArgumentError):
    """The request cannot be served as asked (maps to INVALID_ARGUMENT)."""


class EngineDeadError(UnavailableError):
    """The engine stopped after a device fault: a CUDA error such as an illegal memory access leaves the
    context unusable, so every request was failed and new ones are refused (UNAVAILABLE); the replica must
    be restarted (the inference service stops itself, its supervisor starts it again)."""


_DEVICE_FAULTS = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure",
                  "CUBLAS_STATUS_EXECUTION_FAILED")


def is_device_fault(exc: BaseException) -> bool:
    """Whether exc is a sticky GPU error (after which nothing on that device can run), not a bad request."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _DEVICE_FAULTS)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, scheduler: Scheduler, runner: ModelRunner,
                 proposer: Proposer | None, max_model_len: int) -> None:
        """config: resolved ("auto" decided); the parts as build_engine wires them."""
        self.config = config
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.runner = runner
        self.proposer = proposer
        self.model = runner.model
        self.hparams = self.model.hp
        self.max_model_len = max_model_len
        self._text: dict[str, TextState] = {}
        self._sent_tokens: dict[str, int] = {}
        self._groups: dict[str, list[Request]] = {}   # SamplingParams.n > 1: a group's unfinished samples
        self.fatal_error: str | None = None         # set by a device fault (the message): the engine no longer runs
        self._num_preemptions = 0
        self._prefix_hit_tokens = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._steps_by_path = {path: 0 for path in StepPath}
        self.spec_stats = SpecDecodeStats()
        # a verification step rolls its matcher back over its proposals (sampling/structured.py)
        self.grammars = Grammars(tokenizer, self.hparams.vocab_size, MAX_SPECULATIVE_TOKENS + 1)

    # requests
    @property
    def num_kv_blocks(self) -> int:
        return self.scheduler.kv.num_blocks

    def render_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
        """The prompt text of a conversation, by the GGUF's chat template (`tools`: for a template with a tools
        section); a model without one (a pretrained model such as Gemma 3 270M) serves raw prompts only:
        InvalidArgumentError."""
        if self.tokenizer.chat_template is None:
            raise InvalidArgumentError(f"model {self.config.model.model_name!r} has no chat template (its GGUF "
                                       "carries none): send a raw prompt, not messages")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)

    def check_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                      model: str = "") -> int:
        """Validate a request; returns max_tokens resolved. Raises InvalidRequestError."""
        served = self.config.model.model_name
        if model and model != served:
            raise InvalidRequestError(f"unknown model {model!r}; this replica serves {served!r}")
        try:
            params.validate(self.hparams.vocab_size)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty")
        if any(not 0 <= t < self.hparams.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.hparams.vocab_size})")
        capacity = self.scheduler.kv.max_request_tokens
        limit = min(self.max_model_len, capacity)
        where = "context window" if limit == self.max_model_len else "KV cache of this replica"
        if n >= limit:
            raise InvalidRequestError(
                f"prompt is {n} tokens; the {where} is {limit} tokens (at least one must be left to generate)")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the {where} ({limit} tokens)")
        return max_tokens

    def compile_format(self, fmt: ResponseFormat):
        """The response format's grammar (xgrammar's CompiledGrammar; cached by xgrammar); InvalidRequestError
        with the grammar engine's message when it cannot be read. Thread-safe: AsyncEngine calls it off the
        engine's thread, so that a compile never stalls a step."""
        try:
            return self.grammars.compile(fmt)
        except GrammarError as exc:
            raise InvalidRequestError(str(exc)) from None

    def check_speculative(self, num_speculative_tokens: int | None) -> None:
        if num_speculative_tokens is not None and not 0 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], "
                                      f"got {num_speculative_tokens}")

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                    request_id: str | None = None, priority: int = 0, model: str = "",
                    num_speculative_tokens: int | None = None, grammar=None) -> str:
        """num_speculative_tokens: this request's k (0 = no speculation; None = the engine's setting);
        grammar: the response format's compiled grammar, when compile_format made it already (else made here)."""
        if self.fatal_error is not None:
            raise EngineDeadError(self.fatal_error)
        max_tokens = self.check_request(prompt_token_ids, params, model)
        self.check_speculative(num_speculative_tokens)
        request_id = request_id or uuid.uuid4().hex
        ids = [request_id] + [f"{request_id}#{i}" for i in range(1, params.n)]
        grouped = {s.request_id for samples in self._groups.values() for s in samples}   # forks not yet taken in
        if request_id in self._groups or any(i in self.scheduler.requests or i in grouped for i in ids):
            raise InvalidRequestError(f"request_id {request_id!r} is already running")
        if params.response_format is not None and grammar is None:
            grammar = self.compile_format(params.response_format)
        samples = []
        for index, sample_id in enumerate(ids):
            sample_params = params if params.seed is None or index == 0 else replace(params, seed=_seed_plus(params.seed, index))
            req = Request(sample_id, list(prompt_token_ids), sample_params, max_tokens, priority,
                          eos_token_id=self.tokenizer.eos_token_id, num_speculative_tokens=num_speculative_tokens)
            req.group_id, req.index = request_id, index
            if params.response_format is not None:
                req.matcher = self.grammars.matcher(grammar)
            self._text[sample_id] = TextState(self.tokenizer, params.stop)
            self._sent_tokens[sample_id] = 0
            samples.append(req)
        leader = samples[0]
        leader.forks = samples[1:]
        for fork in leader.forks:
            fork.arrival_seq = leader.arrival_seq     # scheduled as soon as the leader's prompt is in
        if len(samples) > 1:
            self._groups[request_id] = samples
        self.scheduler.add_request(leader)
        self._prompt_tokens += len(prompt_token_ids)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request (every sample of it) and free its blocks. Returns the final output of its first
        sample still running, or None if unknown (or every sample had finished)."""
        samples = self._groups.pop(request_id, None)
        if samples is None:
            req = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
            return None if req is None else self._final_output(req, [], "")
        outs = []
        for sample in samples:
            if sample.is_finished:
                continue
            if self.scheduler.finish_request(sample.request_id, RequestStatus.FINISHED_ABORTED) is None:
                sample.status = RequestStatus.FINISHED_ABORTED     # a fork not yet taken in
            outs.append(self._final_output(sample, [], ""))
        return outs[0] if outs else None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # step
    def step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        self._num_preemptions += len(sched.preempted)
        if self.proposer is not None:
            for req in sched.preempted:          # recomputed from scratch later, the draft's copy too
                self.proposer.release(req.request_id)
        if sched.is_empty:
            return []
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # a failed step fails the requests in it, never the process
            if is_device_fault(exc):
                self._die(exc)
            log.exception("model step failed")
            return self._fail(sched, f"internal error in model step: {type(exc).__name__}")
        self._steps_by_path[result.path] += 1
        self.scheduler.update_after_step(sched, result.num_accepted)
        self._count_speculation(sched, result)
        return self._postprocess(sched, result)

    # speculative decoding
    def _propose(self) -> None:
        """Proposals for every request about to decode. None while more than spec_max_batch requests
        decode (verification then costs more than it saves); per request, the k up to its limit that
        yields the most tokens per unit of step time given how often its proposals have been accepted
        (spec_decode/policy.py), never reaching past max_tokens or the context window, nor the step past
        the decode kernels' MAX_DECODE_ROWS rows."""
        decoding = [r for r in self.scheduler.running if r.num_tokens - r.num_computed_tokens == 1]
        spec = self.config.spec
        enabled = len(decoding) <= spec.spec_max_batch
        ks = []
        for req in decoding:
            req.acceptance.decay()
            room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens) - 1
            limit = min(self._spec_limit(req), room)
            ks.append(choose_k(req.acceptance.alpha, limit, spec.spec_row_cost) if enabled and limit > 0 else 0)
        # the step stays in the decode kernels' regime: past MAX_DECODE_ROWS rows it would leave the layer
        # stack for the per-layer torch path, far slower than the proposals save; the longest runs give way first
        budget = MAX_DECODE_ROWS - len(decoding)
        while sum(ks) > max(0, budget):
            ks[ks.index(max(ks))] -= 1
        proposals = self.proposer.propose(decoding, ks)
        for req, proposed in zip(decoding, proposals):
            req.spec_token_ids = proposed

    def _spec_limit(self, req: Request) -> int:
        """The request's k: its own setting, else the engine's."""
        k = req.num_speculative_tokens
        return self.config.spec.num_speculative_tokens if k is None else k

    def _count_speculation(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> None:
        for chunk in sched.chunks:
            k = len(chunk.spec_token_ids)
            if not k:
                continue
            req, accepted = chunk.request, result.num_accepted.get(chunk.request.request_id, 0)
            self.spec_stats.observe(k, accepted)
            req.acceptance.observe(k, accepted)

    def _postprocess(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        outputs = []
        for chunk in sched.chunks:
            req = chunk.request
            toks = result.sampled.get(req.request_id)
            if not toks:
                continue
            if req.num_output_tokens == 0:
                if req.num_preemptions == 0:
                    self._prefix_hit_tokens += req.num_cached_tokens or 0
                if req.forks:                 # the prompt is in: the other samples take its blocks
                    self._fork(req)
            # tokens of an accepted run one at a time: a stop condition inside it ends the request there
            text_state = self._text[req.request_id]
            delta, logprobs, reason = "", [], None
            error = None
            for tok in toks:
                if req.matcher is not None and not req.matcher.accept_token(tok.token_id):
                    # the step's mask allowed only what the grammar accepts: a refusal here is a bug, never output
                    log.error("the grammar refused a token its own mask allowed", extra={"token_id": tok.token_id})
                    reason, error = "error", "internal error: structured output went off its grammar"
                    break
                req.append_token(tok.token_id)
                self._generation_tokens += 1
                delta += text_state.push([tok.token_id])
                if tok.logprob is not None:
                    logprobs.append(TokenLogprob(tok.token_id, tok.logprob, tuple(tok.top)))
                reason = self._finish_reason(req, tok.token_id, text_state.stopped)
                if reason is not None:
                    break
            if reason is None:
                outputs.append(self._output(req, delta, logprobs))
                continue
            status = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH,
                      "error": RequestStatus.FINISHED_ERROR}[reason]
            self.scheduler.finish_request(req.request_id, status)
            outputs.append(self._final_output(req, logprobs, delta, error))
        return outputs

    def _fork(self, leader: Request) -> None:
        """The leader's prompt is computed: each other sample of it shares the prompt's blocks (a reference on
        each) up to the block that holds the last prompt token, and computes from there (at most a block's
        tokens: the last position's logits are its own first draw). Where a sliding-window group has already let
        go of a block those positions read, the sample computes the prompt itself."""
        kv = self.scheduler.kv
        bs = kv.block_size
        shared = (leader.num_prompt_tokens - 1) // bs
        start = shared * bs
        for g, window in enumerate(kv.windows):
            if window and any(b == kv.null_block for b in leader.block_tables[g][max(0, (start - window + 1) // bs):shared]):
                shared = start = 0
        for fork in leader.forks:
            fork.block_tables = [list(table[:shared]) for table in leader.block_tables]
            kv.pool.touch(b for table in fork.block_tables for b in table if b != kv.null_block)
            fork.num_released_blocks = [min(n, shared) for n in leader.num_released_blocks]
            fork.block_hashes = leader.block_hashes[:shared]
            fork.num_registered_blocks = min(leader.num_registered_blocks, shared)
            fork.num_computed_tokens = start
            fork.num_cached_tokens = 0
            fork.first_scheduled_time = leader.first_scheduled_time
            self.scheduler.add_request(fork)
        leader.forks = []

    def _finish_reason(self, req: Request, token_id: int, stop_string_hit: bool) -> str | None:
        p = req.params
        if stop_string_hit:
            return "stop"
        if req.num_output_tokens >= p.min_tokens:
            if token_id == req.eos_token_id and not p.ignore_eos:
                return "stop"
            if token_id in p.stop_token_ids:
                return "stop"
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, req: Request, text: str, logprobs: list[TokenLogprob]) -> RequestOutput:
        sent = self._sent_tokens[req.request_id]
        self._sent_tokens[req.request_id] = req.num_output_tokens
        return RequestOutput(
            request_id=req.group_id, new_token_ids=req.output_token_ids[sent:], text=text,
            logprobs=logprobs, num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens, num_cached_tokens=req.num_cached_tokens or 0,
            first_scheduled_time=req.first_scheduled_time, index=req.index)

    def _final_output(self, req: Request, logprobs: list[TokenLogprob], text: str,
                      error: str | None = None) -> RequestOutput:
        text_state = self._text.pop(req.request_id, None)
        if text_state is not None and req.status != RequestStatus.FINISHED_ABORTED:
            text += text_state.finish()
        out = self._output(req, text, logprobs)
        del self._sent_tokens[req.request_id]
        self.runner.release(req.request_id)
        if self.proposer is not None:
            self.proposer.release(req.request_id)
        out.finished = True
        out.finish_reason = req.status.value
        out.error = error
        samples = self._groups.get(req.group_id)
        if samples is not None and all(s.is_finished for s in samples):
            del self._groups[req.group_id]
        return out

    def _die(self, exc: BaseException) -> None:
        """After a device fault: fail and free every request, refuse new ones, raise EngineDeadError."""
        device = self.config.device.device
        self.fatal_error = (f"engine stopped after a device fault ({type(exc).__name__} on {device}): "
                            "restart the replica")
        log.critical("device fault in a model step: the engine stops, every request fails; restart the replica",
                     exc_info=exc, extra={"device": device})
        for request_id in list(self.scheduler.requests):
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
            self._text.pop(request_id, None)
            self._sent_tokens.pop(request_id, None)
        for samples in self._groups.values():
            for sample in samples:
                self._text.pop(sample.request_id, None)
                self._sent_tokens.pop(sample.request_id, None)
        self._groups.clear()
        raise EngineDeadError(self.fatal_error) from exc

    def _fail(self, sched: SchedulerOutput, message: str) -> list[RequestOutput]:
        # blocks were registered in the prefix cache when scheduled; their K/V may now be garbage
        self.scheduler.kv.pool.reset_prefix_cache()
        outs = []
        for chunk in sched.chunks:
            req = self.scheduler.finish_request(chunk.request.request_id, RequestStatus.FINISHED_ERROR)
            if req is not None:
                outs.append(self._final_output(req, [], "", error=message))
                for fork in req.forks:              # samples still waiting on its prompt fail with it
                    fork.status = RequestStatus.FINISHED_ERROR
                    outs.append(self._final_output(fork, [], "", error=message))
                req.forks = []
        return outs

    # introspection
    def stats(self) -> EngineStats:
        s, sp = self.scheduler, self.spec_stats
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_pending_tokens=s.num_pending_tokens(),
            num_free_blocks=s.kv.num_free_blocks, num_total_blocks=s.kv.num_blocks,
            kv_cache_usage=s.kv.usage, num_preemptions_total=self._num_preemptions,
            prefix_cache_hit_tokens_total=self._prefix_hit_tokens, prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens, spec_drafts_total=sp.drafts,
            spec_draft_tokens_total=sp.draft_tokens, spec_accepted_tokens_total=sp.accepted_tokens,
            spec_emitted_tokens_total=sp.emitted_tokens,
            spec_accepted_by_position=tuple(sp.accepted_by_position[:max(1, self.config.spec.num_speculative_tokens)]),
            steps_by_path=tuple((path.value, n) for path, n in self._steps_by_path.items()))

    # offline use
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 ) -> list[RequestOutput]:
        """Run prompts (token ids) to completion together; returns one merged output per prompt, in order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if any(p.n > 1 for p in params_list):
            raise InvalidRequestError("generate() returns one output per prompt: n > 1 is served by AsyncEngine")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        merged = {rid: RequestOutput(rid, [], "") for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                m = merged[out.request_id]
                m.new_token_ids.extend(out.new_token_ids)
                m.text += out.text
                m.logprobs.extend(out.logprobs)
                m.finished, m.finish_reason, m.error = out.finished, out.finish_reason, out.error
                m.num_prompt_tokens, m.num_output_tokens = out.num_prompt_tokens, out.num_output_tokens
                m.num_cached_tokens = out.num_cached_tokens
        return [merged[rid] for rid in ids]


def _seed_plus(seed: int, i: int) -> int:
    """seed + i within int64 (wrapping), the seed of a group's sample i (as vLLM seeds them)."""
    return (seed + i + 2**63) % 2**64 - 2**63
