"""Container health check: exit 0 when a gRPC server answers SERVING on grpc.health.v1, else 1.

Used by docker-compose (the image has grpcio-health-checking) and, where the ports serve TLS, by the
Kubernetes exec probes of deploy/k8s/components/tls (the kubelet's native `grpc:` probes speak plaintext only).

    python grpc_health_check.py 127.0.0.1:50051 [strata.v1.Gateway] [--timeout-s 2]
    python grpc_health_check.py 127.0.0.1:50071 strata.v1.SemanticCache --tls-ca ca.crt \\
        --tls-client-cert tls.crt --tls-client-key tls.key --tls-server-name cache
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import PLAINTEXT, TlsConfig, TlsConfigError


def check(address: str, service: str = "", timeout_s: float = 2.0, tls: TlsConfig = PLAINTEXT) -> str:
    """The health status name (SERVING, NOT_SERVING, ...) or the gRPC error code name."""
    creds = tls.channel_credentials()
    if creds is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    with channel:
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
    # the dialing half of the services' --tls-* flags (services/common/tls.py); no flag = plaintext
    p.add_argument("--tls-ca", default="", help="dial TLS, trusting this PEM CA")
    p.add_argument("--tls-client-cert", default="", help="present this PEM certificate (the server's mutual TLS)")
    p.add_argument("--tls-client-key", default="", help="its PEM private key")
    p.add_argument("--tls-server-name", default="",
                   help="the name expected in the server's certificate (default: the host dialed)")
    a = p.parse_args(argv)
    tls = TlsConfig(ca_file=a.tls_ca, client_cert_file=a.tls_client_cert, client_key_file=a.tls_client_key,
                    server_name=a.tls_server_name)
    try:
        tls.validate()
    except TlsConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    status = check(a.address, a.service, a.timeout_s, tls)
    if status != "SERVING":
        print(f"{a.address} {a.service or '(server)'}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
