"""Shared fixtures: the real model, loaded once per test session."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# spans of the in-process services go to a file of this session (never the checkout), exported quickly
_TRACE_DIR = tempfile.mkdtemp(prefix="strata-test-traces-")
os.environ["STRATA_TRACE_FILE"] = os.path.join(_TRACE_DIR, "traces.jsonl")
os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "100")
os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def gguf_path():
    from services.inference.models.gguf_file import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def gguf_file(gguf_path):
    from services.inference.models.gguf_file import GGUFFile
    return GGUFFile(gguf_path)


@pytest.fixture(scope="session")
def tokenizer(gguf_file):
    from services.inference.models.tokenizer import Tokenizer
    return Tokenizer.from_gguf(gguf_file)


@pytest.fixture(scope="session")
def model_fp32(gguf_file):
    from services.inference.models.llama import LlamaModel
    return LlamaModel.from_gguf(gguf_file, torch.float32)


@pytest.fixture(scope="session")
def model_bf16(gguf_file):
    from services.inference.models.llama import LlamaModel
    return LlamaModel.from_gguf(gguf_file, torch.bfloat16)


@pytest.fixture(scope="session")
def model_int8(gguf_file):
    """W8A8 (SmoothQuant) projections, weight-only int8 LM head: `--quantization int8`."""
    from services.inference.models.registry import load_model
    return load_model(gguf_file, quantization="int8")


@pytest.fixture(scope="session")
def model_gguf(gguf_file):
    """The file's own Q4_1 / Q8_0 blocks for decode-sized steps: `--quantization gguf`."""
    from services.inference.models.registry import load_model
    return load_model(gguf_file, quantization="gguf")


@pytest.fixture(scope="session")
def make_engine(model_fp32, model_bf16, tokenizer, request):
    """Build an engine over the already-loaded weights: make_engine(dtype="float32", **config)
    (quantization="int8" / "gguf" use the session's quantized models)."""
    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine

    def make(dtype: str = "float32", **overrides):
        overrides.setdefault("kv_cache_memory_gb", 0.25)
        if overrides.get("quantization") in ("int8", "gguf"):
            model = request.getfixturevalue(f"model_{overrides['quantization']}")
        else:
            model = model_fp32 if dtype == "float32" else model_bf16
        return build_engine(engine_config(dtype=dtype, **overrides), model=model, tokenizer=tokenizer)
    return make


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """HF transformers loading the same GGUF in float32: the reference, never the serving path."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


def assert_all_blocks_free(engine) -> None:
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks, stats
    assert not engine.has_unfinished_requests()


async def settled(check, timeout: float = 10.0) -> None:
    """`check()` (asserting) passes within `timeout`: a state that follows the last answer (a request's blocks
    freed after its final chunk, a router's in-flight count) is polled for, not read once after a fixed sleep."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


class RedisProcess:
    """A real redis-server on a free port, no persistence; stop() and start() keep the port."""

    def __init__(self) -> None:
        import shutil
        import socket

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed: `make install` installs it (apt-get install -y redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        import socket
        import subprocess
        import time

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.proc.returncode}")
                time.sleep(0.05)
        pytest.fail("redis-server did not start within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def flush(self) -> None:
        import redis
        redis.Redis.from_url(self.url).flushall()


@pytest.fixture(scope="session")
def redis_server():
    server = RedisProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server):
    """A clean Redis for one test (flushed before it starts)."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def embedder():
    from services.embedding.embedder import MiniLMEmbedder
    return MiniLMEmbedder()
