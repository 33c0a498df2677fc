"""`strata up`: the whole suite on one machine, on its embedded defaults.

Starts redis-server as a child on a free port (unless --redis-url / REDIS_URL names one), N inference
replicas, the cache, the router (given every replica) and the gateway, each as `strata serve …` in its
own process; waits until each reports SERVING on grpc.health.v1 (the first run loads the model and the
embedding model: progress is printed while it waits); creates a first API key; prints the endpoints;
streams every service's JSON log lines prefixed with its name; stops everything (gateway first, Redis
last) on Ctrl-C or SIGTERM. A service that exits early stops the others and `up` fails with its log tail.

The run's files live in --run-dir (default .strata/run): one log per service, traces.jsonl (unless
OTEL_EXPORTER_OTLP_ENDPOINT is set), and `env` (the gateway address and the first API key) that
`strata chat` and `strata status` read when their flags and environment say nothing. The key pepper and
admin token come from STRATA_KEY_PEPPER / STRATA_ADMIN_TOKEN, else from .strata/secrets.env, created once
with random values (mode 600), so keys stay valid across runs against the same Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from services.common.config import env

DEFAULT_PORTS = {"gateway": (50051, 9051), "cache": (50071, 9071), "router": (50081, 9081), "inference": (50061, 9061)}
HEALTH_NAMES = {"gateway": "strata.v1.Gateway", "cache": "strata.v1.SemanticCache", "router": "strata.v1.Router",
                "inference": "strata.v1.Inference"}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=int(env("STRATA_UP_REPLICAS", "1")), help="inference replicas")
    p.add_argument("--redis-url", default=env("REDIS_URL", ""), help="use this Redis instead of starting one")
    p.add_argument("--host", default="127.0.0.1", help="address the services bind (0.0.0.0 to expose them)")
    p.add_argument("--free-ports", action="store_true",
                   help="pick free ports instead of the defaults (gateway 50051, inference 50061+i, cache 50071, "
                        "router 50081; metrics 9051, 9061+i, 9071, 9081)")
    p.add_argument("--run-dir", type=Path, default=Path(env("STRATA_RUN_DIR", ".strata/run")))
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for every service")
    p.add_argument("--quiet", action="store_true", help="do not stream the services' logs (they still go to --run-dir)")
    p.add_argument("--dtype", default=None, help="passed to the inference replicas (default: theirs)")


@dataclass
class Child:
    name: str                 # gateway, cache, router, inference-0, redis
    kind: str                 # gateway, cache, router, inference, redis
    args: list[str]
    port: int
    metrics_port: int = -1
    proc: subprocess.Popen | None = None
    log: TextIO | None = None          # opened by the first start; a restart appends to it
    pump: threading.Thread | None = None
    tail: list[str] = field(default_factory=list)


def _follow_parent(args: list[str]) -> list[str]:
    """The command, run so that it gets SIGTERM when `up` dies, however it dies (Linux PR_SET_PDEATHSIG,
    set by util-linux's setpriv before it execs the command). Not a preexec_fn: Python code between fork
    and exec can deadlock on a lock another thread held at the fork (gRPC's threads, a malloc lock), which
    left a restarted child hung before exec with no output."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--", *args] if setpriv else args


def _redis_ready(port: int) -> bool:
    """Redis answers PING (not only listening: while it loads its data it answers -LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _secrets(root: Path) -> dict[str, str]:
    """STRATA_KEY_PEPPER and STRATA_ADMIN_TOKEN: the environment's, else the ones this checkout made once."""
    path = root / "secrets.env"
    saved: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            k, _, v = line.partition("=")
            if k.strip():
                saved[k.strip()] = v.strip()
    out = {"STRATA_KEY_PEPPER": os.environ.get("STRATA_KEY_PEPPER") or saved.get("STRATA_KEY_PEPPER", ""),
           "STRATA_ADMIN_TOKEN": os.environ.get("STRATA_ADMIN_TOKEN") or saved.get("STRATA_ADMIN_TOKEN", "")}
    if not saved and not (os.environ.get("STRATA_KEY_PEPPER") and os.environ.get("STRATA_ADMIN_TOKEN")):
        out["STRATA_KEY_PEPPER"] = out["STRATA_KEY_PEPPER"] or secrets.token_hex(16)
        out["STRATA_ADMIN_TOKEN"] = out["STRATA_ADMIN_TOKEN"] or secrets.token_urlsafe(24)
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in out.items()))
    return out


def plan(a: argparse.Namespace) -> list[Child]:
    """The children in start order (Redis, replicas, cache, router, gateway)."""
    if a.replicas < 1:
        raise SystemExit("--replicas must be >= 1")
    ports: dict[str, tuple[int, int]] = {}
    for kind in ("gateway", "cache", "router"):
        ports[kind] = (_free_port(), _free_port()) if a.free_ports else DEFAULT_PORTS[kind]
    for i in range(a.replicas):
        g, m = DEFAULT_PORTS["inference"]
        ports[f"inference-{i}"] = (_free_port(), _free_port()) if a.free_ports else (g + i, m + i)
    if not a.free_ports:
        busy = sorted(f"{n} {p}" for n, pair in ports.items() for p in pair if _port_busy(p))
        if busy:
            raise SystemExit(f"ports in use: {', '.join(busy)} (another `strata up`?); --free-ports picks free ones")
    cli = [sys.executable, "-m", "services.cli", "serve"]
    children: list[Child] = []
    redis_url = a.redis_url
    if not redis_url:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (`make install` installs it) and no --redis-url was given")
        rport = _free_port()
        children.append(Child("redis", "redis", [binary, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                                 "--appendonly", "no", "--protected-mode", "yes"], rport))
        redis_url = f"redis://127.0.0.1:{rport}/0"
    host = a.host
    dial = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    replicas = []
    for i in range(a.replicas):
        port, mport = ports[f"inference-{i}"]
        args = [*cli, "inference", "--host", host, "--port", str(port), "--metrics-port", str(mport),
                "--replica-id", f"inference-{i}"] + (["--dtype", a.dtype] if a.dtype else [])
        children.append(Child(f"inference-{i}", "inference", args, port, mport))
        replicas.append(f"{dial}:{port}")
    port, mport = ports["cache"]
    children.append(Child("cache", "cache", [*cli, "cache", "--host", host, "--port", str(port), "--metrics-port",
                                             str(mport), "--redis-url", redis_url], port, mport))
    cache = f"{dial}:{port}"
    port, mport = ports["router"]
    children.append(Child("router", "router", [*cli, "router", "--host", host, "--port", str(port), "--metrics-port",
                                               str(mport), *sum((["--backend", r] for r in replicas), [])], port, mport))
    router = f"{dial}:{port}"
    port, mport = ports["gateway"]
    children.append(Child("gateway", "gateway", [*cli, "gateway", "--host", host, "--port", str(port), "--metrics-port",
                                                 str(mport), "--redis-url", redis_url, "--router", router,
                                                 "--cache", cache, "--plaintext"], port, mport))   # a local run
    return children


class Suite:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.run_dir: Path = a.run_dir
        self.children = plan(a)
        self.env = {**os.environ, **_secrets(self.run_dir.parent)}
        if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            self.env.setdefault("STRATA_TRACE_FILE", str((self.run_dir / "traces.jsonl").resolve()))
        self._print_lock = threading.Lock()
        self.failed: Child | None = None

    def say(self, line: str) -> None:
        with self._print_lock:
            print(line, flush=True)

    def start(self, c: Child) -> None:
        """Start the child, or restart it once it has exited: the restart's lines follow the previous
        process's last ones in the same log file."""
        if c.proc is not None and c.proc.poll() is None:
            raise RuntimeError(f"{c.name} is still running")
        if c.pump is not None:
            c.pump.join()                      # the exited process's last lines are in the log
        if c.log is None:
            c.log = open(self.run_dir / f"{c.name}.log", "w")
        # its own session: a terminal's Ctrl-C reaches `up` only, which stops the services in order
        c.proc = subprocess.Popen(_follow_parent(c.args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
        c.pump = threading.Thread(target=self._pump, args=(c,), name=f"log-{c.name}", daemon=True)
        c.pump.start()

    def _pump(self, c: Child) -> None:
        assert c.proc is not None and c.proc.stdout is not None and c.log is not None
        width = max(len(x.name) for x in self.children)
        with c.proc.stdout:
            for line in c.proc.stdout:
                c.log.write(line)
                c.log.flush()
                c.tail = (c.tail + [line.rstrip()])[-30:]
                if not self.a.quiet and c.kind != "redis":
                    self.say(f"{c.name:<{width}} | {line.rstrip()}")

    async def wait_ready(self, c: Child, deadline: float) -> None:
        if c.kind == "redis":
            while time.monotonic() < deadline:
                self._check_alive(c)
                if _redis_ready(c.port):
                    return
                await asyncio.sleep(0.05)
            raise TimeoutError(f"{c.name} did not start")
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        dial = "127.0.0.1" if self.a.host in ("0.0.0.0", "::") else self.a.host
        async with grpc.aio.insecure_channel(f"{dial}:{c.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                self._check_alive(c)
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_NAMES[c.kind]), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.25)
        raise TimeoutError(f"{c.name} was not SERVING within {self.a.startup_timeout:.0f} s (log: {self.run_dir / (c.name + '.log')})")

    def _check_alive(self, c: Child) -> None:
        if c.proc is not None and c.proc.poll() is not None:
            self.failed = c
            raise RuntimeError(f"{c.name} exited with {c.proc.returncode}")

    async def first_key(self) -> str:
        import grpc

        from services.common.pb import gateway_pb2, gateway_pb2_grpc
        gw = next(c for c in self.children if c.kind == "gateway")
        dial = "127.0.0.1" if self.a.host in ("0.0.0.0", "::") else self.a.host
        async with grpc.aio.insecure_channel(f"{dial}:{gw.port}") as ch:
            admin = gateway_pb2_grpc.GatewayAdminStub(ch)
            r = await admin.CreateKey(gateway_pb2.CreateKeyRequest(tenant="local"), timeout=10,
                                      metadata=(("authorization", f"Bearer {self.env['STRATA_ADMIN_TOKEN']}"),))
            return r.key

    def stop(self) -> None:
        """Gateway first (no new requests), Redis last; SIGTERM, then SIGKILL after 15 s."""
        for c in reversed(self.children):
            if c.proc is not None and c.proc.poll() is None:
                c.proc.terminate()
                try:
                    c.proc.wait(15)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
        for c in self.children:
            if c.log is not None:
                c.log.close()


async def _up(suite: Suite) -> int:
    a = suite.a
    suite.run_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    deadline = time.monotonic() + a.startup_timeout
    t0 = time.monotonic()
    try:
        for c in suite.children:
            suite.start(c)
        for c in suite.children:           # replicas load the model while the cache loads MiniLM
            waiting = asyncio.ensure_future(suite.wait_ready(c, deadline))
            while not waiting.done():
                done, _ = await asyncio.wait({waiting, asyncio.ensure_future(stop.wait())}, timeout=10.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    waiting.cancel()
                    suite.say(">> interrupted while starting; stopping")
                    return 130
                if not done:
                    suite.say(f">> waiting for {c.name} ({time.monotonic() - t0:.0f} s; first run loads the models)")
            waiting.result()
            suite.say(f">> {c.name} is up ({time.monotonic() - t0:.1f} s)")
        key = await suite.first_key()
    except (RuntimeError, TimeoutError) as exc:
        suite.say(f">> {exc}")
        if suite.failed is not None:
            suite.say("".join(f"   {line}\n" for line in suite.failed.tail[-15:]).rstrip())
        return 1
    gw = next(c for c in suite.children if c.kind == "gateway")
    dial = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    (suite.run_dir / "env").write_text(f"STRATA_GATEWAY_ADDRESS={dial}:{gw.port}\nSTRATA_API_KEY={key}\n"
                                       + "".join(f"STRATA_{c.name.upper().replace('-', '_')}_ADDRESS={dial}:{c.port}\n"
                                                 for c in suite.children if c.kind not in ("gateway", "redis")))
    os.chmod(suite.run_dir / "env", 0o600)
    rows = [(c.name, f"{dial}:{c.port}", f"http://{dial}:{c.metrics_port}/metrics" if c.metrics_port > 0 else "")
            for c in suite.children]
    width = max(len(r[0]) for r in rows)
    suite.say("\n".join([f">> Strata is up in {time.monotonic() - t0:.1f} s",
                         *(f"   {n:<{width}}  {addr:<22} {m}" for n, addr, m in rows),
                         f"   API key (tenant 'local'): {key}",
                         f"   admin token: in {suite.run_dir.parent / 'secrets.env'} (or STRATA_ADMIN_TOKEN)",
                         f"   traces: {suite.env.get('STRATA_TRACE_FILE') or os.environ.get('OTEL_EXPORTER_OTLP_ENDPOINT')}",
                         f"   logs: {suite.run_dir}/<service>.log",
                         '   try: strata chat "Hello!"   ·   strata status   ·   Ctrl-C stops everything',
                         ">> READY"]))
    while not stop.is_set():
        for c in suite.children:
            if c.proc is not None and c.proc.poll() is not None:
                suite.say(f">> {c.name} exited with {c.proc.returncode}; stopping the suite")
                suite.say("".join(f"   {line}\n" for line in c.tail[-15:]).rstrip())
                return 1
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
    suite.say(">> stopping")
    return 0


def run(a: argparse.Namespace) -> None:
    suite = Suite(a)
    try:
        code = asyncio.run(_up(suite))
    finally:
        suite.stop()
    if code == 0:
        print(">> stopped", flush=True)
    raise SystemExit(code)


def read_run_env(run_dir: Path | None = None) -> dict[str, str]:
    """The `env` file of the latest `strata up` (empty when there is none)."""
    path = (run_dir or Path(env("STRATA_RUN_DIR", ".strata/run"))) / "env"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        k, _, v = line.partition("=")
        if k:
            out[k.strip()] = v.strip()
    return out
