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
from dataclasses import dataclass
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


def process_memory_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}


@dataclass(frozen=True)
class Replica:
    """A running inference replica (one of a suite's): where it answers and its process."""
    address: str
    pid: int

    def memory_mb(self) -> dict[str, float]:
        return process_memory_mb(self.pid)


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
        return process_memory_mb(self.proc.pid)

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


# ---- through the gateway: the path a caller of `make up` takes

class StrataSuite:
    """`strata up`'s suite (services/up.py's plan) on free ports: Redis, one inference replica started with
    `extra_args`, the cache, the router and the gateway, each its own process; an unlimited API key."""

    def __init__(self, dtype: str, extra_args: list[str] | None = None, start_timeout_s: float = 600.0) -> None:
        import argparse

        from services.up import Suite

        from services.common import models_file
        from services.common.models_file import ModelSpec, ModelsFile
        from services.inference.config import DEFAULT_MODEL_NAME

        self.run_dir = Path(tempfile.mkdtemp(prefix="strata-bench-suite-")) / "run"
        os.environ.setdefault("STRATA_KEY_PEPPER", "bench-serving-pepper-0123456789abcdef")
        os.environ.setdefault("STRATA_ADMIN_TOKEN", "bench-serving-admin-token")
        # one model: the benchmark's (STRATA_MODEL_PATH, else the default), named as a replica names it
        path = os.environ.get("STRATA_MODEL_PATH", "")
        suite_file = self.run_dir.parent / "models.yaml"
        models_file.dump(ModelsFile((ModelSpec(Path(path).stem if path else DEFAULT_MODEL_NAME, path),)), suite_file)
        a = argparse.Namespace(models_file=suite_file, models="", replicas=None, redis_url="", host="127.0.0.1",
                               free_ports=True, run_dir=self.run_dir, startup_timeout=start_timeout_s, quiet=True,
                               dtype=dtype)
        self.suite = Suite(a)
        for c in self.suite.children:
            if c.kind == "inference":
                c.args += list(extra_args or [])
        self.by_kind = {c.kind: c for c in self.suite.children}
        self.address = f"127.0.0.1:{self.by_kind['gateway'].port}"
        self.replica_address = f"127.0.0.1:{self.by_kind['inference'].port}"
        self.key = ""
        self.model = ""

    def __enter__(self) -> "StrataSuite":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for c in self.suite.children:
                self.suite.start(c)
            asyncio.run(self._ready())
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    async def _ready(self) -> None:
        from services.common.pb import gateway_pb2, gateway_pb2_grpc

        deadline = time.monotonic() + self.suite.a.startup_timeout
        for c in self.suite.children:
            await self.suite.wait_ready(c, deadline)
        admin = (("authorization", f"Bearer {self.suite.env['STRATA_ADMIN_TOKEN']}"),)
        async with grpc.aio.insecure_channel(self.address) as ch:
            stub = gateway_pb2_grpc.GatewayAdminStub(ch)
            self.key = (await stub.CreateKey(gateway_pb2.CreateKeyRequest(tenant="bench-serving", tier="premium"),
                                             metadata=admin, timeout=10)).key   # no limits, no budget, never shed
            models = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=admin, timeout=10)
            self.model = models.models[0].name

    @property
    def replica(self) -> Replica:
        """The suite's inference replica, for its gRPC API (bench.serving measures that path on it too)."""
        return Replica(self.replica_address, self.by_kind["inference"].proc.pid)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.suite.stop()
        if exc_type is None:
            import shutil

            shutil.rmtree(self.run_dir.parent, ignore_errors=True)
        else:
            print(f"the suite's logs are kept in {self.run_dir}", file=sys.stderr)


async def _gateway_loop(suite: StrataSuite, prompts: list[str], prompt_tokens: int, max_tokens: int,
                        concurrency: int) -> PhaseResult:
    """As _closed_loop, through the gateway: raw prompts (no chat template), greedy, the cache bypassed."""
    from services.common.pb import gateway_pb2, gateway_pb2_grpc

    auth = (("authorization", f"Bearer {suite.key}"),)
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    async with grpc.aio.insecure_channel(suite.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await channel.channel_ready()
        todo = iter(prompts)
        timings: list[RequestTiming] = []

        async def one(text: str) -> RequestTiming:
            timing = RequestTiming(sent_s=time.perf_counter())
            request = gateway_pb2.GatewayRequest(model=suite.model, prompt=text, sampling=sampling,
                                                 cache_policy=common_pb2.CACHE_POLICY_BYPASS)
            usage = None
            async for chunk in stub.GenerateStream(request, metadata=auth):
                now = time.perf_counter()
                timing.arrivals_s.extend([now] * len(chunk.token_ids))
                if chunk.HasField("usage"):
                    usage = chunk.usage
            if timing.num_output_tokens != max_tokens:
                raise RuntimeError(f"expected {max_tokens} output tokens, got {timing.num_output_tokens}")
            if usage is None or usage.prompt_tokens != prompt_tokens:
                raise RuntimeError(f"the gateway's prompt came to {usage and usage.prompt_tokens} tokens, "
                                   f"not {prompt_tokens}: the prompts must tokenize back to their ids")
            return timing

        async def worker() -> None:
            for text in todo:
                timings.append(await one(text))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = max(t.arrivals_s[-1] for t in timings) - start
    return PhaseResult(concurrency, wall, tuple(timings))


def run_gateway_phase(suite: StrataSuite, prompts: list[str], prompt_tokens: int, max_tokens: int,
                      concurrency: int) -> PhaseResult:
    return asyncio.run(_gateway_loop(suite, prompts, prompt_tokens, max_tokens, concurrency))
