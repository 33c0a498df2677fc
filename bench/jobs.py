"""Background jobs against interactive traffic: does a large job stay out of interactive requests' way?

    python -m bench.jobs [--rounds 3] [--probes 8] [--job-items 200] [--job-max-tokens 64] [--workers 2]
                         [--smoke] [--out PATH]

The suite runs as processes, as `make up` serves it (services/up.py's plan on free ports: redis-server, one
inference replica on the GGUF kernels, the cache, the router, the gateway with --workers job workers). Each round:
--probes interactive streaming chat requests one after another (about 100 prompt tokens, 4 new, greedy, cache
bypassed) with no job running, then a job of --job-items requests (distinct prompts of the same size,
--job-max-tokens new each) is submitted and, once its first items are decoding, the same probes run beside it;
then the job is cancelled and the next round starts. Measured: each probe's time to its first token, and how many
job items ended while the probes ran. Medians, and the ratio job running / idle (issue 25: at most 1.5).

Jobs run at a priority after every interactive request (JOB_PRIORITY): the engine schedules a waiting interactive
request before them and preempts a job item when the batch is full. JSON + PNG in bench/results/jobs.{json,png}
(--out moves both); --smoke: one round of 3 probes against a 12-item job, the JSON only, to a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench import smoke
from bench.hardening import Cluster, new_key

MODEL = "SmolLM2-135M-Instruct"
TEXT = (Path(__file__).parents[1] / "tests" / "data" / "heldout.txt").read_text().split()


def _prompt(i: int, words: int = 70) -> str:
    start = (i * 37) % (len(TEXT) - words)
    return f"Summarise in one line ({i}): " + " ".join(TEXT[start:start + words])


def _request(text: str, max_tokens: int):
    from services.common.pb import common_pb2, gateway_pb2

    return gateway_pb2.GatewayRequest(
        model=MODEL, messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
        cache_policy=common_pb2.CACHE_POLICY_BYPASS)


async def _ttft(stub, auth, text: str) -> float:
    t0 = time.perf_counter()
    async for chunk in stub.GenerateStream(_request(text, 4), metadata=auth, timeout=120):
        if chunk.token_ids or chunk.text:
            return time.perf_counter() - t0
    raise RuntimeError("a probe ended without a token")


async def _probes(stub, auth, n: int, offset: int) -> list[float]:
    out = []
    for i in range(n):
        out.append(await _ttft(stub, auth, _prompt(100_000 + offset + i)))
        await asyncio.sleep(0.05)
    return out


async def _job_state(stub, auth, job_id: str):
    from services.common.pb import gateway_pb2

    return await stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), metadata=auth, timeout=10)


def cluster_for(workers: int, run_dir: Path | None = None, gateway_args: tuple[str, ...] = ()) -> Cluster:
    """The suite this benchmark runs on: one replica, the gateway with `workers` job workers."""
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="strata-bench-jobs-"))
    return Cluster(run_dir, max_queued=256, gateway_max_in_flight=1024, circuit_cooldown_s=5.0, replicas=1,
                   gateway_args=("--job-workers", str(workers), *gateway_args))


async def measure(a: argparse.Namespace, cluster: Cluster | None = None) -> dict:
    """The rounds on `cluster` (started by the caller, and left running), else on one of its own."""
    import grpc

    from services.common.pb import gateway_pb2, gateway_pb2_grpc

    own = cluster is None
    if own:
        cluster = cluster_for(a.workers)
        await cluster.start()
    rounds = []
    try:
        gateway = cluster.address("gateway")
        key, _ = await new_key(gateway, cluster.admin_token, "bench")
        auth = (("authorization", f"Bearer {key}"),)
        async with grpc.aio.insecure_channel(gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            await _probes(stub, auth, 3, 900_000)                 # warm-up
            for r in range(a.rounds):
                idle = await _probes(stub, auth, a.probes, r * 1000)
                items = [_request(_prompt(r * 10_000 + i), a.job_max_tokens) for i in range(a.job_items)]
                job = await stub.SubmitJob(gateway_pb2.SubmitJobRequest(requests=items), metadata=auth, timeout=60)
                while (await _job_state(stub, auth, job.id)).started_unix == 0:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)                          # its first items are decoding
                before = await _job_state(stub, auth, job.id)
                t0 = time.perf_counter()
                busy = await _probes(stub, auth, a.probes, r * 1000 + 500)
                during_s = time.perf_counter() - t0
                after = await _job_state(stub, auth, job.id)
                await stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=job.id), metadata=auth, timeout=10)
                while (await _job_state(stub, auth, job.id)).state != gateway_pb2.JOB_STATE_CANCELLED:
                    await asyncio.sleep(0.1)
                rounds.append({"idle_ttft_s": idle, "busy_ttft_s": busy,
                               "job_items_done_during_probes": after.completed - before.completed,
                               "probes_s": during_s,
                               "ratio": statistics.median(busy) / statistics.median(idle)})
                print(f"round {r}: time to first token idle {1000 * statistics.median(idle):.0f} ms, with the job "
                      f"{1000 * statistics.median(busy):.0f} ms (x{rounds[-1]['ratio']:.2f}); "
                      f"{rounds[-1]['job_items_done_during_probes']} job items ended meanwhile", flush=True)
    finally:
        if own:
            cluster.stop()
    idle_all = [x for r in rounds for x in r["idle_ttft_s"]]
    busy_all = [x for r in rounds for x in r["busy_ttft_s"]]
    return {"rounds": rounds, "idle_ttft_median_s": statistics.median(idle_all),
            "busy_ttft_median_s": statistics.median(busy_all),
            "ratio_median_of_rounds": statistics.median(r["ratio"] for r in rounds),
            "job_items_per_s_during_probes": sum(r["job_items_done_during_probes"] for r in rounds)
            / sum(r["probes_s"] for r in rounds)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = result["rounds"]
    data, labels = [], []
    for i, r in enumerate(rounds):
        data += [[1000 * x for x in r["idle_ttft_s"]], [1000 * x for x in r["busy_ttft_s"]]]
        labels += [f"r{i} idle", f"r{i} job"]
    ax.boxplot(data, tick_labels=labels)
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"Interactive TTFT beside a {result['config']['job_items']}-item job: "
                 f"x{result['ratio_median_of_rounds']:.2f} (median of rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probes", type=int, default=8, help="interactive requests per round and condition")
    p.add_argument("--job-items", type=int, default=200)
    p.add_argument("--job-max-tokens", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="the gateway's --job-workers")
    smoke.add_args(p, "jobs")
    a = smoke.resolve(p.parse_args(argv), rounds=1, probes=3, job_items=12)
    from bench.serving import machine_info

    result = {"config": {k: getattr(a, k) for k in ("rounds", "probes", "job_items", "job_max_tokens", "workers", "smoke")},
              "machine": machine_info(), **asyncio.run(measure(a))}
    smoke.write(a, result, plot)
    return result


if __name__ == "__main__":
    main()
