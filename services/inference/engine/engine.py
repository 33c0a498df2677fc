"""LLMEngine: one model, its KV cache and scheduler. `step()` reads schedule -> run -> postprocess."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from services.common.errors import InvalidArgumentError, UnavailableError
from services.inference.engine.detokenize import TextState
from services.inference.engine.model_runner import ModelRunner, ModelRunnerOutput
from services.inference.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from services.inference.engine.request import Request, RequestStatus
from services.inference.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.inference.models.gguf_file import DEFAULT_MODEL_NAME, GGUFFile, default_model_path
from services.inference.models.linear import KERNEL_MAX_ROWS
from services.inference.models.llama import QUANTIZATIONS, LlamaModel
from services.inference.models.tokenizer import Tokenizer
from services.inference.sampling import SamplingParams
from services.inference.spec_decode import NgramProposer
from services.inference.spec_decode.draft import DraftProposer
from services.inference.spec_decode.policy import choose_k

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """"auto" -> on CPU, bfloat16 where the CPU multiplies bf16 natively (AMX or AVX512-BF16), else float32:
    without that hardware bf16 matmuls are emulated and run slower than float32. On a GPU float32: the CUDA
    and Triton attention kernels read float32 KV pools."""
    if dtype != "auto":
        return dtype
    if device != "cpu":
        return "float32"
    native_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return "bfloat16" if native_bf16 else "float32"


def same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" are one device (an index left out means the first)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def resolve_device(device: str, quantization: str | None) -> str:
    """"auto" -> "cuda" where torch sees a GPU and the weights are dense (the quantized kernels are CPU
    kernels), else "cpu". "cpu", "cuda" and "cuda:N" are taken as given (a missing GPU is an error)."""
    if device == "auto":
        return "cuda" if quantization is None and torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
        if quantization:
            raise ValueError(f"quantization {quantization!r} runs on CPU only; use device cpu or dense weights")
    return device


class InvalidRequestError(InvalidArgumentError):
    """The request cannot be served as asked (maps to INVALID_ARGUMENT)."""


MAX_SPECULATIVE_TOKENS = 16


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


@dataclass(slots=True, frozen=True)
class EngineConfig:
    model_path: str | None = None        # GGUF file; None = the packaged SmolLM2-135M-Instruct
    model_name: str = DEFAULT_MODEL_NAME # the name clients ask for
    dtype: str = "auto"                  # "float32" (reference), "bfloat16", or "auto" (see resolve_dtype)
    device: str = "auto"                 # "cpu", "cuda", "cuda:N", or "auto" (see resolve_device)
    quantization: str | None = None      # None (dense), "int8" (W8A8 + SmoothQuant) or "gguf" (the file's
                                         # Q4_1/Q8_0 blocks for decode); both with float32 activations
    max_model_len: int | None = None     # None = the model's context length
    block_size: int = 16
    num_kv_blocks: int | None = None     # None = from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    num_threads: int | None = None       # torch intra-op threads; None = leave torch's default
    # speculative decoding (issue 7): "ngram" = prompt lookup; requests may lower k or turn it off
    speculative: str | None = None       # None (off), "ngram" (prompt lookup) or "draft" (a draft model)
    draft_model_path: str | None = None  # "draft": GGUF sharing the tokenizer; None = the target's own file
    draft_quantization: str | None = "gguf"   # "draft": the draft's precision (gguf: the file's blocks)
    num_speculative_tokens: int = 4      # k: the most proposals verified per step (chosen per request up to this)
    spec_row_cost: float = 0.25          # one extra verified row's cost relative to a 1-row decode step
                                         # (spec_decode/policy.py; measured by bench.spec_decode)
    ngram_min: int = 2                   # shortest suffix matched against the request's own tokens
    ngram_max: int = 4                   # longest
    spec_max_batch: int = 4              # no proposals while more requests than this are decoding

    def validate(self) -> None:
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:")
                                                               and self.device[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be None, {' or '.join(map(repr, QUANTIZATIONS))}, got {self.quantization!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be > 0")
        if self.speculative not in (None, "ngram", "draft"):
            raise ValueError(f"speculative must be None, 'ngram' or 'draft', got {self.speculative!r}")
        if self.draft_quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"draft_quantization must be None or one of {QUANTIZATIONS}")
        if not 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}]")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        if self.spec_max_batch < 0:
            raise ValueError("spec_max_batch must be >= 0")
        if not 0 <= self.spec_row_cost <= 10:
            raise ValueError(f"spec_row_cost must be in [0, 10], got {self.spec_row_cost}")


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LlamaModel | None = None,
                 tokenizer: Tokenizer | None = None, draft_model: LlamaModel | None = None) -> None:
        """`model`/`tokenizer`/`draft_model` reuse already-loaded ones (tests, several engines in one process)."""
        config.validate()
        # the quantized paths keep float32 activations; an already-loaded model decides "auto"'s device
        device = str(model.device) if model is not None and config.device == "auto" else \
            resolve_device(config.device, config.quantization)
        config = replace(config, device=device,
                         dtype="float32" if config.quantization else resolve_dtype(config.dtype, device))
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        if model is None or tokenizer is None:
            gguf = GGUFFile(Path(config.model_path) if config.model_path else default_model_path())
            tokenizer = tokenizer or Tokenizer.from_gguf(gguf)
            model = model or LlamaModel.from_gguf(gguf, DTYPES[config.dtype], config.quantization, config.device)
        if model.dtype != DTYPES[config.dtype] or model.quantization != config.quantization or \
                not same_device(model.device, torch.device(config.device)):
            raise ValueError(f"model was loaded as {model.dtype}/{model.quantization} on {model.device}, "
                             f"config asks for {config.dtype}/{config.quantization} on {config.device}")
        self.tokenizer = tokenizer
        self.model = model
        hp = self.model.hp
        self.hparams = hp
        self.max_model_len = min(config.max_model_len or hp.max_position_embeddings, hp.max_position_embeddings)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            bytes_per_block = 2 * hp.num_layers * config.block_size * hp.num_kv_heads * hp.head_dim * \
                DTYPES[config.dtype].itemsize
            num_blocks = max(1, int(config.kv_cache_memory_gb * 2**30) // bytes_per_block)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, block_size=config.block_size, num_kv_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching))
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        self._text: dict[str, TextState] = {}
        self._sent_tokens: dict[str, int] = {}
        self.fatal_error: str | None = None         # set by a device fault (the message): the engine no longer runs
        self._num_preemptions = 0
        self._prefix_hit_tokens = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self.proposer: NgramProposer | DraftProposer | None = None
        if config.speculative == "ngram":
            self.proposer = NgramProposer(config.ngram_min, config.ngram_max)
        elif config.speculative == "draft":
            if draft_model is None:
                path = Path(config.draft_model_path) if config.draft_model_path else \
                    Path(config.model_path) if config.model_path else default_model_path()
                # a dense draft sits with the target; a quantized one runs on the CPU (its kernels are CPU kernels)
                draft_device = config.device if config.draft_quantization is None else "cpu"
                draft_model = LlamaModel.from_gguf(GGUFFile(path), torch.float32, config.draft_quantization,
                                                   draft_device)
            if draft_model.device.type != self.model.device.type:
                log.warning("the draft model runs on %s and the target on %s: each proposal crosses devices "
                            "(with a GPU target, --draft-quantization none keeps the draft on the GPU)",
                            draft_model.device, self.model.device)
            self.proposer = DraftProposer(draft_model, num_blocks, config.block_size, hp.vocab_size)
        self._spec_drafts = 0                      # verification runs that carried proposals
        self._spec_draft_tokens = 0
        self._spec_accepted_tokens = 0
        self._spec_emitted_tokens = 0              # tokens those runs produced (accepted + 1 each)
        self._spec_accepted_by_position = [0] * MAX_SPECULATIVE_TOKENS
        log.info("engine ready", extra={"model": config.model_name, "dtype": config.dtype,
                                         "num_kv_blocks": num_blocks, "max_model_len": self.max_model_len})

    # requests
    @property
    def num_kv_blocks(self) -> int:
        return self.scheduler.kv.num_blocks

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def check_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                      model: str = "") -> int:
        """Validate a request; returns max_tokens resolved. Raises InvalidRequestError."""
        if model and model != self.config.model_name:
            raise InvalidRequestError(f"unknown model {model!r}; this replica serves {self.config.model_name!r}")
        try:
            params.validate(self.hparams.vocab_size)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty")
        if any(not 0 <= t < self.hparams.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.hparams.vocab_size})")
        capacity = self.num_kv_blocks * self.config.block_size
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

    def check_speculative(self, num_speculative_tokens: int | None) -> None:
        if num_speculative_tokens is not None and not 0 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], "
                                      f"got {num_speculative_tokens}")

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                    request_id: str | None = None, priority: int = 0, model: str = "",
                    num_speculative_tokens: int | None = None) -> str:
        """num_speculative_tokens: this request's k (0 = no speculation; None = the engine's setting)."""
        if self.fatal_error is not None:
            raise EngineDeadError(self.fatal_error)
        max_tokens = self.check_request(prompt_token_ids, params, model)
        self.check_speculative(num_speculative_tokens)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already running")
        req = Request(request_id, list(prompt_token_ids), params, max_tokens, priority,
                      eos_token_id=self.tokenizer.eos_token_id, num_speculative_tokens=num_speculative_tokens)
        self.scheduler.add_request(req)
        self._text[request_id] = TextState(self.tokenizer, params.stop)
        self._sent_tokens[request_id] = 0
        self._prompt_tokens += len(prompt_token_ids)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its blocks. Returns its final output, or None if unknown."""
        req = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if req is None:
            return None
        return self._final_output(req, [], "")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # step
    def step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        self._num_preemptions += len(sched.preempted)
        if isinstance(self.proposer, DraftProposer):
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
        self.scheduler.update_after_step(sched, result.num_accepted)
        self._count_speculation(sched, result)
        return self._postprocess(sched, result)

    # speculative decoding
    def _propose(self) -> None:
        """Proposals for every request about to decode. None while more than spec_max_batch requests
        decode (verification then costs more than it saves); per request, the k up to its limit that
        yields the most tokens per unit of step time given how often its proposals have been accepted
        (spec_decode/policy.py), never reaching past max_tokens or the context window, nor the step past
        the decode kernels' KERNEL_MAX_ROWS rows."""
        decoding = [r for r in self.scheduler.running if r.num_tokens - r.num_computed_tokens == 1]
        enabled = len(decoding) <= self.config.spec_max_batch
        ks = []
        for req in decoding:
            req.acceptance.decay()
            room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens) - 1
            limit = min(self._spec_limit(req), room)
            ks.append(choose_k(req.acceptance.alpha, limit, self.config.spec_row_cost) if enabled and limit > 0 else 0)
        # the step stays in the decode kernels' regime: past KERNEL_MAX_ROWS rows it would run the float32
        # path, far slower than the proposals save; the longest runs give way first
        budget = KERNEL_MAX_ROWS - len(decoding)
        while sum(ks) > max(0, budget):
            ks[ks.index(max(ks))] -= 1
        if isinstance(self.proposer, DraftProposer):
            proposals = self.proposer.propose(decoding, ks)
        else:
            proposals = [self.proposer.propose(r.all_token_ids, k) if k > 0 else [] for r, k in zip(decoding, ks)]
        for req, spec in zip(decoding, proposals):
            req.spec_token_ids = spec

    def _spec_limit(self, req: Request) -> int:
        """The request's k: its own setting, else the engine's."""
        return self.config.num_speculative_tokens if req.num_speculative_tokens is None else req.num_speculative_tokens

    def _count_speculation(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> None:
        for chunk in sched.chunks:
            k = len(chunk.spec_token_ids)
            if not k:
                continue
            req, accepted = chunk.request, result.num_accepted.get(chunk.request.request_id, 0)
            self._spec_drafts += 1
            self._spec_draft_tokens += k
            self._spec_accepted_tokens += accepted
            self._spec_emitted_tokens += accepted + 1
            for i in range(accepted):
                self._spec_accepted_by_position[i] += 1
            req.acceptance.observe(k, accepted)

    def _postprocess(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        outputs = []
        for chunk in sched.chunks:
            req = chunk.request
            toks = result.sampled.get(req.request_id)
            if not toks:
                continue
            if req.num_output_tokens == 0 and req.num_preemptions == 0:
                self._prefix_hit_tokens += req.num_cached_tokens or 0
            # tokens of an accepted run one at a time: a stop condition inside it ends the request there
            text_state = self._text[req.request_id]
            delta, logprobs, reason = "", [], None
            for tok in toks:
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
            status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
            self.scheduler.finish_request(req.request_id, status)
            outputs.append(self._final_output(req, logprobs, delta))
        return outputs

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
            request_id=req.request_id, new_token_ids=req.output_token_ids[sent:], text=text,
            logprobs=logprobs, num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens, num_cached_tokens=req.num_cached_tokens or 0,
            first_scheduled_time=req.first_scheduled_time)

    def _final_output(self, req: Request, logprobs: list[TokenLogprob], text: str,
                      error: str | None = None) -> RequestOutput:
        text_state = self._text.pop(req.request_id, None)
        if text_state is not None and req.status != RequestStatus.FINISHED_ABORTED:
            text += text_state.finish()
        out = self._output(req, text, logprobs)
        del self._sent_tokens[req.request_id]
        self.runner.release(req.request_id)
        if isinstance(self.proposer, DraftProposer):
            self.proposer.release(req.request_id)
        out.finished = True
        out.finish_reason = req.status.value
        out.error = error
        return out

    def _die(self, exc: BaseException) -> None:
        """After a device fault: fail and free every request, refuse new ones, raise EngineDeadError."""
        self.fatal_error = (f"engine stopped after a device fault ({type(exc).__name__} on {self.config.device}): "
                            "restart the replica")
        log.critical("device fault in a model step: the engine stops, every request fails; restart the replica",
                     exc_info=exc, extra={"device": self.config.device})
        for request_id in list(self.scheduler.requests):
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
            self._text.pop(request_id, None)
            self._sent_tokens.pop(request_id, None)
        raise EngineDeadError(self.fatal_error) from exc

    def _fail(self, sched: SchedulerOutput, message: str) -> list[RequestOutput]:
        # blocks were registered in the prefix cache when scheduled; their K/V may now be garbage
        self.scheduler.kv.pool.reset_prefix_cache()
        outs = []
        for chunk in sched.chunks:
            req = self.scheduler.finish_request(chunk.request.request_id, RequestStatus.FINISHED_ERROR)
            if req is not None:
                outs.append(self._final_output(req, [], "", error=message))
        return outs

    # introspection
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_pending_tokens=s.num_pending_tokens(),
            num_free_blocks=s.kv.num_free_blocks, num_total_blocks=s.kv.num_blocks,
            kv_cache_usage=s.kv.usage, num_preemptions_total=self._num_preemptions,
            prefix_cache_hit_tokens_total=self._prefix_hit_tokens, prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens, spec_drafts_total=self._spec_drafts,
            spec_draft_tokens_total=self._spec_draft_tokens, spec_accepted_tokens_total=self._spec_accepted_tokens,
            spec_emitted_tokens_total=self._spec_emitted_tokens,
            spec_accepted_by_position=tuple(self._spec_accepted_by_position[:max(1, self.config.num_speculative_tokens)]))

    # offline use
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 ) -> list[RequestOutput]:
        """Run prompts (token ids) to completion together; returns one merged output per prompt, in order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
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
