"""The only engine code that touches tensors: builds a step's inputs, runs the model, samples. It binds the
model to its KV pools once, and with them chooses the model's compute path (models/compute.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from kernels import PagedAttention
from services.inference.engine.request import Request
from services.inference.engine.scheduler import ScheduledChunk, SchedulerOutput
from services.inference.engine.kv_layout import KVLayout
from services.inference.models.attention import AttentionMetadata, PrefillSpan, new_kv_pool, window_metadata
from services.inference.models.compute import StepPath, choose_compute
from services.inference.models.registry import CausalLM
from services.inference.sampling.sampler import (SamplerOutput, SamplingRow, argmax_rows, build_sampling_metadata,
                                                 compute_logprobs, make_generator, random_sample, sample,
                                                 target_distribution)
from services.inference.sampling.structured import TokenMasks, allowed, apply_masks
from services.inference.spec_decode.rejection import greedy_verify, rejection_sample

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None                          # of the sampled token, when asked
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n (token id, logprob)


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: dict[str, list[SampledToken]]   # request_id -> this step's tokens (several after accepted proposals)
    num_accepted: dict[str, int] = field(default_factory=dict)   # request_id -> proposals accepted
    path: StepPath | None = None             # the implementation the step ran (models/compute.py)


class ModelRunner:
    def __init__(self, model: CausalLM, num_kv_blocks: int, block_size: int, layout: KVLayout | None = None) -> None:
        """`num_kv_blocks`: the pool's blocks (the KV cache manager's, its null block included); `layout`: how the
        layers share them (engine/kv_layout.py; default: the model's)."""
        hp = model.hp
        self.model = model
        self.block_size = block_size
        self.device = model.device
        self.layout = layout or KVLayout.for_model(hp)
        num_slots = num_kv_blocks * block_size
        pools = [(new_kv_pool(hp.num_kv_heads, num_slots, hp.head_dim, model.dtype, self.device),
                  new_kv_pool(hp.num_kv_heads, num_slots, hp.head_dim, model.dtype, self.device))
                 for _ in range(self.layout.num_tensors)]
        self.kv_caches = [pools[self.layout.tensor_of(i)] for i in range(hp.num_layers)]   # per layer
        self._layer_group = [self.layout.group_of(i) for i in range(hp.num_layers)]
        self._generators: dict[str, torch.Generator] = {}
        self._masks = TokenMasks()               # structured output's bitmask buffer (sampling/structured.py)
        self.compute = choose_compute(model, self.kv_caches, block_size, self._layer_group)
        self._on_forward: Callable[[], None] | None = None
        log.info("compute path", extra={"device": str(self.device), **self.compute.describe()})

    @property
    def on_forward(self) -> Callable[[], None] | None:
        """Called once a step, on the engine's thread, as the step's longest stretch without the GIL begins:
        just before the layer stack's C++ call on its path (kernels/stack.py), else just before the forward.
        AsyncEngine hands the previous step's outputs to the event loop here, so that the loop's Python runs
        while the engine needs no GIL."""
        return self._on_forward

    @on_forward.setter
    def on_forward(self, hook: Callable[[], None] | None) -> None:
        self._on_forward = hook
        if self.compute.layer_stack is not None:
            self.compute.layer_stack.before_run = hook

    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in {id(p[0]): p for p in self.kv_caches}.values())

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
    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], torch.Tensor, torch.Tensor,
                                                              AttentionMetadata]:
        """Lays a step out as paged rows first (decodes, and with the paged-attention kernel every chunk of
        at most kernels.MAX_DECODE_ROWS rows: short prefill chunks, speculative verification runs), then the
        longer prefill chunks, whose attention runs torch's SDPA (faster there on CPU: bench.kernels); returns
        the chunks in that order with the step's inputs."""
        limit = self.compute.paged_max_rows
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
        metas = [self._group_metadata(g, paged, prefills, num_paged_rows) for g in range(len(self.layout.groups))]
        meta = metas[0]
        if len(metas) > 1 or self.layout.hybrid:
            meta.per_layer = [metas[g] for g in self._layer_group]
        return ordered, torch.tensor(ids, dtype=torch.int64), positions, meta

    def _group_metadata(self, group: int, paged: list[ScheduledChunk], prefills: list[ScheduledChunk],
                        num_paged_rows: int) -> AttentionMetadata:
        """The step's attention metadata over one layer group's block tables (engine/kv_layout.py), its masks
        cut to the group's window where it has one."""
        slot_parts = []
        bs = self.block_size
        window = self.layout.windows[group]
        # paged rows: each sequence's new rows over its padded block table
        table = mask = plan = None
        if paged:                       # built from Python lists: a decode step's few rows cost less so
            tables = [c.request.block_tables[group] for c in paged]
            ctx_lens = [c.start + c.num_tokens for c in paged]
            slot_parts.append(torch.tensor([t[p // bs] * bs + p % bs for c, t in zip(paged, tables)
                                            for p in range(c.start, c.start + c.num_tokens)], dtype=torch.int64))
            if self.compute.paged_attention:       # checked once, used by every layer
                plan = PagedAttention.from_lists(tables, ctx_lens, bs, [c.num_tokens for c in paged], window)
                table = plan.block_table
            else:                       # decodes only: the torch path's context mask
                nb = max(len(t) for t in tables)
                table = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.int64)
                mask = torch.arange(nb * bs)[None, :] < torch.tensor(ctx_lens, dtype=torch.int64)[:, None]
        # longer prefill chunks: one span each, attending to its cached context plus itself
        spans = []
        row = num_paged_rows
        for c in prefills:
            ctx_len = c.start + c.num_tokens
            nb = -(-ctx_len // bs)
            block_ids = torch.tensor(c.request.block_tables[group][:nb], dtype=torch.int64)
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
        if window:
            meta = window_metadata(meta, window, [c.start + c.num_tokens for c in paged], [c.start for c in prefills])
        return meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        ordered, input_ids, positions, meta = self._prepare(out.chunks)
        if self.device.type != "cpu":
            input_ids, positions = input_ids.to(self.device), positions.to(self.device)
            meta = meta.to(self.device)
        path = self.compute.step_path(len(input_ids), not meta.prefills)
        if self._on_forward is not None and path is not StepPath.LAYER_STACK:
            self._on_forward()                   # (the layer stack calls it itself, as its C++ call begins)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta, self.compute)
        num_rows = hidden.shape[0]
        # sample: the last row of every chunk that reaches the end of its tokens, and every row of a
        # chunk with proposals (row i: the target's choice after the first i proposals)
        rows: list[int] = []
        groups: list[tuple[ScheduledChunk, int]] = []       # (chunk, its first row in `rows`)
        end = 0
        for c in ordered:
            end += c.num_tokens
            if not c.samples:
                continue
            k = len(c.spec_token_ids)
            groups.append((c, len(rows)))
            rows.extend(range(end - 1 - k, end))
        if not rows:
            return ModelRunnerOutput({}, path=path)
        # sampling runs on CPU: a step's logits are a few rows of 49,152 floats
        if len(rows) < num_rows:                 # else every row is sampled, in order (decode steps)
            hidden = hidden[torch.tensor(rows, device=hidden.device)]
        logits = self.model.compute_logits(hidden).cpu()
        plain = all(not c.spec_token_ids and self._plain_argmax(c.request) for c, _ in groups)
        constrained = [(first, c.request.matcher, c.spec_token_ids) for c, first in groups
                       if c.request.matcher is not None]
        if plain:
            # the common greedy step: the argmax of the raw logits, without the sampler's per-step tensors
            top = argmax_rows(logits).tolist()
            if constrained:                      # structured output: a row's own argmax stands where its grammar
                self._constrain_argmax(logits, constrained, len(rows), top)   # allows it
            return ModelRunnerOutput({c.request.request_id: [SampledToken(t)] for (c, _), t in zip(groups, top)},
                                     {}, path)
        if constrained:                          # structured output: tokens the grammar refuses are -inf
            bitmask = self._masks.fill(constrained, len(rows), logits.shape[-1])
            apply_masks(logits, bitmask, [r for first, _, p in constrained for r in range(first, first + len(p) + 1)])
        sampling = [self._sampling_row(c.request, c.spec_token_ids[:i])
                    for c, _ in groups for i in range(len(c.spec_token_ids) + 1)]
        meta_s = build_sampling_metadata(sampling, logits.shape[-1])
        if all(not c.spec_token_ids for c, _ in groups):
            res: SamplerOutput | None = sample(logits, meta_s)
            tokens = {c.request.request_id: [t] for (c, _), t in zip(groups, res.token_ids.tolist())}
            accepted: dict[str, int] = {}
        else:
            res = None
            tokens, accepted = self._verify(groups, logits, meta_s)
        sampled = {}
        for c, first in groups:
            req, emitted = c.request, tokens[c.request.request_id]
            out_tokens = [SampledToken(t) for t in emitted]
            n = req.params.logprobs
            if n is not None:
                self._attach_logprobs(out_tokens, n, res, logits, first)
            sampled[req.request_id] = out_tokens
        return ModelRunnerOutput(sampled, accepted, path)

    def _constrain_argmax(self, logits: torch.Tensor, constrained, num_rows: int, top: list[int]) -> None:
        """Greedy rows under a grammar: the raw argmax where the mask allows it (the model mostly writes what the
        format wants), else the argmax of the masked row; only the refused rows are masked."""
        bitmask = self._masks.fill(constrained, num_rows, logits.shape[-1])
        firsts = [first for first, _, _ in constrained]
        refused = [r for r, ok in zip(firsts, allowed(bitmask, firsts, [top[r] for r in firsts])) if not ok]
        if refused:
            apply_masks(logits, bitmask, refused)
            for r, t in zip(refused, argmax_rows(logits[refused]).tolist()):
                top[r] = t

    @staticmethod
    def _attach_logprobs(out_tokens: list[SampledToken], n: int, res: SamplerOutput | None, logits: torch.Tensor,
                         first: int) -> None:
        """Each emitted token's log-probability and the top n of its row: the sampler's, computed with the
        sample (one row per chunk), or by the sampler's compute_logprobs over the rows of a verified run."""
        rows = slice(first, first + len(out_tokens))
        if res is not None:
            chosen, top_ids, top_lp = res.logprobs[rows], res.top_token_ids[rows, :n], res.top_logprobs[rows, :n]
        else:
            chosen, top_ids, top_lp = compute_logprobs(logits[rows].float(),
                                                       torch.tensor([t.token_id for t in out_tokens]), n)
        for tok, lp, ids, lps in zip(out_tokens, chosen.tolist(), top_ids.tolist(), top_lp.tolist()):
            tok.logprob = lp
            tok.top = list(zip(ids, lps))

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

    @staticmethod
    def _plain_argmax(req: Request) -> bool:
        """Whether the request's next token is the argmax of the raw logits: greedy, no penalties or logprobs,
        and past min_tokens (before it, EOS and the stop ids are banned)."""
        return req.params.plain_argmax and req.num_output_tokens >= req.params.min_tokens

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
