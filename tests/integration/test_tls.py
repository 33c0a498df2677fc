"""Transport security on real sockets with certificates generated here: the whole request path over TLS,
mutual TLS between the services (a router without a client certificate never reaches its replica), a
plaintext client refused by the TLS gateway, and the gateway refusing to serve plaintext unless told to."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache.main import CacheService
from services.cache.service import CacheConfig
from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.tls import TlsConfig, TlsConfigError
from services.gateway.main import GatewayService, GatewayServiceConfig, add_serve_args, config_from_args
from services.gateway.config import GatewayConfig
from services.inference.config import engine_config
from services.inference.main import InferenceService, InferenceServiceConfig
from services.router.backends import BackendConfig
from services.router.main import RouterService
from services.router.service import RouterConfig

SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")
ADMIN = "admin-token-for-tls-tests"
PEPPER = "pepper-for-tls-tests-0123456789"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key, cert) -> tuple[str, str]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def _issue(ca_key, ca_cert, cn: str, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate; and a second CA
    that signed nothing the servers trust."""
    d = tmp_path_factory.mktemp("tls")
    out = {}
    for ca_name in ("ca", "other_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_cert = (x509.CertificateBuilder().subject_name(_name(f"strata test {ca_name}")).issuer_name(_name(f"strata test {ca_name}"))
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        out[ca_name], _ = _write(d / ca_name, ca_key, ca_cert)
        if ca_name == "ca":
            out["server_cert"], out["server_key"] = _write(d / "server", *_issue(ca_key, ca_cert, "localhost", True))
            out["client_cert"], out["client_key"] = _write(d / "client", *_issue(ca_key, ca_cert, "strata-router", False))
        else:
            out["stranger_cert"], out["stranger_key"] = _write(d / "stranger", *_issue(ca_key, ca_cert, "stranger", False))
    return out


def service_tls(c: dict[str, str], mutual: bool = True) -> TlsConfig:
    """What every service is given in the test: its server certificate (client certificates required when
    `mutual`), and the CA and client certificate it dials the services behind it with."""
    return TlsConfig(cert_file=c["server_cert"], key_file=c["server_key"], client_ca_file=c["ca"] if mutual else "",
                     ca_file=c["ca"], client_cert_file=c["client_cert"], client_key_file=c["client_key"])


async def health(channel: grpc.aio.Channel, timeout: float = 3.0) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)).status


@SESSION_LOOP
async def test_a_request_crosses_all_four_services_over_mutual_tls(certs, redis_url, make_engine, embedder):
    mtls = service_tls(certs)
    replica = InferenceService(InferenceServiceConfig(engine=engine_config(dtype="float32"), port=0, replica_id="tls-1",
                                                      grace_s=0.0, tls=mtls), engine=make_engine("float32"))
    rport = await replica.start()
    router = RouterService(RouterConfig(backends=[f"localhost:{rport}"], backend=BackendConfig(load_interval_s=0.1, tls=mtls)))
    router_port = await router.start()
    cache = CacheService(CacheConfig(redis_url=redis_url), port=0, embedder=embedder, tls=mtls)
    cache_port = await cache.start()
    # the public port: TLS, no client certificates (API keys authenticate callers)
    gw = GatewayService(GatewayServiceConfig(GatewayConfig(injection_similarity=0.0), redis_url, f"localhost:{router_port}",
                                             f"localhost:{cache_port}", PEPPER, ADMIN, tls=service_tls(certs, mutual=False)))
    gport = await gw.start()
    client = grpc.aio.secure_channel(f"localhost:{gport}", grpc.ssl_channel_credentials(Path(certs["ca"]).read_bytes()))
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{gport}")
    try:
        for _ in range(200):                                 # the router reached its replica over mutual TLS
            if all(b.healthy for b in router.router.backends.values()):
                break
            await asyncio.sleep(0.02)
        assert all(b.healthy for b in router.router.backends.values())
        admin, stub = gateway_pb2_grpc.GatewayAdminStub(client), gateway_pb2_grpc.GatewayStub(client)
        key = (await admin.CreateKey(gateway_pb2.CreateKeyRequest(tenant="acme"),
                                     metadata=(("authorization", f"Bearer {ADMIN}"),))).key
        req = gateway_pb2.GatewayRequest(model="SmolLM2-135M-Instruct", messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="user", content="Say hello.")]),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        resp = await stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
        assert resp.usage.completion_tokens == 4 and resp.text
        with pytest.raises(grpc.aio.AioRpcError) as err:           # a plaintext caller gets no answer
            await health(plain)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.close()
        await plain.close()
        await gw.stop(0)
        await cache.stop(0)
        await router.stop(0)
        await replica.stop()


@SESSION_LOOP
@pytest.mark.parametrize("who", ["no certificate", "a certificate from another CA", "plaintext"])
async def test_mutual_tls_admits_only_clients_with_a_certificate_from_its_ca(certs, make_engine, who):
    replica = InferenceService(InferenceServiceConfig(engine=engine_config(dtype="float32"), port=0, replica_id="tls-2",
                                                      grace_s=0.0, tls=service_tls(certs)), engine=make_engine("float32"))
    port = await replica.start()
    ca = Path(certs["ca"]).read_bytes()
    good = grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
        ca, Path(certs["client_key"]).read_bytes(), Path(certs["client_cert"]).read_bytes()))
    bad = {"no certificate": lambda: grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)),
           "a certificate from another CA": lambda: grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
               ca, Path(certs["stranger_key"]).read_bytes(), Path(certs["stranger_cert"]).read_bytes())),
           "plaintext": lambda: grpc.aio.insecure_channel(f"127.0.0.1:{port}")}[who]()
    # a router whose dialing lacks the client certificate never sees the replica healthy
    router = RouterService(RouterConfig(backends=[f"localhost:{port}"], backend=BackendConfig(
        load_interval_s=0.1, reconnect_s=0.1, tls=TlsConfig(ca_file=certs["ca"]))))
    await router.start()
    try:
        assert await health(good) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health(bad, timeout=2.0)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(0.5)
        assert not any(b.healthy for b in router.router.backends.values())
    finally:
        await good.close()
        await bad.close()
        await router.stop(0)
        await replica.stop()


def _gateway_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(list(argv))


def test_the_gateway_serves_plaintext_only_when_told_to(certs, monkeypatch):
    monkeypatch.setenv("STRATA_KEY_PEPPER", PEPPER)
    for name in ("STRATA_GATEWAY_PLAINTEXT", "STRATA_TLS_CERT", "STRATA_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="--tls-cert and --tls-key .* or --plaintext"):
        config_from_args(_gateway_args())
    assert not config_from_args(_gateway_args("--plaintext")).tls.serves_tls
    served = config_from_args(_gateway_args("--tls-cert", certs["server_cert"], "--tls-key", certs["server_key"]))
    assert served.tls.serves_tls and not served.tls.client_ca_file
    monkeypatch.setenv("STRATA_GATEWAY_PLAINTEXT", "1")
    assert not config_from_args(_gateway_args()).tls.serves_tls


@pytest.mark.parametrize("kwargs,message", [
    ({"cert_file": "x"}, "--tls-cert and --tls-key go together"),
    ({"client_cert_file": "c", "client_key_file": "k"}, "needs --tls-ca"),
    ({"client_ca_file": "ca"}, "needs the server's own --tls-cert"),
    ({"ca_file": "/no/such/ca.pem"}, "--tls-ca: no such file"),
])
def test_tls_settings_that_do_not_fit_together_are_refused_with_the_flag_named(kwargs, message):
    with pytest.raises(TlsConfigError, match=message):
        TlsConfig(**kwargs).validate()
