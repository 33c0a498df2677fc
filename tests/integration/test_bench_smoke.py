"""Every benchmark `make bench` runs, in its seconds-long smoke mode (bench/smoke.py): each one runs end to end
on the real components (the model, the kernels, redis-server, the services on free ports) and writes a complete
JSON, so that a benchmark cannot silently break again (issue 21, item 6). The figures of a smoke run mean
nothing and are not checked. bench.hardening is run (longer) by test_hardening.py and bench.jobs by
test_jobs_faults.py; bench.kernels_gpu needs a CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# module, extra arguments, the JSON's top-level keys
BENCHMARKS = [pytest.param(module, extra, keys, id=module) for module, extra, keys in [
    ("cache", [], {"config", "machine", "search", "end_to_end", "targets"}),
    ("cache_scale", [], {"config", "machine", "real_questions", "sizes", "targets"}),
    ("gateway", [], {"config", "machine", "runs", "median", "targets"}),
    ("guardrails", [], {"config", "machine", "pii", "injection", "threshold_sweep"}),
    ("kernels", [], {"config", "machine", "copy_bandwidth_gbs", "paged_attention_decode", "paged_attention_mixed",
                     "gemv", "engine_decode", "targets"}),
    ("spec_decode", [], {"config", "machine", "single_stream", "verification_cost", "streams_32", "draft_model",
                         "targets"}),
    ("profile_engine", [], {"dtype", "quantization", "results"}),
    ("structured", [], {"config", "machine", "compile", "rows", "targets"}),
    ("samples", [], {"config", "machine", "rows"}),
    ("multi_model", [], {"config", "machine", "notes", "rows", "cascade", "premium", "targets"}),
    # the same checkout on both sides: the A/B driver runs end to end
    ("ab", ["--before-dir", str(ROOT), "--before-python", sys.executable], {"before", "after", "runs", "median", "ratio"}),
]] + [pytest.param("kernels_gpu", [], {"device", "paged_attention", "engine_decode"}, id="kernels_gpu",
                   marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def run_smoke(module: str, extra: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"bench.{module}", "--smoke", "--out", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize(("module", "extra", "keys"), BENCHMARKS)
def test_benchmark_runs_end_to_end_in_smoke_mode(module, extra, keys, tmp_path):
    out = tmp_path / f"{module}.json"
    proc = run_smoke(module, extra, out)
    assert proc.returncode == 0, f"bench.{module} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert keys <= set(result), sorted(set(keys) - set(result))
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name], "a smoke run writes its JSON only (no plot)"


def test_serving_smoke_measures_every_path(tmp_path):
    """The serving benchmark's smoke run goes through the replica's gRPC API, the gateway and the engine in
    process, and llama.cpp where the bench extra installed it (`make test` does not: it is skipped, as the
    benchmark says), and relates them (what each path costs, the memory-bandwidth share)."""
    out = tmp_path / "serving.json"
    proc = run_smoke("serving", ["--peers", "llama.cpp"], out)   # HF: 36 s of GGUF conversion, left to `make bench`
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name], "a smoke run writes its JSON only (no plot)"
    r = json.loads(out.read_text())
    assert {"strata", "strata via gateway", "in-process strata"} <= set(r["systems"])
    assert set(r["systems"]) | set(r["skipped"]) == {"strata", "strata via gateway", "in-process strata", "llama.cpp"}
    assert set(r["service"]) == {"strata", "strata via gateway"}
    assert {"service_vs_in_process_1_streams", "gateway_vs_in_process_1_streams"} <= set(r["targets"])
    share = r["memory_bandwidth"]["systems"]["strata"]
    assert share["bytes_per_token_mb"] > 90 and share["share"] > 0    # the quantized file's blocks, ~92 MiB
