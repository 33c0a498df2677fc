"""Choosing the engine's device: `--device auto|cpu|cuda|cuda:N`, its dtype there, and the clear errors for
what cannot run (a GPU that is not there, quantized weights on a GPU). The GPU itself is exercised by
tests/integration/test_engine_gpu.py and the gpu-marked kernel tests, where one exists."""

from __future__ import annotations

import pytest
import torch

from services.inference.config import engine_config
from services.inference.engine.factory import build_engine, resolve_device, resolve_dtype, same_device


@pytest.mark.parametrize("gpu,quantization,expected", [(False, None, "cpu"), (True, None, "cuda"),
                                                       (True, "gguf", "cpu"), (True, "int8", "cpu")])
def test_auto_picks_the_gpu_only_for_dense_weights(monkeypatch, gpu, quantization, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert resolve_device("auto", quantization) == expected


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda", None)
    assert resolve_device("cpu", "gguf") == "cpu"


def test_quantized_weights_on_a_gpu_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_device("cuda", "gguf")
    with pytest.raises(ValueError, match="sees 1 GPU"):
        resolve_device("cuda:3", None)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_unknown_device_names_fail_validation(device):
    with pytest.raises(ValueError, match="device must be"):
        engine_config(device=device)


def test_dtype_auto_is_float32_on_a_gpu():
    assert resolve_dtype("auto", "cuda") == "float32"
    assert resolve_dtype("bfloat16", "cuda") == "bfloat16"
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))


def test_an_engine_over_a_cpu_model_keeps_auto_on_the_cpu_and_refuses_cuda(model_fp32, tokenizer, monkeypatch):
    engine = build_engine(engine_config(dtype="float32", kv_cache_memory_gb=0.01), model=model_fp32, tokenizer=tokenizer)
    assert engine.config.device.device == "cpu" and engine.runner.kv_caches[0][0].device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="on cpu, config asks for .* on cuda"):
        build_engine(engine_config(dtype="float32", device="cuda", kv_cache_memory_gb=0.01), model=model_fp32,
                     tokenizer=tokenizer)


def test_loading_quantized_weights_onto_a_gpu_is_refused_before_loading(gguf_file):
    from services.inference.models.registry import load_model
    with pytest.raises(ValueError, match="CPU only"):
        load_model(gguf_file, quantization="gguf", device="cuda")
