"""Container health check: exit 0 when a gRPC server answers SERVING on grpc.health.v1, else 1.

Used by docker-compose (the image has grpcio-health-checking); Kubernetes uses its native `grpc:` probes.

    python grpc_health_check.py 127.0.0.1:50051 [strata.v1.Gateway] [--timeout-s 2]
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The health status name (SERVING, NOT_SERVING, ...) or the gRPC error code name."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address", help="host:port of the gRPC server")
    p.add_argument("service", nargs="?", default="", help="service name to check ('' = the whole server)")
    p.add_argument("--timeout-s", type=float, default=2.0)
    a = p.parse_args(argv)
    status = check(a.address, a.service, a.timeout_s)
    if status != "SERVING":
        print(f"{a.address} {a.service or '(server)'}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
