"""deploy/k8s/components/tls through overlays/cpu-tls (overlays/cpu with the component): each service
mounts its own Secret read-only, its --tls-* settings name that Secret's files, the gateway keeps no
plaintext setting, the probes speak TLS instead of the kubelet's plaintext gRPC, and nothing else differs
from overlays/cpu. Then on real sockets, with certificates made the way deploy/README.md says (one CA;
each service's certificate for its Service name, for server and client use): the services parse the
rendered settings as they would at start, the rendered probes pass only a SERVING server, and every caller
reaches the services behind it over mutual TLS while a caller without a certificate does not."""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import re
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import GrpcServer
from services.common.tls import TlsConfig, tls_from_args
from tests.deploy.test_manifests import (DEPLOY, SERVICES, by_kind, container_env, render, require,
                                         run_health_check, strata_containers)

TLS_DIR = "/etc/strata/tls"                 # where each pod mounts its Secret
HEALTH_CHECK = "/opt/strata/grpc_health_check.py"
# what each service's callers dial: the gateway `router:50081` and `cache:50071` (the host is the name it
# verifies), the router the replicas' pod IPs (it verifies STRATA_TLS_SERVER_NAME)
CALLS = (("gateway", "router", "STRATA_ROUTER_ADDRESS"), ("gateway", "cache", "STRATA_CACHE_ADDRESS"),
         ("router", "inference", None))
# which file each setting must name
FILE_OF = {"STRATA_TLS_CERT": "tls.crt", "STRATA_TLS_KEY": "tls.key", "STRATA_TLS_CLIENT_CA": "ca.crt",
           "STRATA_TLS_CA": "ca.crt", "STRATA_TLS_CLIENT_CERT": "tls.crt", "STRATA_TLS_CLIENT_KEY": "tls.key"}
SERVES = ("STRATA_TLS_CERT", "STRATA_TLS_KEY")
REQUIRES_CLIENT_CERTS = ("STRATA_TLS_CLIENT_CA",)
DIALS = ("STRATA_TLS_CA", "STRATA_TLS_CLIENT_CERT", "STRATA_TLS_CLIENT_KEY")


def tls_docs() -> tuple[dict, ...]:
    return render("cpu-tls")


def tls_settings(docs, container: dict) -> dict[str, str]:
    return {k: v for k, v in container_env(docs, container).items() if k.startswith("STRATA_TLS_")}


def probe_args(container: dict, probe: str) -> list[str]:
    return container[probe]["exec"]["command"]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ---- the rendered manifests

def test_each_service_mounts_its_own_secret_read_only_for_its_group_alone():
    for kind, (container, dep) in strata_containers(tls_docs()).items():
        spec = dep["spec"]["template"]["spec"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TLS_DIR]
        assert mount["readOnly"] is True, kind
        secret = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["secret"]
        assert secret["secretName"] == f"strata-{kind}-tls", kind
        assert "items" not in secret, kind   # every key of the Secret: tls.crt, tls.key, ca.crt
        assert secret["defaultMode"] == 0o440, kind
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"], kind


def test_tls_settings_name_the_mounted_files_serve_everywhere_and_dial_what_each_service_calls():
    docs = tls_docs()
    callers = {caller for caller, _, _ in CALLS}
    for kind, (container, _) in strata_containers(docs).items():
        settings = tls_settings(docs, container)
        for var, path in settings.items():
            if var != "STRATA_TLS_SERVER_NAME":
                assert path == f"{TLS_DIR}/{FILE_OF[var]}", (kind, var)
        expected = {*SERVES, *(DIALS if kind in callers else ()),
                    # the gateway's port is public: API keys, not client certificates
                    *(REQUIRES_CLIENT_CERTS if kind != "gateway" else ())}
        assert set(settings) - {"STRATA_TLS_SERVER_NAME"} == expected, kind
    router = container_env(docs, strata_containers(docs)["router"][0])
    assert router["STRATA_TLS_SERVER_NAME"] == "inference"   # replicas are dialed by pod IP


def test_the_gateway_keeps_no_plaintext_setting():
    docs = tls_docs()
    container, _ = strata_containers(docs)["gateway"]
    assert "STRATA_GATEWAY_PLAINTEXT" not in container_env(docs, container)
    assert "--plaintext" not in container["args"]
    assert not [c for c in by_kind(docs, "ConfigMap").values() if "STRATA_GATEWAY_PLAINTEXT" in c.get("data", {})]


def test_probes_speak_tls_with_the_pods_own_certificate_instead_of_the_kubelets_plaintext_grpc():
    assert f"COPY deploy/grpc_health_check.py {HEALTH_CHECK}" in (DEPLOY / "Dockerfile").read_text()
    for kind, (container, _) in strata_containers(tls_docs()).items():
        port, _, health_name = SERVICES[kind]
        probes = {p: container[p] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert not [p for p, spec in probes.items() if "grpc" in spec], kind
        assert probes["startupProbe"]["tcpSocket"]["port"] == port, kind
        for probe, service in (("livenessProbe", []), ("readinessProbe", [health_name])):
            args = probe_args(container, probe)
            assert args[:3 + len(service)] == ["python", HEALTH_CHECK, f"127.0.0.1:{port}", *service], (kind, probe)
            assert (flag(args, "--tls-ca"), flag(args, "--tls-client-cert"), flag(args, "--tls-client-key")) == \
                (f"{TLS_DIR}/ca.crt", f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key"), (kind, probe)
            assert flag(args, "--tls-server-name") == kind, (kind, probe)
            # the RPC's deadline leaves the interpreter's start time inside the kubelet's
            assert float(flag(args, "--timeout-s")) + 1 < probes[probe]["timeoutSeconds"], (kind, probe)


def without_tls(docs) -> list[dict]:
    """The render with the component's changes taken out: ConfigMap hash suffixes, STRATA_TLS_* settings,
    the gateway's plaintext setting, the Secret volume and its mount, fsGroup, and the probes."""
    out = []
    for doc in copy.deepcopy(docs):
        text = yaml.safe_dump(doc)
        doc = yaml.safe_load(re.sub(r"(strata-(?:common|gateway|router|cache|inference))-[a-z0-9]{10}\b", r"\1", text))
        if doc["kind"] == "ConfigMap":
            doc["data"] = {k: v for k, v in doc["data"].items()
                           if not k.startswith("STRATA_TLS_") and k != "STRATA_GATEWAY_PLAINTEXT"}
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            spec["securityContext"].pop("fsGroup", None)
            spec["volumes"] = [v for v in spec["volumes"] if "secret" not in v]
            for c in spec["containers"]:
                c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["mountPath"] != TLS_DIR]
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    c.pop(probe, None)
        out.append(doc)
    return out


def test_the_component_changes_nothing_else_and_the_plain_render_keeps_its_plaintext_gateway():
    plain, tls = render("cpu"), tls_docs()
    assert without_tls(tls) == without_tls(plain)
    assert without_tls(plain) != list(plain)   # the comparison really took something out
    gateway, _ = strata_containers(plain)["gateway"]
    assert container_env(plain, gateway)["STRATA_GATEWAY_PLAINTEXT"] == "1"


def test_the_component_also_applies_on_top_of_the_gpu_overlay(tmp_path):
    def here(path: str) -> str:   # kustomize takes relative paths only
        return os.path.relpath(DEPLOY / "k8s" / path, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [here("overlays/gpu")], "components": [here("components/tls")]}))
    out = subprocess.run([require("kubectl", "apt package kubectl"), "kustomize", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    container, dep = strata_containers(docs)["inference"]
    assert container["image"].split("/")[-1].startswith("strata-gpu:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "exec" in container["readinessProbe"]
    assert {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}["tls"]["secret"]["secretName"] == \
        "strata-inference-tls"


# ---- on real sockets

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(key, cert) -> tuple[bytes, bytes]:
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()), cert.public_bytes(serialization.Encoding.PEM))


def _certificate(subject: str, issuer: x509.Name, public_key, signing_key, ca: bool, names: list[str]):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        b = (b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False))
    return b.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> dict[str, Path]:
    """service -> a folder holding what its Secret holds, as deploy/README.md makes them: one CA, and per
    service a certificate for `<service>`, `<service>.strata.svc` and `<service>.strata.svc.cluster.local`
    with server and client use."""
    root = tmp_path_factory.mktemp("secrets")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("strata internal CA", _name("strata internal CA"), ca_key.public_key(), ca_key, True, [])
    out = {}
    for kind in SERVICES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(kind, ca_cert.subject, key.public_key(), ca_key, False,
                            [kind, f"{kind}.strata.svc", f"{kind}.strata.svc.cluster.local"])
        d = out[kind] = root / kind
        d.mkdir()
        key_pem, cert_pem = _pem(key, cert)
        (d / "tls.key").write_bytes(key_pem)
        (d / "tls.crt").write_bytes(cert_pem)
        (d / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return out


def parsed_at_start(kind: str, secret_dir: Path) -> argparse.Namespace:
    """`strata serve <the container's args>` parsed in the rendered environment, as the container does (the
    Secret's mount point mapped to `secret_dir`, the image's models file to deploy/models.toml, its source)."""
    from services.cli import build_parser

    docs = tls_docs()
    container, _ = strata_containers(docs)[kind]
    with pytest.MonkeyPatch.context() as m:
        for var, value in container_env(docs, container).items():
            m.setenv(var, value.replace(TLS_DIR, str(secret_dir)).replace("/opt/strata/models.toml",
                                                                           str(DEPLOY / "models.toml")))
        return build_parser().parse_args(["serve", *container["args"]])


@pytest.fixture(scope="module")
def servers_config(secrets):
    """service -> its TlsConfig as parsed from the rendered settings."""
    return {kind: tls_from_args(parsed_at_start(kind, secrets[kind])) for kind in SERVICES}


def test_the_gateway_starts_serving_tls_from_the_rendered_settings(secrets, monkeypatch):
    from services.gateway.main import config_from_args

    monkeypatch.setenv("STRATA_KEY_PEPPER", "pepper-for-the-tls-component-test")
    args = parsed_at_start("gateway", secrets["gateway"])
    assert args.plaintext is False
    tls = config_from_args(args).tls   # refuses a plaintext public port
    assert tls.serves_tls and tls.dials_tls and not tls.client_ca_file


def map_probe(args: list[str], kind: str, port: int, secrets: dict[str, Path]) -> list[str]:
    """A rendered probe command's arguments for this machine: the checkout's script, the test's port and files."""
    assert args[:2] == ["python", HEALTH_CHECK]
    return [a.replace(TLS_DIR, str(secrets[kind])).replace(f"127.0.0.1:{SERVICES[kind][0]}", f"127.0.0.1:{port}")
            for a in args[2:]]


async def serving(kind: str, tls: TlsConfig) -> GrpcServer:
    server = GrpcServer(lambda s: None, [SERVICES[kind][2]], "127.0.0.1", 0, tls=tls)
    await server.start()
    return server


@pytest.mark.parametrize("kind", list(SERVICES))
async def test_the_rendered_probes_pass_only_a_serving_server_and_a_plaintext_probe_never(kind, secrets,
                                                                                        servers_config):
    container, _ = strata_containers(tls_docs())[kind]
    server = await serving(kind, servers_config[kind])
    liveness, readiness = (map_probe(probe_args(container, p), kind, server.port, secrets)
                           for p in ("livenessProbe", "readinessProbe"))
    try:
        assert await run_health_check(*liveness) == 0
        assert await run_health_check(*readiness) == 0
        # what the kubelet's grpc probe would do
        assert await run_health_check(f"127.0.0.1:{server.port}", "--timeout-s", "1") == 1
        await server.health.set(SERVICES[kind][2], health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await run_health_check(*readiness) == 1
        assert await run_health_check(*liveness) == 0
    finally:
        await server.stop(0)


async def health_status(tls: TlsConfig, port: int) -> str:
    async with tls.channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.mark.parametrize(("caller", "callee", "address_var"), CALLS)
async def test_each_caller_reaches_the_service_behind_it_over_mutual_tls_and_a_stranger_does_not(
        caller, callee, address_var, secrets, servers_config):
    docs = tls_docs()
    dialer = servers_config[caller]
    if address_var is not None:   # dialed by Service name: verified for that name
        host, port = container_env(docs, strata_containers(docs)[caller][0])[address_var].split(":")
        assert (host, int(port)) == (callee, SERVICES[callee][0])
        assert not dialer.server_name
        verified = host
    else:
        verified = dialer.server_name
    server = await serving(callee, servers_config[callee])
    try:
        as_caller = TlsConfig(ca_file=dialer.ca_file, client_cert_file=dialer.client_cert_file,
                              client_key_file=dialer.client_key_file, server_name=verified)
        assert await health_status(as_caller, server.port) == "SERVING"
        no_certificate = TlsConfig(ca_file=dialer.ca_file, server_name=verified)
        assert await health_status(no_certificate, server.port) == "UNAVAILABLE"
        wrong_name = TlsConfig(ca_file=dialer.ca_file, client_cert_file=dialer.client_cert_file,
                               client_key_file=dialer.client_key_file, server_name=f"not-{callee}")
        assert await health_status(wrong_name, server.port) == "UNAVAILABLE"
    finally:
        await server.stop(0)
