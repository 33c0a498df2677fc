"""`strata up` as a user runs it: every service in its own process, then `strata chat`, `strata status`,
one trace across the four processes (the context crosses real process boundaries only through gRPC
metadata), the metrics ports, and a clean stop on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Up:
    def __init__(self, run_dir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STRATA_", "OTEL_"))}
        env.update({"STRATA_RUN_DIR": str(run_dir), "OTEL_BSP_SCHEDULE_DELAY": "100", "STRATA_DTYPE": "float32",
                    "STRATA_KEY_PEPPER": "pepper-for-the-up-test-0123", "STRATA_ADMIN_TOKEN": "admin-for-the-up-test"})
        self.env = env
        self.run_dir = run_dir
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--free-ports", *args], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if line.startswith(">> READY"):
                self.ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout):
            self.proc.kill()
            raise AssertionError("strata up did not get ready:\n" + "\n".join(self.lines[-40:]))

    def strata(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=self.env, timeout=timeout,
                              capture_output=True, text=True)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.mark.slow
def test_strata_up_serves_chat_status_one_trace_and_stops_cleanly(tmp_path):
    """The default suite: SmolLM2-135M-Instruct (chat) and Gemma 3 270M pretrained (completions only), one
    replica each (inference-0, inference-1)."""
    up = Up(tmp_path / "run")
    try:
        up.wait_ready(420)
        plan = json.loads((tmp_path / "run" / "models.yaml").read_text())
        assert [(m["name"], m["replicas"]) for m in plan["models"]] == [("SmolLM2-135M-Instruct", 1), ("gemma-3-270m", 1)]
        text = "\n".join(up.lines)
        assert "API key (tenant 'local'): sk-strata-" in text
        run_env = dict(line.split("=", 1) for line in (tmp_path / "run" / "env").read_text().splitlines())
        assert run_env["STRATA_API_KEY"].startswith("sk-strata-") and run_env["STRATA_API_KEY"] in text

        before = (tmp_path / "run" / "traces.jsonl").stat().st_size if (tmp_path / "run" / "traces.jsonl").exists() else 0
        chat = up.strata("chat", "Name a colour.", "--max-tokens", "8", "--temperature", "0")
        assert chat.returncode == 0, chat.stdout + chat.stderr
        assert chat.stdout.strip(), chat.stderr
        assert "model SmolLM2-135M-Instruct (inference-0), default;" in chat.stderr and " completion tokens]" in chat.stderr

        again = up.strata("chat", "Name a colour.", "--max-tokens", "8", "--temperature", "0")
        assert again.returncode == 0 and again.stdout == chat.stdout
        assert "cache_exact" in again.stderr

        status = up.strata("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == 3
        assert "inference-0" in status.stdout and "inference-1" in status.stdout
        assert "circuit closed" in status.stdout and "entries 1" in status.stdout
        smol = next(line for line in status.stdout.splitlines() if "model SmolLM2-135M-Instruct" in line)
        gemma = next(line for line in status.stdout.splitlines() if "model gemma-3-270m" in line)
        assert "serving, 1/1 replicas, chat + completions" in smol and "$0.01/$0.02 per 1k" in smol, smol
        assert "serving, 1/1 replicas, completions only" in gemma and "$0.02/$0.04 per 1k" in gemma, gemma
        raw = up.strata("chat", "--raw", "--model", "gemma-3-270m", "The capital of France is", "--max-tokens", "4",
                        "--temperature", "0")
        assert raw.returncode == 0 and raw.stdout.strip() and "model gemma-3-270m" in raw.stderr, raw.stderr
        refused = up.strata("chat", "--model", "gemma-3-270m", "Hi", "--max-tokens", "2")
        assert refused.returncode != 0 and "INVALID_ARGUMENT" in refused.stderr and "no chat template" in refused.stderr

        # the OpenAI HTTP API at the address `up` printed, with the official package (the suite's own processes)
        import openai
        assert f"OpenAI-compatible HTTP API: {run_env['STRATA_HTTP_ADDRESS']}/v1" in text
        client = openai.OpenAI(base_url=run_env["STRATA_HTTP_ADDRESS"] + "/v1", api_key=run_env["STRATA_API_KEY"],
                               max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} == {"SmolLM2-135M-Instruct", "gemma-3-270m", "all-MiniLM-L6-v2"}
        vectors = client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello", "world"])   # the cache's MiniLM
        assert [len(d.embedding) for d in vectors.data] == [384, 384] and vectors.usage.prompt_tokens == 6
        as_json = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=48, temperature=0,
                                                 messages=[{"role": "user", "content": "Describe a cat."}],
                                                 response_format={"type": "json_object"})
        assert as_json.choices[0].message.content.startswith("{")
        done = client.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=4,
                                         temperature=0)
        assert done.choices[0].text == raw.stdout[:-1] and done.model == "gemma-3-270m", (done, raw.stdout)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Hi"}])

        # the first chat's trace: four processes, one trace, linked through gRPC metadata
        deadline = time.monotonic() + 10
        while True:
            with open(tmp_path / "run" / "traces.jsonl", "rb") as f:
                f.seek(before)
                spans = [json.loads(line) for line in f.read().decode().splitlines()]
            roots = [s for s in spans if s["parent_span_id"] is None and s["name"] == "strata.v1.Gateway/GenerateStream"]
            if len(roots) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        first = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
        assert {s["service"] for s in first} == {"strata-gateway", "strata-cache", "strata-router", "strata-inference"}
        ids = {s["span_id"] for s in first}
        assert all(s["parent_span_id"] in ids for s in first if s is not roots[0])
        hit = [s for s in spans if s["trace_id"] == roots[1]["trace_id"]]
        assert {s["service"] for s in hit} == {"strata-gateway", "strata-cache"}

        ports = [line.rsplit(":", 1)[1].split("/")[0] for line in up.lines if "/metrics" in line and "http://" in line]
        assert len(ports) == 5                       # gateway, cache, router, two replicas
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                assert b"strata:" in r.read()

        children = _children(up.proc.pid)
        assert len(children) >= 6                    # redis, two replicas, cache, router, gateway
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0, "\n".join(up.lines[-30:])
        assert ">> stopped" in up.lines[-1]
        time.sleep(0.5)
        alive = [p for p in children if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
        assert not alive, f"children left running: {alive}"
    finally:
        if up.proc.poll() is None:
            os.killpg(os.getpgid(up.proc.pid), signal.SIGKILL)


def test_strata_up_fails_fast_with_the_log_tail_when_a_service_cannot_start(tmp_path):
    up = Up(tmp_path / "run", "--redis-url", "redis://127.0.0.1:1/0", "--models", "SmolLM2-135M-Instruct",
            "--dtype", "float64")
    assert up.proc.wait(120) == 1
    time.sleep(0.2)
    text = "\n".join(up.lines)
    assert "inference-0 exited with" in text and "float64" in text
    assert ">> READY" not in text


def test_a_restarted_service_appends_to_its_log_and_the_supervisor_keeps_one_file_open_per_service(tmp_path):
    """`up`'s own start and log pump around a cheap child (a shell printing its pid) instead of a service."""
    import argparse

    from services.up import Suite, add_args

    parser = argparse.ArgumentParser()
    add_args(parser)
    suite = Suite(parser.parse_args(["--free-ports", "--quiet", "--redis-url", "redis://127.0.0.1:1/0",
                                     "--run-dir", str(tmp_path / "run")]))
    suite.run_dir.mkdir(parents=True, exist_ok=True)
    router = next(c for c in suite.children if c.kind == "router")
    router.args = ["sh", "-c", "echo started $$; exec sleep 60"]
    log = suite.run_dir / "router.log"

    def open_logs() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(log.resolve()))

    def wait_for_lines(n: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(lines := log.read_text().splitlines()) < n:
            assert time.monotonic() < deadline, lines
            time.sleep(0.02)
        return lines

    try:
        suite.start(router)
        first = router.proc.pid
        assert wait_for_lines(1) == [f"started {first}"]
        router.proc.kill()
        router.proc.wait()
        suite.start(router)
        assert wait_for_lines(2) == [f"started {first}", f"started {router.proc.pid}"]
        assert open_logs() == 1
    finally:
        suite.stop()
    assert open_logs() == 0
