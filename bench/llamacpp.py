"""llama.cpp peer: the same GGUF through llama-cpp-python's low-level API, batched like
llama.cpp's `examples/batched`: c sequences, all prompts in one `llama_decode`, then one
`llama_decode` per step carrying one token of every sequence. The KV cache is split per sequence
(kv_unified off): with a unified cache every token attends, masked, over all c sequences' cells;
measured here at 32 streams, decode runs 100 tok/s unified against 125-130 split. Greedy
argmax over each sequence's logits; EOS is never checked, so every stream makes max_tokens tokens.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from bench.metrics import PhaseResult, RequestTiming, run_in_waves

_SILENT_LOG = None


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, gguf_path: str, num_threads: int, max_tokens_per_seq: int) -> None:
        """max_tokens_per_seq: prompt + output tokens of one stream (sizes every context's KV cache)."""
        import re

        import llama_cpp

        kind = re.search(r"[qQ]\d_[A-Za-z0-9_]+$", Path(gguf_path).stem)      # SmolLM2-...Q4_1, gemma-...-q4_k_m
        self.label = f"llama.cpp ({kind.group(0).upper() if kind else Path(gguf_path).stem})"
        self.lib = llama_cpp
        self.num_threads = num_threads
        self.max_tokens_per_seq = max_tokens_per_seq
        llama_cpp.llama_backend_init()
        global _SILENT_LOG
        if _SILENT_LOG is None:   # llama.cpp keeps the pointer: the callback must live as long as the process
            _SILENT_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_SILENT_LOG, ctypes.c_void_p())
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(),
                                                          llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self._ctx = None
        self._ctx_num_seqs: int | None = None

    def close(self) -> None:
        self._free_context()
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    # context: one per number of streams; the KV cache is cleared before every batch
    def _context(self, num_seqs: int):
        if self._ctx_num_seqs != num_seqs:
            self._free_context()
            p = self.lib.llama_context_default_params()
            p.n_ctx = num_seqs * self.max_tokens_per_seq
            p.n_batch = max(p.n_ctx, 512)
            p.n_seq_max = num_seqs
            p.kv_unified = False   # per-sequence KV streams: the faster setting for independent streams
            p.n_threads = p.n_threads_batch = self.num_threads
            p.no_perf = True
            self._ctx = self.lib.llama_init_from_model(self.model, p)
            if not self._ctx:
                raise RuntimeError("llama.cpp could not create a context")
            self._ctx_num_seqs = num_seqs
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self._ctx), True)
        return self._ctx

    def _free_context(self) -> None:
        if self._ctx is not None:
            self.lib.llama_free(self._ctx)
            self._ctx, self._ctx_num_seqs = None, None

    def _decode(self, ctx, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, wants_logits)."""
        lib = self.lib
        batch = lib.llama_batch_init(len(rows), 0, 1)
        try:
            for i, (tok, pos, seq, logits) in enumerate(rows):
                batch.token[i], batch.pos[i] = tok, pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            batch.n_tokens = len(rows)
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            lib.llama_batch_free(batch)

    def _argmax(self, ctx, batch_index: int) -> int:
        ptr = self.lib.llama_get_logits_ith(ctx, batch_index)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def run_batch(self, prompts: list[list[int]], max_tokens: int, num_seqs: int) -> list[RequestTiming]:
        """Up to num_seqs prompts as streams in a context made for num_seqs (fewer: a warm-up)."""
        n, plen = len(prompts), len(prompts[0])
        if n > num_seqs or plen + max_tokens > self.max_tokens_per_seq:
            raise ValueError(f"{n} streams of {plen}+{max_tokens} tokens do not fit a context for "
                             f"{num_seqs} x {self.max_tokens_per_seq}")
        ctx = self._context(num_seqs)
        sent = time.perf_counter()
        timings = [RequestTiming(sent) for _ in prompts]
        # prefill: every prompt in one batch, logits for each one's last token
        self._decode(ctx, [(t, pos, s, pos == plen - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)])
        last = [self._argmax(ctx, s * plen + plen - 1) for s in range(n)]
        now = time.perf_counter()
        for t in timings:
            t.arrivals_s.append(now)
        # decode: one token per sequence per step
        for step in range(1, max_tokens):
            self._decode(ctx, [(last[s], plen + step - 1, s, True) for s in range(n)])
            last = [self._argmax(ctx, s) for s in range(n)]
            now = time.perf_counter()
            for t in timings:
                t.arrivals_s.append(now)
        return timings

    def run_phase(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> PhaseResult:
        return run_in_waves(lambda batch, m: self.run_batch(batch, m, concurrency), prompts, max_tokens, concurrency)

    def prefill_s(self, prompts: list[list[int]]) -> float:
        """All prompts in one llama_decode (llama.cpp splits it into ubatches), last logits only."""
        plen = len(prompts[0])
        ctx = self._context(len(prompts))
        start = time.perf_counter()
        self._decode(ctx, [(t, pos, s, pos == plen - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)])
        self.lib.llama_synchronize(ctx)
        return time.perf_counter() - start

