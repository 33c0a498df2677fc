"""`strata cache eval` on a small labelled file: the report's shape and its arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys

PAIRS = [
    ("How do I learn Python quickly?", "How can I learn Python quickly?", 1),
    ("What is the capital of France?", "What is the capital of France?", 1),      # an exact repeat: always a hit
    ("How do I learn Java quickly?", "How can I learn Rust quickly?", 0),
    ("Why is the sky blue?", "Why does the sky look blue?", 1),
    ("What is the best pizza in Naples?", "What is the best pizza in Rome?", 0),
    ("How do I reset my router?", "How can I reset my router?", 1),
    ("Who wrote Hamlet?", "How tall is Mount Everest?", 0),
    ("What are good exercises for back pain?", "Which exercises help with back pain?", 1),
]


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "cache", "eval", *args],
                          capture_output=True, text=True, timeout=300)


def test_eval_reports_precision_recall_per_threshold_for_both_decisions(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"text_a": a, "text_b": b, "label": y}) + "\n" for a, b, y in PAIRS))
    proc = run_eval("--pairs", str(f), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["num_pairs"] == 8 and not report["trained_on_this_file"]
    res = report["results"]["all"]
    assert res["lookups"] == 8 and res["duplicates"] == 5
    for points in (res["classifier"], res["cosine"]):
        assert len(points) > 5
        hits = [p["hits"] for p in points]
        assert hits == sorted(hits, reverse=True)        # a higher threshold never hits more
        for p in points:
            assert 0 <= p["correct_hits"] <= p["hits"] <= 8
            assert 0.0 <= p["precision"] <= p["precision_closure"] <= 1.0
            assert p["recall"] == p["correct_hits"] / 5
    default = res["default"]
    assert default["decision"].startswith("classifier") and default["hits"] >= 1   # the exact repeat at least
    assert any(p["threshold"] == default["threshold"] for p in res["classifier"])
    # the label oracle hits every lookup whose own or an equivalent question is among the candidates
    oracle = res["oracle"]
    assert oracle["precision_closure"] == 1.0 and oracle["hits"] >= default["hits"] * default["precision_closure"]
    assert oracle["correct_hits"] == 5 and oracle["recall"] == 1.0
    # plain cosine at 0.80: the paraphrases hit their own question
    cos80 = next(p for p in res["cosine"] if p["threshold"] == 0.8)
    assert cos80["correct_hits"] >= 4


def test_eval_rejects_a_malformed_file(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text_a": "x"}\n')
    proc = run_eval("--pairs", str(f))
    assert proc.returncode != 0 and "text_b" in proc.stderr
    proc = run_eval("--pairs", str(tmp_path / "missing.jsonl"))
    assert proc.returncode != 0 and "no such file" in proc.stderr


def test_eval_reads_gptcaches_benchmark_file_and_draws_the_curve(tmp_path):
    f = tmp_path / "mock_data.json"                     # GPTCache's shape: every pair the same question
    f.write_text(json.dumps([{"origin": a, "similar": b} for a, b, y in PAIRS if y]))
    png = tmp_path / "curve.png"
    proc = run_eval("--pairs", str(f), "--json", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)["results"]["all"]
    assert res["lookups"] == res["duplicates"] == 5
    cos80 = next(p for p in res["cosine"] if p["threshold"] == 0.8)
    assert cos80["correct_hits"] >= 4 and cos80["hits"] <= 5
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"origin": "x"}]))
    proc = run_eval("--pairs", str(bad))
    assert proc.returncode != 0 and "similar" in proc.stderr
