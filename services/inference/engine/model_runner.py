"""The only engine code that touches tensors: builds a step's inputs, runs the model, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.attention import PagedAttention, paged_kernel_for
from services.inference.engine.request import Request
from services.inference.engine.scheduler import ScheduledChunk, SchedulerOutput
from services.inference.models.attention import AttentionMetadata, PrefillSpan, new_kv_pool
from services.inference.models.llama import LlamaModel
from services.inference.sampling import SamplingRow, build_sampling_metadata, make_generator, sample, target_distribution
from services.inference.sampling.sampler import random_sample
from services.inference.spec_decode import greedy_verify, rejection_sample


# Chunks of up to this many rows go through the paged-attention kernel with the decodes (speculative
# verification runs, short prefill chunks); longer prefill chunks use torch's SDPA, whose GEMMs are faster
# there on CPU (kernels.bench / the issue-6 notes).
PAGED_MAX_ROWS = 16


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None                          # of the sampled token, when asked
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n (token id, logprob)


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: dict[str, list[SampledToken]]   # request_id -> this step's tokens (several after accepted proposals)
    num_accepted: dict[str, int] = field(default_factory=dict)   # request_id -> proposals accepted


class ModelRunner:
    def __init__(self, model: LlamaModel, num_kv_blocks: int, block_size: int) -> None:
        hp = model.hp
        self.model = model
        self.block_size = block_size
        self.device = model.device
        num_slots = num_kv_blocks * block_size
        self.kv_caches = [(new_kv_pool(hp.num_kv_heads, num_slots, hp.head_dim, model.dtype, self.device),
                           new_kv_pool(hp.num_kv_heads, num_slots, hp.head_dim, model.dtype, self.device))
                          for _ in range(hp.num_layers)]
        self._generators: dict[str, torch.Generator] = {}
        self.stack = model.layer_stack(self.kv_caches, block_size)     # int8 layers in one C++ call, or None

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

    def _paged_kernel(self) -> bool:
        """Whether paged rows go through a paged-attention kernel (kernels.attention.paged_kernel_for)."""
        return paged_kernel_for(self.device, self.kv_caches[0][0].dtype, self.model.hp.head_dim, self.block_size)

    # inputs
    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], torch.Tensor, torch.Tensor,
                                                              AttentionMetadata]:
        """Lays a step out as paged rows first (decodes, and with the kernels every chunk of at most
        PAGED_MAX_ROWS rows: short prefill chunks, speculative verification runs), then the longer prefill
        chunks; returns the chunks in that order with the step's inputs."""
        use_kernel = self._paged_kernel()
        limit = PAGED_MAX_ROWS if use_kernel else 1
        paged = [c for c in chunks if c.num_tokens <= limit]
        prefills = [c for c in chunks if c.num_tokens > limit]
        ordered = paged + prefills
        num_paged_rows = sum(c.num_tokens for c in paged)
        ids: list[int] = []
        pos: list[int] = []
        for c in ordered:
            known = c.num_tokens - len(c.spec_token_ids)
            ids.extend(c.request.all_token_ids[c.start:c.start + known])
            ids.extend(c.spec_token_ids)
            pos.extend(range(c.start, c.start + c.num_tokens))
        positions = torch.tensor(pos, dtype=torch.int64)
        slot_parts = []
        bs = self.block_size
        # paged rows: each sequence's new rows over its padded block table
        table = mask = plan = None
        if paged:
            ctx = torch.tensor([c.start + c.num_tokens for c in paged], dtype=torch.int64)
            nb = max(len(c.request.block_ids) for c in paged)
            table = torch.tensor([c.request.block_ids + [0] * (nb - len(c.request.block_ids))
                                  for c in paged], dtype=torch.int64)
            new_pos = positions[:num_paged_rows]
            row_seq = torch.repeat_interleave(torch.arange(len(paged)), torch.tensor([c.num_tokens for c in paged]))
            slot_parts.append(table[row_seq, new_pos // bs] * bs + new_pos % bs)
            if use_kernel:              # checked once, used by every layer
                plan = PagedAttention(table, ctx, bs, torch.tensor([c.num_tokens for c in paged], dtype=torch.int64))
            else:                       # decodes only: the torch path's context mask
                mask = torch.arange(nb * bs)[None, :] < ctx[:, None]
        # longer prefill chunks: one span each, attending to its cached context plus itself
        spans = []
        row = num_paged_rows
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
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_parts) if len(slot_parts) > 1 else slot_parts[0], block_size=bs,
            num_paged_rows=num_paged_rows, paged_block_table=table, decode_mask=mask,
            prefills=spans, paged_plan=plan)
        return ordered, torch.tensor(ids, dtype=torch.int64), positions, meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        ordered, input_ids, positions, meta = self._prepare(out.chunks)
        if self.device.type != "cpu":
            input_ids, positions = input_ids.to(self.device), positions.to(self.device)
            meta = meta.to(self.device)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta, self.stack)
        # sample: the last row of every chunk that reaches the end of its tokens, and every row of a
        # chunk with proposals (row i: the target's choice after the first i proposals)
        rows: list[int] = []
        sampling: list[SamplingRow] = []
        groups: list[tuple[ScheduledChunk, int]] = []       # (chunk, its first row in `rows`)
        end = 0
        for c in ordered:
            end += c.num_tokens
            if not c.samples:
                continue
            k = len(c.spec_token_ids)
            groups.append((c, len(rows)))
            for i in range(k + 1):
                rows.append(end - 1 - k + i)
                sampling.append(self._sampling_row(c.request, c.spec_token_ids[:i]))
        if not rows:
            return ModelRunnerOutput({})
        # sampling runs on CPU: a step's logits are a few rows of 49,152 floats
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)]).cpu()
        meta_s = build_sampling_metadata(sampling, logits.shape[-1])
        if all(not c.spec_token_ids for c, _ in groups):
            res = sample(logits, meta_s)
            tokens = {c.request.request_id: [t] for (c, _), t in zip(groups, res.token_ids.tolist())}
            accepted: dict[str, int] = {}
        else:
            tokens, accepted = self._verify(groups, logits, meta_s)
        sampled = {}
        for c, first in groups:
            req, emitted = c.request, tokens[c.request.request_id]
            n = req.params.logprobs
            out_tokens = [SampledToken(t) for t in emitted]
            if n is not None:
                at = torch.arange(first, first + len(emitted))
                logp = logits[at].float().log_softmax(dim=-1)
                chosen = logp.gather(1, torch.tensor(emitted)[:, None]).squeeze(1).tolist()
                top_lp, top_ids = logp.topk(n, dim=-1) if n > 0 else (None, None)
                for i, tok in enumerate(out_tokens):
                    tok.logprob = chosen[i]
                    if n > 0:
                        tok.top = list(zip(top_ids[i].tolist(), top_lp[i].tolist()))
            sampled[req.request_id] = out_tokens
        return ModelRunnerOutput(sampled, accepted)

    def _verify(self, groups: list[tuple[ScheduledChunk, int]], logits: torch.Tensor,
                meta) -> tuple[dict[str, list[int]], dict[str, int]]:
        """Tokens per request when some chunks carry proposals: greedy rows by exact match with the
        target's argmax, sampled rows by rejection sampling (n-gram proposals are point masses); chunks
        without proposals draw as `sample` does, from their own generator."""
        greedy_tokens, probs = target_distribution(logits, meta)
        tokens: dict[str, list[int]] = {}
        accepted: dict[str, int] = {}
        for c, first in groups:
            req, k = c.request, len(c.spec_token_ids)
            span = slice(first, first + k + 1)
            gen = self._generator(req)
            if req.params.greedy:
                if k == 0:
                    tokens[req.request_id] = [int(greedy_tokens[first])]
                    continue
                out, n_acc = greedy_verify(greedy_tokens[span][None], torch.tensor([c.spec_token_ids]), torch.tensor([k]))
            elif k == 0:
                tokens[req.request_id] = [int(random_sample(probs[first:first + 1], [gen])[0])]
                continue
            else:
                out, n_acc = rejection_sample(probs[span][None], torch.tensor([c.spec_token_ids]), torch.tensor([k]),
                                              None, [gen])
            a = int(n_acc[0])
            tokens[req.request_id] = out[0, :a + 1].tolist()
            accepted[req.request_id] = a
        return tokens, accepted

    def _sampling_row(self, req: Request, proposed: list[int] | None = None) -> SamplingRow:
        """The request's sampling state, after `proposed` tokens (a verification row sees its run's
        earlier proposals as output: penalties and min_tokens apply as if they had been sampled)."""
        p = req.params
        proposed = proposed or []
        banned: tuple[int, ...] = ()
        if req.num_output_tokens + len(proposed) < p.min_tokens:
            banned = tuple(p.stop_token_ids) + ((req.eos_token_id,) if req.eos_token_id is not None else ())
        outputs = req.output_token_ids + proposed if proposed else req.output_token_ids
        return SamplingRow(params=p, prompt_token_ids=req.prompt_token_ids, output_token_ids=outputs,
                           generator=self._generator(req), banned_token_ids=banned)
