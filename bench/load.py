"""A saturating load through the gateway, in a process of its own (as real callers are): one client per API
key, each sending completions to --model for --seconds, one at a time, and after a RESOURCE_EXHAUSTED
waiting its retry-after (at most --max-wait-s, so that the model stays saturated) before the next.

    python -m bench.load --gateway HOST:PORT --keys K1,K2,... [--model M] [--seconds 10] [--max-tokens 32]

Used by bench.multi_model and tests/integration/test_multi_model.py. The last line printed is JSON:
answered (complete answers), refused (RESOURCE_EXHAUSTED with a retry-after), other (anything else: a lost
request, which must not happen).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


async def run(a: argparse.Namespace) -> dict:
    import grpc

    from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
    from services.common.retry_after import retry_after_s

    outcomes = {"answered": 0, "refused": 0, "other": 0, "errors": []}
    deadline = time.monotonic() + a.seconds
    async with grpc.aio.insecure_channel(a.gateway) as ch:
        gw = gateway_pb2_grpc.GatewayStub(ch)
        req = gateway_pb2.GatewayRequest(model=a.model, prompt=a.prompt, sampling=common_pb2.SamplingParams(
            temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True), cache_policy=common_pb2.CACHE_POLICY_BYPASS)

        async def client(key: str) -> None:
            md = (("authorization", f"Bearer {key}"),)
            while time.monotonic() < deadline:
                try:
                    out = await gw.Generate(req, metadata=md, timeout=120)
                    outcomes["answered" if out.usage.completion_tokens == a.max_tokens else "other"] += 1
                except grpc.aio.AioRpcError as exc:
                    retry = retry_after_s(exc)
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry is not None:
                        outcomes["refused"] += 1
                        await asyncio.sleep(min(retry, a.max_wait_s))
                    else:
                        outcomes["other"] += 1
                        outcomes["errors"] = (outcomes["errors"] + [f"{exc.code().name}: {exc.details()}"])[-5:]
        print("load started", flush=True)
        await asyncio.gather(*(client(k) for k in a.keys.split(",") if k))
    return outcomes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", required=True)
    p.add_argument("--keys", required=True, help="comma-separated API keys, one client each")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--prompt", default="Write a long story about the sea.")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-wait-s", type=float, default=0.25, help="the longest retry-after honoured")
    a = p.parse_args(argv)
    from services.common import aio
    print(json.dumps(aio.run(run(a))), flush=True)


if __name__ == "__main__":
    main()
