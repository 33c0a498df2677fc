"""`strata up`: the whole suite on one machine, on its embedded defaults.

Starts redis-server as a child on a free port (unless --redis-url / REDIS_URL names one), the inference
replicas of every model it serves, the cache, the router (given every replica) and the gateway, each as
`strata serve …` in its own process. The models: those of --models-file (deploy/models.toml is the default
suite, annotated), else every installed model of the default suite (SmolLM2-135M-Instruct and Gemma 3 270M,
`strata models` lists what is installed), --models picking among them, --replicas each. The plan is written
to the run directory as models.yaml, which the router (fallbacks) and the gateway (prices, tiers, routing)
read; waits until each reports SERVING on grpc.health.v1 (the first run loads the model and the
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from services.common import models_file
from services.common.config import env
from services.common.models_file import ModelSpec, ModelsFile

DEFAULT_HTTP_PORT = 8000                # the gateway's OpenAI-compatible HTTP API
DEFAULT_PORTS = {"gateway": (50051, 9051), "cache": (50071, 9071), "router": (50081, 9081), "inference": (50061, 9061)}
HEALTH_NAMES = {"gateway": "strata.v1.Gateway", "cache": "strata.v1.SemanticCache", "router": "strata.v1.Router",
                "inference": "strata.v1.Inference"}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-file", type=Path, default=env("STRATA_MODELS_FILE", "") or None, metavar="FILE",
                   help="the models to serve, their files, replicas, prices and tiers, and the routing between them "
                        "(TOML or YAML; deploy/models.toml). Default: the default suite's installed models")
    p.add_argument("--models", default=env("STRATA_UP_MODELS", ""), metavar="NAME[,NAME]",
                   help="serve only these of the suite's models (names as `strata models` or the models file gives them)")
    p.add_argument("--replicas", type=int, default=None,
                   help="inference replicas per model (default: the models file's, else 1; env STRATA_UP_REPLICAS)")
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
    http_port: int = -1       # the gateway's OpenAI-compatible HTTP port
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
    saved = _read_env_file(path)
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


# the default suite: every one of these that is installed, in this order (the first is the default model)
DEFAULT_SUITE = (
    ModelSpec("SmolLM2-135M-Instruct", "", usd_per_1k_prompt_tokens=0.01,
              usd_per_1k_completion_tokens=0.02, fallbacks=("gemma-3-270m",)),
    ModelSpec("gemma-3-270m", "gemma-3-270m-q4_k_m", usd_per_1k_prompt_tokens=0.02,
              usd_per_1k_completion_tokens=0.04),
)


def resolve_file(spec: ModelSpec) -> Path | None:
    """The GGUF file of a models-file entry: "" = the default model; a path; else an installed model whose name
    or file stem it is (case-insensitive). None: not installed."""
    from services.inference.models.catalog import installed_models, models_dir
    from services.inference.models.gguf_file import default_model_path

    if spec.file and Path(spec.file).expanduser().is_file():
        return Path(spec.file).expanduser()
    want = spec.file.lower()
    try:                                  # by path first: reading a header to learn its name can take seconds
        if not want:
            return default_model_path()
        by_stem = [p for p in sorted(models_dir().glob("*.gguf")) if p.stem.lower() == want]
        if by_stem:
            return by_stem[0]
    except FileNotFoundError:
        return None
    for e in installed_models():
        if e.error or not e.path:
            continue
        if (not spec.file and e.default) or (spec.file and want in (e.name.lower(), Path(e.path).stem.lower())):
            return Path(e.path)
    return None


def suite_models(a: argparse.Namespace) -> tuple[ModelsFile, dict[str, Path]]:
    """The models file `up` serves (--models-file, else the installed part of the default suite, both narrowed
    by --models and with --replicas applied) and each model's file."""
    picked = [m.strip() for m in (a.models or "").split(",") if m.strip()]
    replicas = a.replicas if a.replicas is not None else (int(env("STRATA_UP_REPLICAS", "0")) or None)
    if replicas is not None and replicas < 1:
        raise SystemExit("--replicas must be >= 1")
    try:
        if a.models_file:
            mf = models_file.load(a.models_file)
            specs = list(mf.models)
        else:
            mf = None
            specs = list(DEFAULT_SUITE)
            if not picked:                    # the default suite: what is installed of it (the first always)
                missing = [m.name for m in specs[1:] if resolve_file(m) is None]
                if missing:
                    print(f">> not installed, not served: {', '.join(missing)} (`make install` installs them)", flush=True)
                specs = [m for m in specs if m.name not in missing]
    except models_file.ModelsFileError as exc:
        raise SystemExit(f"--models-file: {exc}") from None
    if picked:
        unknown = [m for m in picked if m not in {s.name for s in specs}]
        if unknown:
            raise SystemExit(f"--models: {', '.join(unknown)} not in the suite ({', '.join(s.name for s in specs)})")
        specs = [s for s in specs if s.name in picked]
    names = {s.name for s in specs}
    specs = [replace(s, fallbacks=tuple(f for f in s.fallbacks if f in names),
                     replicas=replicas if replicas is not None else s.replicas) for s in specs]
    files: dict[str, Path] = {}
    for s in specs:
        if s.replicas == 0:
            continue
        path = resolve_file(s)
        if path is None:
            raise SystemExit(f"model {s.name!r}: file {s.file or '(the default model)'!r} is not installed "
                             "(`make install`; `strata models` lists the installed ones) nor a path to a GGUF file")
        files[s.name] = path
    try:
        if mf is None:
            return ModelsFile(tuple(specs)), files
        keep = lambda m: m in names  # noqa: E731
        return replace(mf, models=tuple(specs), auto=tuple(r for r in mf.auto if keep(r.model)),
                       auto_default=mf.auto_default if keep(mf.auto_default) else "",
                       cascades={k: c for k, c in mf.cascades.items() if keep(k) and keep(c.to)},
                       splits={k: sp for k, sp in mf.splits.items() if all(map(keep, sp.weights))}), files
    except models_file.ModelsFileError as exc:
        raise SystemExit(f"--models: {exc}") from None


def plan(a: argparse.Namespace) -> list[Child]:
    """The children in start order (Redis, replicas, cache, router, gateway)."""
    mf, files = suite_models(a)
    a.run_dir.mkdir(parents=True, exist_ok=True)
    suite_file = (a.run_dir / "models.yaml").resolve()
    models_file.dump(mf, suite_file)
    served = [(m, files[m.name]) for m in mf.models for _ in range(m.replicas)]
    ports: dict[str, tuple[int, int]] = {}
    for kind in ("gateway", "cache", "router"):
        ports[kind] = (_free_port(), _free_port()) if a.free_ports else DEFAULT_PORTS[kind]
    http_port = _free_port() if a.free_ports else DEFAULT_HTTP_PORT
    for i in range(len(served)):
        g, m = DEFAULT_PORTS["inference"]
        ports[f"inference-{i}"] = (_free_port(), _free_port()) if a.free_ports else (g + i, m + i)
    if not a.free_ports:
        busy = sorted(f"{n} {p}" for n, pair in [*ports.items(), ("gateway HTTP", (http_port,))] for p in pair
                      if _port_busy(p))
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
    for i, (spec, path) in enumerate(served):
        port, mport = ports[f"inference-{i}"]
        args = [*cli, "inference", "--host", host, "--port", str(port), "--metrics-port", str(mport),
                "--replica-id", f"inference-{i}", "--model-path", str(path), "--model-name", spec.name] \
            + (["--quantization", spec.quantization] if spec.quantization else []) \
            + (["--dtype", a.dtype] if a.dtype else [])
        children.append(Child(f"inference-{i}", "inference", args, port, mport))
        replicas.append(f"{dial}:{port}")
    port, mport = ports["cache"]
    children.append(Child("cache", "cache", [*cli, "cache", "--host", host, "--port", str(port), "--metrics-port",
                                             str(mport), "--redis-url", redis_url], port, mport))
    cache = f"{dial}:{port}"
    port, mport = ports["router"]
    children.append(Child("router", "router", [*cli, "router", "--host", host, "--port", str(port), "--metrics-port",
                                               str(mport), "--models-file", str(suite_file),
                                               *sum((["--backend", r] for r in replicas), [])], port, mport))
    router = f"{dial}:{port}"
    port, mport = ports["gateway"]
    children.append(Child("gateway", "gateway", [*cli, "gateway", "--host", host, "--port", str(port), "--metrics-port",
                                                 str(mport), "--http-port", str(http_port), "--redis-url", redis_url,
                                                 "--router", router, "--cache", cache, "--models-file", str(suite_file),
                                                 "--plaintext"], port, mport, http_port))   # a local run
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
            md = (("authorization", f"Bearer {self.env['STRATA_ADMIN_TOKEN']}"),)
            r = await admin.CreateKey(gateway_pb2.CreateKeyRequest(tenant="local"), timeout=10, metadata=md)
            # every service answers health before the router has asked each replica which model it serves:
            # READY waits until every model has a healthy replica in the gateway's view, or a first request
            # to one of them could be UNAVAILABLE
            deadline = time.monotonic() + 60
            while True:
                models = (await admin.ListModels(gateway_pb2.ListModelsRequest(), timeout=10, metadata=md)).models
                missing = [m.name for m in models if m.healthy_replicas < 1]
                if models and not missing:
                    return r.key
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no healthy replica serves {', '.join(missing) or 'any model'} after 60 s")
                await asyncio.sleep(0.2)

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
                                       f"STRATA_HTTP_ADDRESS=http://{dial}:{gw.http_port}\n"
                                       + "".join(f"STRATA_{c.name.upper().replace('-', '_')}_ADDRESS={dial}:{c.port}\n"
                                                 for c in suite.children if c.kind not in ("gateway", "redis")))
    os.chmod(suite.run_dir / "env", 0o600)
    rows = [(c.name, f"{dial}:{c.port}", f"http://{dial}:{c.metrics_port}/metrics" if c.metrics_port > 0 else "")
            for c in suite.children]
    width = max(len(r[0]) for r in rows)
    suite.say("\n".join([f">> Strata is up in {time.monotonic() - t0:.1f} s",
                         *(f"   {n:<{width}}  {addr:<22} {m}" for n, addr, m in rows),
                         f"   OpenAI-compatible HTTP API: http://{dial}:{gw.http_port}/v1",
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


def read_secrets(run_dir: Path | None = None) -> dict[str, str]:
    """The secrets.env `strata up` keeps beside its run directory (empty when there is none)."""
    path = (run_dir or Path(env("STRATA_RUN_DIR", ".strata/run"))).parent / "secrets.env"
    return _read_env_file(path)


def read_run_env(run_dir: Path | None = None) -> dict[str, str]:
    """The `env` file of the latest `strata up` (empty when there is none)."""
    return _read_env_file((run_dir or Path(env("STRATA_RUN_DIR", ".strata/run"))) / "env")


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        k, _, v = line.partition("=")
        if k.strip():
            out[k.strip()] = v.strip()
    return out
