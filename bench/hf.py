"""HF transformers peer: the GGUF loaded by transformers in float32, batched greedy `generate`.

A batch of c same-length prompts is c streams (no padding needed); token arrival times come from a
stopping criterion, which `generate` calls once per step after the new tokens are appended.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.metrics import PhaseResult, RequestTiming, run_in_waves


class _StepClock:
    """A stopping criterion that never stops: it stamps the time of every generated token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFRunner:
    name = "hf"
    label = "HF transformers (fp32)"

    def __init__(self, gguf_path: str) -> None:
        from transformers import AutoModelForCausalLM

        path = Path(gguf_path)
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32)
        self.model.eval()

    @torch.inference_mode()
    def run_batch(self, prompts: list[list[int]], max_tokens: int) -> list[RequestTiming]:
        from transformers import StoppingCriteriaList

        input_ids = torch.tensor(prompts, dtype=torch.int64)   # all prompts have the same length
        clock = _StepClock()
        sent = time.perf_counter()
        out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=max_tokens, min_new_tokens=max_tokens, eos_token_id=None,
                                  pad_token_id=2, stopping_criteria=StoppingCriteriaList([clock]))
        if out.shape[1] - input_ids.shape[1] != max_tokens or len(clock.stamps) != max_tokens:
            raise RuntimeError(f"HF generated {out.shape[1] - input_ids.shape[1]} tokens, expected {max_tokens}")
        return [RequestTiming(sent, list(clock.stamps)) for _ in prompts]

    def run_phase(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> PhaseResult:
        return run_in_waves(self.run_batch, prompts, max_tokens, concurrency)

    @torch.inference_mode()
    def prefill_s(self, prompts: list[list[int]]) -> float:
        """One batched forward over all prompts (B x prompt_len), logits of the last row only."""
        input_ids = torch.tensor(prompts, dtype=torch.int64)
        start = time.perf_counter()
        self.model(input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start
