"""deploy/, checked offline: docker-compose renders the compose file, kustomize renders the overlays,
the rendered objects pass the Kubernetes JSON schemas (strict: an unknown field is an error), the
wiring agrees with itself (ports, addresses, probes, selectors), and every environment variable the
manifests set is one that services/ reads. The TLS component's own checks: test_tls_component.py."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yaml"
# the plaintext overlays (native gRPC probes), and overlays/cpu-tls: overlays/cpu with components/tls;
# overlays/cpu-sentinel: overlays/cpu with components/redis-sentinel
PLAIN_OVERLAYS = ("cpu", "gpu", "cpu-sentinel")
OVERLAYS = (*PLAIN_OVERLAYS, "cpu-tls")
SENTINEL_URL = "redis+sentinel://redis-sentinel:26379/strata/0"
# gRPC probes are GA from 1.27; "latest" is the newest schema kubernetes-validate bundles
K8S_VERSIONS = ("1.27.0", "latest")
# service -> (gRPC port, metrics port, health service name)
SERVICES = {
    "gateway": (50051, 9051, "strata.v1.Gateway"),
    "inference": (50061, 9061, "strata.v1.Inference"),
    "cache": (50071, 9071, "strata.v1.SemanticCache"),
    "router": (50081, 9081, "strata.v1.Router"),
}
SECRETS = ("STRATA_KEY_PEPPER", "STRATA_ADMIN_TOKEN")


# ---- tools

def require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: `make install` installs it ({package})")
    return path


def compose_command() -> list[str]:
    """docker-compose (Debian's package), else the docker CLI's compose plugin where it has one."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [require("docker-compose", "apt-get install -y docker-compose")]


def run_compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # an explicit, empty env file: a developer's deploy/.env must not decide the outcome
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    return subprocess.run([*compose_command(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
                          capture_output=True, text=True, env={**clean, **env}, cwd=ROOT)


@functools.cache
def compose_config() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = run_compose_config(Path(tmp), {"STRATA_KEY_PEPPER": "test-pepper-0123456789",
                                             "STRATA_ADMIN_TOKEN": "test-admin-token"})
    assert out.returncode == 0, f"compose config failed:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    kubectl = require("kubectl", "apt package kubectl, 1.27 or newer: kustomize is built in")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def kubernetes_validate():
    try:
        import kubernetes_validate as kv
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: `make install` installs it (pip: kubernetes-validate)")
    return kv


# ---- what the manifests set

def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def strata_containers(docs) -> dict[str, tuple[dict, dict]]:
    """service name -> (its container, its Deployment) for the containers running the Strata image."""
    out = {}
    for dep in by_kind(docs, "Deployment").values():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if c["image"].split("/")[-1].startswith("strata"):
                out[c["args"][0]] = (c, dep)
    return out


def container_env(docs, container: dict) -> dict[str, str]:
    """The variables a container gets: envFrom ConfigMaps and Secrets (keys), then env (values as written).
    A fieldRef variable used only to build another value through $(NAME) is Kubernetes plumbing, not a
    setting of the service, and is left out."""
    config_maps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(config_maps[src["configMapRef"]["name"]].get("data", {}))
        else:
            env.update({k: "<secret>" for k in secrets[src["secretRef"]["name"]].get("data", {})})
    explicit = container.get("env", [])
    values = " ".join(str(e.get("value", "")) for e in explicit)
    for e in explicit:
        if "valueFrom" in e and "fieldRef" in e["valueFrom"] and f"$({e['name']})" in values:
            continue
        env[e["name"]] = str(e.get("value", "<from a reference>"))
    return env


def compose_strata_services() -> dict[str, dict]:
    return {name: svc for name, svc in compose_config()["services"].items()
            if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}


def compose_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):   # some compose versions print KEY=VALUE lists
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


@functools.cache
def names_read_by_services() -> tuple[frozenset[str], tuple[re.Pattern, ...]]:
    """Upper-case names in services/ code, the engine's variables (generated from its settings by
    services/inference/config.py), and the names it builds at run time as patterns
    (f"STRATA_{service}_METRICS_PORT" reads STRATA_GATEWAY_METRICS_PORT and its siblings)."""
    from services.inference.config import env_variables

    text = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py") if "stubs" not in p.parts)
    names = frozenset(re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", text)) | frozenset(env_variables())
    templates = re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*(?:\{[a-z_][a-z0-9_]*\}[A-Z0-9_]*)+", text)
    patterns = tuple(re.compile("[A-Z0-9]+".join(map(re.escape, re.split(r"\{[a-z0-9_]+\}", t))))
                     for t in templates)
    return names, patterns


def read_by_services(var: str) -> bool:
    names, patterns = names_read_by_services()
    return var in names or any(p.fullmatch(var) for p in patterns)


# ---- docker-compose

def test_compose_config_renders_the_suite():
    services = compose_config()["services"]
    assert {"gateway", "router", "cache", "inference-1", "inference-2", "redis", "otel-collector",
            "jaeger"} <= set(services)


def test_compose_refuses_to_start_without_the_gateway_secrets(tmp_path):
    out = run_compose_config(tmp_path, {})
    assert out.returncode != 0
    assert "STRATA_KEY_PEPPER" in out.stderr or "STRATA_ADMIN_TOKEN" in out.stderr, out.stderr


def test_compose_services_bind_all_interfaces_export_traces_and_serve_metrics():
    for name, svc in compose_strata_services().items():
        kind = svc["command"][0]
        env, (port, metrics_port, _) = compose_env(svc), SERVICES[kind]
        prefix = f"STRATA_{kind.upper()}"
        assert env[f"{prefix}_HOST"] == "0.0.0.0", name
        assert env[f"{prefix}_PORT"] == str(port), name
        assert env[f"{prefix}_METRICS_PORT"] == str(metrics_port), name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317", name
        assert svc["read_only"] is True and svc["user"] == "10001:10001", name
        assert "/tmp" in svc["tmpfs"], name


def test_compose_addresses_point_at_services_and_their_ports():
    services, strata = compose_config()["services"], compose_strata_services()

    def grpc_port_of(host: str) -> str:
        kind = strata[host]["command"][0]
        return compose_env(strata[host])[f"STRATA_{kind.upper()}_PORT"]

    router_env, gateway_env = compose_env(strata["router"]), compose_env(strata["gateway"])
    backends = router_env["STRATA_ROUTER_BACKENDS"].split(",")
    assert backends == ["inference-1:50061", "inference-2:50061", "inference-gemma:50061"]
    for address in [*backends, gateway_env["STRATA_ROUTER_ADDRESS"], gateway_env["STRATA_CACHE_ADDRESS"]]:
        host, port = address.split(":")
        assert port == grpc_port_of(host), address
    for name in ("gateway", "cache"):
        assert compose_env(strata[name])["REDIS_URL"].startswith("redis://redis:6379/"), name
    assert "redis" in services


def test_otel_collector_forwards_otlp_to_jaeger():
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    for section in ("receivers", "processors", "exporters"):
        assert set(pipeline[section]) <= set(config[section]), section
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    (exporter,) = pipeline["exporters"]
    assert config["exporters"][exporter]["endpoint"] == "jaeger:4317"
    assert compose_config()["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


# ---- Kubernetes

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_the_kubernetes_schemas(overlay, version):
    kv = kubernetes_validate()
    version = kv.latest_version() if version == "latest" else version
    errors = []
    for doc in render(overlay):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_each_service_with_its_account_probes_and_ports(overlay):
    docs = render(overlay)
    containers, services = strata_containers(docs), by_kind(docs, "Service")
    assert set(containers) == set(SERVICES)
    accounts = by_kind(docs, "ServiceAccount")
    for kind, (container, dep) in containers.items():
        port, metrics_port, _ = SERVICES[kind]
        env, pod = container_env(docs, container), dep["spec"]["template"]
        prefix = f"STRATA_{kind.upper()}"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        http = {"http": 8000} if kind == "gateway" else {}              # the OpenAI-compatible HTTP API
        assert ports == {"grpc": port, "metrics": metrics_port, **http}, kind
        if http:
            assert env["STRATA_GATEWAY_HTTP_PORT"] == "8000"
        assert (env[f"{prefix}_HOST"], env[f"{prefix}_PORT"], env[f"{prefix}_METRICS_PORT"]) == \
            ("0.0.0.0", str(port), str(metrics_port)), kind
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port), kind
        assert pod["spec"]["serviceAccountName"] in accounts, kind
        svc = services[kind]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), kind
        assert {p["port"] for p in svc["spec"]["ports"]} == {port, metrics_port, *http.values()}, kind


@pytest.mark.parametrize("overlay", PLAIN_OVERLAYS)
def test_plain_overlays_probe_natively_over_grpc_and_serve_the_gateway_port_plaintext(overlay):
    docs = render(overlay)
    for kind, (container, dep) in strata_containers(docs).items():
        port, _, health_name = SERVICES[kind]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == port, (kind, probe)
        assert container["readinessProbe"]["grpc"]["service"] == health_name, kind
        env = container_env(docs, container)
        assert not [var for var in env if var.startswith("STRATA_TLS_")], kind
        assert not [v for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v], kind
        # TLS terminates in front of the gateway Service
        assert env.get("STRATA_GATEWAY_PLAINTEXT") == ("1" if kind == "gateway" else None), kind


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_non_root_read_only_and_bounded(overlay):
    for dep in by_kind(render(overlay), "Deployment").values():
        spec = dep["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, dep["metadata"]["name"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            where = f"{dep['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"]), where
            for m in c.get("volumeMounts", []):   # scratch space, or a Secret it cannot write
                volume = volumes[m["name"]]
                assert "emptyDir" in volume or ("secret" in volume and m["readOnly"] is True), where
            if c["image"].split("/")[-1].startswith("strata"):
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_and_disruption_budgets_target_existing_workloads(overlay):
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"gateway", "router", "inference", "inference-gemma"}
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]["name"]
        assert target in deployments and "replicas" not in deployments[target]["spec"], target
    workloads = [*deployments.values(), *by_kind(docs, "StatefulSet").values()]
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in workloads]
    for pdb in by_kind(docs, "PodDisruptionBudget").values():
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), pdb["metadata"]["name"]


ADAPTER_RULES = DEPLOY / "k8s" / "prometheus-adapter" / "rules.yaml"
TOKEN_METRICS = {"strata_generation_tokens_per_second", "strata_pending_tokens", "strata_kv_cache_usage"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_scales_on_token_metrics_the_adapter_serves_and_the_rest_on_cpu(overlay):
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    served = {r["name"]["as"] for r in rules["custom"]}
    assert rules["default"] is False and served == TOKEN_METRICS
    for name, hpa in by_kind(render(overlay), "HorizontalPodAutoscaler").items():
        metrics = hpa["spec"]["metrics"]
        if name.startswith("inference"):
            assert {m["type"] for m in metrics} == {"Pods"}, name
            assert {m["pods"]["metric"]["name"] for m in metrics} == TOKEN_METRICS, name
            assert all(m["pods"]["target"]["type"] == "AverageValue" for m in metrics), name
        else:
            assert [(m["type"], m["resource"]["name"]) for m in metrics] == [("Resource", "cpu")], name
    for rule in rules["custom"]:
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"]), rule["name"]
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"]).group(0)
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series), rule["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_the_request_path(overlay):
    policies = by_kind(render(overlay), "NetworkPolicy")
    deny = policies.pop("default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def sources(target: str) -> set[str] | None:
        """Pod names allowed into `target`'s grpc/redis port; None = from anywhere."""
        allowed: set[str] = set()
        for p in policies.values():
            sel = p["spec"]["podSelector"].get("matchLabels", {})
            if sel.get("app.kubernetes.io/name") != target:
                continue
            for rule in p["spec"]["ingress"]:
                if "from" not in rule:
                    return None
                for peer in rule["from"]:
                    ps = peer["podSelector"]
                    allowed |= set(ps.get("matchLabels", {}).values())
                    for expr in ps.get("matchExpressions", []):
                        allowed |= set(expr["values"])
        return allowed

    assert sources("gateway") is None
    assert sources("cache") == sources("router") == {"gateway"}
    assert sources("inference") == {"router"}
    # Redis under Sentinel: its pods also reach each other (replication, the sentinels)
    assert sources("redis") == {"gateway", "cache", "router", "inference"} | ({"redis"} if "sentinel" in overlay else set())
    metrics = policies["metrics-from-prometheus"]["spec"]["ingress"]
    assert [p["port"] for rule in metrics for p in rule["ports"]] == ["metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_model_has_its_own_inference_deployment_and_service(overlay):
    """SmolLM2 (the image's default model) and Gemma 3 270M (STRATA_MODEL_PATH / STRATA_MODEL_NAME from
    ConfigMap strata-inference-gemma): selectors apart, so neither Deployment adopts the other's pods, and
    every inference pod patched alike by the overlay (image, probes, resources)."""
    docs = render(overlay)
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    smol, gemma = deployments["inference"], deployments["inference-gemma"]
    assert smol["spec"]["selector"]["matchLabels"]["strata.dev/model"] != gemma["spec"]["selector"]["matchLabels"]["strata.dev/model"]
    env = container_env(docs, gemma["spec"]["template"]["spec"]["containers"][0])
    assert (env["STRATA_MODEL_PATH"], env["STRATA_MODEL_NAME"]) == ("/opt/strata/models/gemma-3-270m-q4_k_m.gguf", "gemma-3-270m")
    assert "STRATA_MODEL_PATH" not in container_env(docs, smol["spec"]["template"]["spec"]["containers"][0])
    assert services["inference-gemma"]["spec"]["selector"].items() <= gemma["spec"]["template"]["metadata"]["labels"].items()
    strip = lambda d: {k: v for k, v in d["spec"]["template"]["spec"]["containers"][0].items() if k not in ("envFrom",)}  # noqa: E731
    assert strip(smol) == strip(gemma)


def test_the_sentinel_overlay_runs_three_redis_pods_with_sentinels_and_every_client_asks_them():
    from services.common.redis_client import parse_sentinel

    docs = render("cpu-sentinel")
    assert "redis" not in by_kind(docs, "Deployment")
    sts = by_kind(docs, "StatefulSet")["redis"]
    spec = sts["spec"]["template"]["spec"]
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "redis-headless"
    assert [c["name"] for c in spec["containers"]] == ["redis", "sentinel"]
    for c in spec["containers"]:             # as every other pod: non-root, read-only, bounded
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"]), c["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    scripts = by_kind(docs, "ConfigMap")["redis-sentinel-scripts"]["data"]
    assert "sentinel monitor strata $MASTER 6379 2" in scripts["sentinel.sh"]
    assert "--appendonly yes" in scripts["redis.sh"] and "--replicaof" in scripts["redis.sh"]
    services = by_kind(docs, "Service")
    assert "redis" not in services
    assert services["redis-headless"]["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in services["redis-sentinel"]["spec"]["ports"]] == [26379]
    assert by_kind(docs, "PodDisruptionBudget")["redis"]["spec"]["minAvailable"] == 2
    # every Redis client of the suite names the sentinels, and the URL is one the services read
    urls = {}
    for kind, (container, _) in strata_containers(docs).items():
        env = container_env(docs, container)
        urls.update({(kind, k): v for k, v in env.items() if k in ("REDIS_URL", "STRATA_REGISTRY_URL")})
    assert set(urls) == {("gateway", "REDIS_URL"), ("cache", "REDIS_URL"), ("router", "STRATA_REGISTRY_URL"),
                         ("inference", "STRATA_REGISTRY_URL")}
    assert set(urls.values()) == {SENTINEL_URL}
    assert parse_sentinel(SENTINEL_URL) == ([("redis-sentinel", 26379)], "strata", 0)
    clients = by_kind(docs, "NetworkPolicy")["redis-from-strata"]["spec"]["ingress"][0]["ports"]
    assert {p["port"] for p in clients} == {"redis", "sentinel"}


def test_compose_runs_redis_under_sentinel_with_the_override_file(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("STRATA_KEY_PEPPER=test-pepper-0123456789\nSTRATA_ADMIN_TOKEN=admin\n")
    out = subprocess.run([*compose_command(), "-f", str(COMPOSE_FILE), "-f", str(DEPLOY / "docker-compose.sentinel.yaml"),
                          "--env-file", str(env_file), "config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(services)
    url = "redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/strata/0"
    for name in ("gateway", "cache"):
        assert compose_env(services[name])["REDIS_URL"] == url, name
    assert "--replicaof" in services["redis-replica"]["command"]
    for i in (1, 2, 3):
        script = " ".join(services[f"sentinel-{i}"]["command"])
        assert "sentinel monitor strata redis 6379 2" in script and "--sentinel" in script


def test_compose_serves_gemma_beside_smollm2_and_gives_the_models_file_to_router_and_gateway():
    strata = compose_strata_services()
    gemma = compose_env(strata["inference-gemma"])
    assert (gemma["STRATA_MODEL_PATH"], gemma["STRATA_MODEL_NAME"]) == ("/opt/strata/models/gemma-3-270m-q4_k_m.gguf",
                                                                     "gemma-3-270m")
    assert compose_env(strata["router"])["STRATA_MODELS_FILE"] == compose_env(strata["gateway"])["STRATA_MODELS_FILE"] \
        == "/opt/strata/models.toml"
    assert "COPY deploy/models.toml /opt/strata/models.toml" in (DEPLOY / "Dockerfile").read_text()


def test_gpu_overlay_puts_inference_on_a_gpu_node_with_the_cuda_image():
    docs = render("gpu")
    container, dep = strata_containers(docs)["inference"]
    spec = dep["spec"]["template"]["spec"]
    assert container["image"].split("/")[-1].startswith("strata-gpu:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    others = [c for kind, (c, _) in strata_containers(docs).items() if kind != "inference"]
    assert all("strata-gpu" not in c["image"] and "nvidia.com/gpu" not in c["resources"]["limits"] for c in others)


def test_secret_placeholders_are_refused_by_the_gateway():
    """The committed pepper placeholder is shorter than the 16 characters the gateway demands, so a
    deployment that forgot to replace it stops at start instead of hashing keys with a public value."""
    values = dict(line.split("=", 1) for line in (DEPLOY / "k8s/base/config/gateway-secrets.env").read_text()
                  .splitlines() if line and not line.startswith("#"))
    assert set(values) == set(SECRETS)
    assert len(values["STRATA_KEY_PEPPER"]) < 16
    assert values["STRATA_ADMIN_TOKEN"] == ""   # empty: every admin call is refused


# ---- the variables are ones the services read

def test_every_environment_variable_set_is_read_by_services():
    unread: dict[str, set[str]] = {}
    for name, svc in compose_strata_services().items():
        for var in compose_env(svc):
            if not read_by_services(var):
                unread.setdefault(var, set()).add(f"compose:{name}")
    for overlay in OVERLAYS:
        docs = render(overlay)
        for kind, (container, _) in strata_containers(docs).items():
            for var in container_env(docs, container):
                if not read_by_services(var):
                    unread.setdefault(var, set()).add(f"k8s/{overlay}:{kind}")
    assert not unread, "set in deploy/ but read nowhere in services/:\n" + "\n".join(
        f"  {var}: {', '.join(sorted(where))}" for var, where in sorted(unread.items()))


# ---- the compose health check

async def run_health_check(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(DEPLOY / "grpc_health_check.py"), *args,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await proc.wait()


async def test_health_check_script_passes_only_a_serving_server_and_service():
    from services.common.server import GrpcServer

    server = GrpcServer(lambda s: None, ["strata.v1.Test"], "127.0.0.1", 0)
    port = await server.start()
    try:
        assert await run_health_check(f"127.0.0.1:{port}") == 0
        assert await run_health_check(f"127.0.0.1:{port}", "strata.v1.Test") == 0
        assert await run_health_check(f"127.0.0.1:{port}", "strata.v1.Unknown") == 1
    finally:
        await server.stop(0)
    assert await run_health_check(f"127.0.0.1:{port}", "--timeout-s", "0.5") == 1
