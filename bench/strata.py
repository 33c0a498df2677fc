"""Strata through its gRPC API: the inference service in a subprocess, streams from grpc.aio.

The server runs in its own process (its engine thread and the client never share a GIL), started
exactly as `strata serve inference` on a free port; readiness is the standard gRPC health check.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.metrics import PhaseResult, RequestTiming
from services.common.pb import common_pb2, inference_pb2, inference_pb2_grpc

_REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StrataServer:
    """`python -m services.cli serve inference` as a context manager; its log goes to a temp file."""

    def __init__(self, dtype: str, extra_args: list[str] | None = None, start_timeout_s: float = 300.0) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "services.cli", "serve", "inference", "--port", str(self.port),
                     "--dtype", dtype, *(extra_args or [])]
        self.start_timeout_s = start_timeout_s
        self.log = tempfile.NamedTemporaryFile("w+", prefix="strata-bench-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "StrataServer":
        self.proc = subprocess.Popen(self.args, cwd=_REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        asyncio.run(self._wait_serving())
        return self

    async def _wait_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"strata server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(service="strata.v1.Inference"),
                                            timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"strata server not serving after {self.start_timeout_s:.0f}s:\n{self.log_tail()}")

    def memory_mb(self) -> dict[str, float]:
        """The server's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}

    def log_tail(self, num_chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-num_chars:]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()   # SIGTERM: graceful stop
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if exc_type is None:
            os.unlink(self.log.name)
        else:
            print(f"strata server log kept at {self.log.name}", file=sys.stderr)


async def _model_info(address: str) -> inference_pb2.ModelInfo:
    async with grpc.aio.insecure_channel(address) as channel:
        return await inference_pb2_grpc.InferenceStub(channel).GetModelInfo(inference_pb2.GetModelInfoRequest())


def model_info(server: StrataServer) -> inference_pb2.ModelInfo:
    return asyncio.run(_model_info(server.address))


def _request(prompt: list[int], max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


async def _one(stub: inference_pb2_grpc.InferenceStub, prompt: list[int], max_tokens: int) -> RequestTiming:
    timing = RequestTiming(sent_s=time.perf_counter())
    async for chunk in stub.Generate(_request(prompt, max_tokens)):
        now = time.perf_counter()
        timing.arrivals_s.extend([now] * len(chunk.token_ids))
    if timing.num_output_tokens != max_tokens:
        raise RuntimeError(f"expected {max_tokens} output tokens, got {timing.num_output_tokens}")
    return timing


async def _closed_loop(address: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> PhaseResult:
    """Every prompt once, at most `concurrency` streams in flight (a new one starts as one ends)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await channel.channel_ready()
        todo = iter(prompts)
        timings: list[RequestTiming] = []

        async def worker() -> None:
            for prompt in todo:
                timings.append(await _one(stub, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = max(t.arrivals_s[-1] for t in timings) - start
    return PhaseResult(concurrency, wall, tuple(timings))


def run_phase(server: StrataServer, prompts: list[list[int]], max_tokens: int, concurrency: int) -> PhaseResult:
    return asyncio.run(_closed_loop(server.address, prompts, max_tokens, concurrency))
