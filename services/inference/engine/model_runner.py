"""The only engine code that touches tensors: builds a step's inputs, runs the model, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import available as kernels_available
from kernels.attention import KV_DTYPES, PagedDecode
from services.inference.engine.request import Request
from services.inference.engine.scheduler import ScheduledChunk, SchedulerOutput
from services.inference.models.attention import AttentionMetadata, PrefillSpan, new_kv_pool
from services.inference.models.llama import LlamaModel
from services.inference.sampling import SamplingRow, build_sampling_metadata, make_generator, sample


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None                          # of the sampled token, when asked
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n (token id, logprob)


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: dict[str, SampledToken]   # request_id -> the token sampled this step


class ModelRunner:
    def __init__(self, model: LlamaModel, num_kv_blocks: int, block_size: int) -> None:
        hp = model.hp
        self.model = model
        self.block_size = block_size
        num_slots = num_kv_blocks * block_size
        self.kv_caches = [(new_kv_pool(hp.num_kv_heads, num_slots, hp.head_dim, model.dtype),
                           new_kv_pool(hp.num_kv_heads, num_slots, hp.head_dim, model.dtype))
                          for _ in range(hp.num_layers)]
        self._generators: dict[str, torch.Generator] = {}

    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator | None:
        if req.params.greedy:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = self._generators[req.request_id] = make_generator(req.params.seed)
        return gen

    # inputs
    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        ids: list[int] = []
        pos: list[int] = []
        for c in decodes + prefills:
            ids.extend(c.request.all_token_ids[c.start:c.start + c.num_tokens])
            pos.extend(range(c.start, c.start + c.num_tokens))
        positions = torch.tensor(pos, dtype=torch.int64)
        slot_parts = []
        bs = self.block_size
        # decode: one query per sequence over its padded block table
        table = mask = None
        if decodes:
            ctx = torch.tensor([c.start + 1 for c in decodes], dtype=torch.int64)
            nb = max(len(c.request.block_ids) for c in decodes)
            table = torch.tensor([c.request.block_ids + [0] * (nb - len(c.request.block_ids))
                                  for c in decodes], dtype=torch.int64)
            mask = torch.arange(nb * bs)[None, :] < ctx[:, None]
            last = ctx - 1
            slot_parts.append(table.gather(1, (last // bs)[:, None]).squeeze(1) * bs + last % bs)
        # prefill: one span per chunk, attending to its cached context plus itself
        spans = []
        row = len(decodes)
        for c in prefills:
            ctx_len = c.start + c.num_tokens
            nb = -(-ctx_len // bs)
            block_ids = torch.tensor(c.request.block_ids[:nb], dtype=torch.int64)
            new_pos = torch.arange(c.start, ctx_len)
            slot_parts.append(block_ids[new_pos // bs] * bs + new_pos % bs)
            if c.start == 0:
                spans.append(PrefillSpan(row, row + c.num_tokens, None, None))
            else:
                span_mask = torch.arange(nb * bs)[None, :] <= new_pos[:, None]
                spans.append(PrefillSpan(row, row + c.num_tokens, block_ids, span_mask))
            row += c.num_tokens
        plan = None
        if decodes and kernels_available() and self.kv_caches[0][0].dtype in KV_DTYPES:
            plan = PagedDecode(table, ctx, bs)          # checked once, used by every layer
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_parts) if len(slot_parts) > 1 else slot_parts[0], block_size=bs,
            num_decode_tokens=len(decodes), decode_block_table=table, decode_mask=mask, prefills=spans,
            decode_plan=plan)
        return torch.tensor(ids, dtype=torch.int64), positions, meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        input_ids, positions, meta = self._prepare(out.chunks)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)
        # sample: last row of every chunk that reaches the end of its tokens
        ordered = [c for c in out.chunks if c.num_tokens == 1] + [c for c in out.chunks if c.num_tokens > 1]
        rows, sampling = [], []
        end = 0
        for c in ordered:
            end += c.num_tokens
            if c.samples:
                rows.append(end - 1)
                sampling.append(c.request)
        if not rows:
            return ModelRunnerOutput({})
        logits = self.model.compute_logits(hidden[torch.tensor(rows)])
        meta_s = build_sampling_metadata([self._sampling_row(r) for r in sampling], logits.shape[-1])
        res = sample(logits, meta_s)
        token_ids = res.token_ids.tolist()
        sampled = {}
        for i, req in enumerate(sampling):
            tok = SampledToken(token_ids[i])
            n = req.params.logprobs
            if n is not None and res.logprobs is not None:
                tok.logprob = float(res.logprobs[i])
                if n > 0:
                    tok.top = list(zip(res.top_token_ids[i, :n].tolist(), res.top_logprobs[i, :n].tolist()))
            sampled[req.request_id] = tok
        return ModelRunnerOutput(sampled)

    def _sampling_row(self, req: Request) -> SamplingRow:
        p = req.params
        banned: tuple[int, ...] = ()
        if req.num_output_tokens < p.min_tokens:
            banned = tuple(p.stop_token_ids) + ((req.eos_token_id,) if req.eos_token_id is not None else ())
        return SamplingRow(params=p, prompt_token_ids=req.prompt_token_ids,
                           output_token_ids=req.output_token_ids, generator=self._generator(req),
                           banned_token_ids=banned)
