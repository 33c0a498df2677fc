"""`strata chat` and `strata status`: a person's view of a running suite.

Addresses and the API key come from the flags, else the environment (STRATA_GATEWAY_ADDRESS,
STRATA_API_KEY, STRATA_<SERVICE>_ADDRESS), else the `env` file the latest `strata up` wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.up import read_run_env


def _setting(name: str, flag: str | None, default: str = "") -> str:
    import os
    return flag or os.environ.get(name) or read_run_env().get(name, default)


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("message", help="what to ask")
    p.add_argument("--gateway", default=None, help="host:port (default: STRATA_GATEWAY_ADDRESS or `strata up`'s)")
    p.add_argument("--api-key", default=None, help="default: STRATA_API_KEY or the key `strata up` created")
    p.add_argument("--model", default=None)
    p.add_argument("--system", default=None, help="a system message first")
    p.add_argument("--raw", action="store_true",
                   help="send the message as a raw prompt to complete (no chat template): for a completions-only "
                        "model such as Gemma 3 270M pretrained")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--cache", choices=["use", "bypass", "refresh"], default=None)
    p.add_argument("--timeout", type=float, default=120.0)


def chat(a: argparse.Namespace) -> None:
    """Stream the answer to stdout; where it came from and its usage to stderr."""
    from services.client import StrataClient, StrataClientError

    key = _setting("STRATA_API_KEY", a.api_key)
    if not key:
        raise SystemExit("no API key: pass --api-key, set STRATA_API_KEY, or start the suite with `strata up`")
    target = _setting("STRATA_GATEWAY_ADDRESS", a.gateway, "127.0.0.1:50051")
    if a.raw and a.system:
        raise SystemExit("--raw sends a prompt, not messages: drop --system")
    messages = a.message if a.raw else \
        ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.message}]
    sampling = {"max_tokens": a.max_tokens, "temperature": a.temperature}
    try:
        with StrataClient(target, key, timeout=a.timeout) as client:
            last = None
            for chunk in client.stream(messages, model=a.model, cache=a.cache, **sampling):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
    except StrataClientError as exc:
        sys.stdout.write("\n")
        raise SystemExit(f"strata chat: {exc.code.name}: {exc.details}") from None
    sys.stdout.write("\n")
    if last is not None and last.source is not None:
        src = last.source
        where = src.kind + (f" {src.model}" if src.model else "") + (f" ({src.replica})" if src.replica else "") \
            + (f" ({src.entry_id})" if src.entry_id else "") + (f", {src.route}" if src.route else "")
        usage = last.usage
        sys.stderr.write(f"[{last.finish_reason}; {where}; {usage.prompt_tokens if usage else 0} prompt + "
                         f"{usage.completion_tokens if usage else 0} completion tokens]\n")


def add_status_args(p: argparse.ArgumentParser) -> None:
    for name in ("gateway", "router", "cache"):
        p.add_argument(f"--{name}", default=None, help=f"host:port (default: STRATA_{name.upper()}_ADDRESS or `strata up`'s)")


def status(a: argparse.Namespace) -> None:
    code = asyncio.run(_status(a))
    raise SystemExit(code)


async def _status(a: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.pb import cache_pb2, cache_pb2_grpc, router_pb2, router_pb2_grpc

    addresses = {"gateway": _setting("STRATA_GATEWAY_ADDRESS", a.gateway, "127.0.0.1:50051"),
                 "router": _setting("STRATA_ROUTER_ADDRESS", a.router, "127.0.0.1:50081"),
                 "cache": _setting("STRATA_CACHE_ADDRESS", a.cache, "127.0.0.1:50071")}
    names = {"gateway": "strata.v1.Gateway", "router": "strata.v1.Router", "cache": "strata.v1.SemanticCache"}
    healthy = True
    for service, address in addresses.items():
        async with grpc.aio.insecure_channel(address) as ch:
            try:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=names[service]),
                                                               timeout=2)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.aio.AioRpcError as exc:
                state = f"unreachable ({exc.code().name})"
            healthy &= state == "SERVING"
            print(f"{service:<8} {address:<22} {state}")
            if state != "SERVING" and not state.startswith("NOT_SERVING"):
                continue
            if service == "gateway":
                await _print_models(ch)
            if service == "cache":
                s = await cache_pb2_grpc.SemanticCacheStub(ch).Stats(cache_pb2.StatsRequest(), timeout=5)
                print(f"         entries {s.entries}, lookups {s.lookups}, hits {s.hits_exact} exact + "
                      f"{s.hits_semantic} semantic, stores {s.stores}, redis {'up' if s.redis_ok else 'DOWN'}")
            if service == "router":
                r = await router_pb2_grpc.RouterStub(ch).ListBackends(router_pb2.ListBackendsRequest(), timeout=5)
                print(f"         policy {r.policy}")
                for b in r.backends:
                    circuit = router_pb2.CircuitState.Name(b.circuit).removeprefix("CIRCUIT_STATE_").lower()
                    print(f"         {b.replica or '?':<14} {b.address:<22} {b.model or '?'}: "
                          f"{'healthy' if b.healthy else 'UNHEALTHY'}, "
                          f"circuit {circuit}, running {b.load.num_running}, waiting {b.load.num_waiting}, "
                          f"pending tokens {b.load.pending_tokens}, KV {b.load.kv_cache_usage:.0%}, "
                          f"routed {b.routed}, failures {b.failures}")
                healthy &= bool(r.backends) and all(b.healthy for b in r.backends)
    return 0 if healthy else 1


async def _print_models(channel) -> None:
    """The gateway's models (ListModels, with the admin token from STRATA_ADMIN_TOKEN or `strata up`'s
    secrets): state, replicas, chat or completions only, load and price."""
    import os

    import grpc

    from services.common.pb import gateway_pb2, gateway_pb2_grpc
    from services.up import read_secrets

    token = os.environ.get("STRATA_ADMIN_TOKEN") or read_secrets().get("STRATA_ADMIN_TOKEN", "")
    if not token:
        print("         models: set STRATA_ADMIN_TOKEN to list them")
        return
    try:
        r = await gateway_pb2_grpc.GatewayAdminStub(channel).ListModels(
            gateway_pb2.ListModelsRequest(), timeout=5, metadata=(("authorization", f"Bearer {token}"),))
    except grpc.aio.AioRpcError as exc:
        print(f"         models: ListModels failed ({exc.code().name})")
        return
    width = max((len(m.name) for m in r.models), default=0)
    for m in r.models:
        kind = "chat + completions" if m.chat else "completions only" if m.state != "unknown" else "?"
        tiers = f", tiers {'/'.join(m.tiers)}" if m.tiers else ""
        fallback = f", fallback {' > '.join(m.fallbacks)}" if m.fallbacks else ""
        print(f"         model {m.name:<{width}}  {m.state}, {m.healthy_replicas}/{m.replicas} replicas, {kind}, "
              f"running {m.running}, waiting {m.waiting}, pending tokens {m.pending_tokens}, "
              f"${m.usd_per_1k_prompt_tokens:g}/${m.usd_per_1k_completion_tokens:g} per 1k prompt/completion"
              f"{tiers}{fallback}")
