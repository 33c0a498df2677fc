"""build_engine: loads, sizes and wires an engine from its EngineConfig. Everything decided before the
first step is decided here: the device and dtype ("auto" resolved), the model (through the registry, with
its quantization pass), the KV pool's size, the scheduler, the model runner and the proposer."""

from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path

import torch

from services.inference.config import DEFAULT_MODEL_NAME, EngineConfig
from services.inference.engine.draft_proposer import DraftProposer
from services.inference.engine.engine import LLMEngine
from services.inference.engine.kv_cache_manager import KVCacheManager
from services.inference.engine.kv_layout import KVLayout
from services.inference.engine.memory import release_freed_memory
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.scheduler import Scheduler
from services.inference.models.gguf_file import GGUFFile, default_model_path
from services.inference.models.registry import CausalLM, load_model, resolve_quantization
from services.inference.models.tokenizer import Tokenizer
from services.inference.spec_decode import NgramProposer, Proposer

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


def resolve(config: EngineConfig, model: CausalLM | None = None, gguf: GGUFFile | None = None) -> EngineConfig:
    """The config with "auto" device, quantization and dtype decided. An already-loaded model decides "auto"'s
    device and quantization; else "auto" quantization asks the file (`gguf`) what its blocks allow on the
    device (models/registry.resolve_quantization), and an explicit --dtype bfloat16 means dense. The
    quantized paths keep float32 activations."""
    m, d = config.model, config.device
    quantization = m.quantization
    if quantization == "auto" and (m.dtype == "bfloat16" or (model is None and gguf is None)):
        quantization = None
    elif quantization == "auto" and model is not None:
        quantization = model.quantization
    pending = quantization == "auto"
    if model is not None and d.device == "auto":
        device = str(model.device)
    else:
        device = resolve_device(d.device, None if pending else quantization)
    if pending:
        quantization = resolve_quantization(quantization, gguf, device)
    dtype = "float32" if quantization else resolve_dtype(m.dtype, device)
    name = m.model_name or (Path(m.model_path).stem if m.model_path else DEFAULT_MODEL_NAME)
    return dataclasses.replace(config, model=dataclasses.replace(m, dtype=dtype, quantization=quantization,
                                                                 model_name=name),
                               device=dataclasses.replace(d, device=device))


def num_kv_blocks(config: EngineConfig, model: CausalLM) -> int:
    """The KV pool's blocks: --num-kv-blocks, else as many as --kv-cache-gb holds (K and V of each of the
    layout's tensors: every layer, or one group's layers where the model has local ones; engine/kv_layout.py)."""
    c, hp = config.cache, model.hp
    if c.num_kv_blocks is not None:
        return c.num_kv_blocks
    bytes_per_block = 2 * KVLayout.for_model(hp).num_tensors * c.block_size * hp.num_kv_heads * hp.head_dim * \
        DTYPES[config.model.dtype].itemsize
    return max(1, int(c.kv_cache_memory_gb * 2**30) // bytes_per_block)


def build_proposer(config: EngineConfig, model: CausalLM, num_blocks: int,
                   draft_model: CausalLM | None = None) -> Proposer | None:
    """The proposer --speculative names (None: off); a draft model is loaded unless one is given."""
    spec = config.spec
    if spec.speculative == "ngram":
        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if spec.speculative != "draft":
        return None
    if draft_model is None:
        path = Path(spec.draft_model_path or config.model.model_path or default_model_path())
        # a dense draft sits with the target; a quantized one runs on the CPU (its kernels are CPU kernels)
        draft_device = config.device.device if spec.draft_quantization is None else "cpu"
        draft_model = load_model(GGUFFile(path), torch.float32, spec.draft_quantization, draft_device)
    if draft_model.device.type != model.device.type:
        log.warning("the draft model runs on %s and the target on %s: each proposal crosses devices "
                    "(with a GPU target, --draft-quantization none keeps the draft on the GPU)",
                    draft_model.device, model.device)
    return DraftProposer(draft_model, num_blocks, config.cache.block_size, model.hp.vocab_size)


def build_engine(config: EngineConfig, *, model: CausalLM | None = None, tokenizer: Tokenizer | None = None,
                 draft_model: CausalLM | None = None) -> LLMEngine:
    """An engine ready to step. `model`, `tokenizer` and `draft_model` reuse already-loaded ones (tests, several
    engines in one process); a model that does not match the config is refused."""
    gguf = None
    if model is None or tokenizer is None:
        path = config.model.model_path
        gguf = GGUFFile(Path(path) if path else default_model_path())
    config = resolve(config, model, gguf)
    if config.device.num_threads:
        torch.set_num_threads(config.device.num_threads)
    m = config.model
    if gguf is not None:
        tokenizer = tokenizer or Tokenizer.from_gguf(gguf)
        if model is None:
            model = load_model(gguf, DTYPES[m.dtype], m.quantization, config.device.device)
        gguf = None                  # its parsed metadata: 230 MB of Python objects for SmolLM2, in cycles
        gc.collect()
        release_freed_memory()
    if model.dtype != DTYPES[m.dtype] or model.quantization != m.quantization or \
            not same_device(model.device, torch.device(config.device.device)):
        raise ValueError(f"model was loaded as {model.dtype}/{model.quantization} on {model.device}, "
                         f"config asks for {m.dtype}/{m.quantization} on {config.device.device}")
    hp = model.hp
    max_model_len = min(m.max_model_len or hp.max_position_embeddings, hp.max_position_embeddings)
    blocks = num_kv_blocks(config, model)
    c = config.cache
    layout = KVLayout.for_model(hp)
    kv = KVCacheManager(blocks, c.block_size, c.enable_prefix_caching, layout,
                        config.scheduler.max_num_batched_tokens)
    scheduler = Scheduler(config.scheduler, kv)
    runner = ModelRunner(model, kv.pool.num_blocks, c.block_size, layout)
    proposer = build_proposer(config, model, blocks, draft_model)
    log.info("engine ready", extra={"model": m.model_name, "dtype": m.dtype, "quantization": m.quantization or "none",
                                    "num_kv_blocks": blocks,
                                    "max_model_len": max_model_len})
    return LLMEngine(config, tokenizer, scheduler, runner, proposer, max_model_len)
