"""The import rules docs/architecture.md states (its "Invariants"), checked on the import graph of services/,
kernels/, tools/ and bench/: every file read with ast, imports inside functions included. A failure names the
offending edges; either the edge goes, or the document and this test change together."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "kernels", "tools", "bench")
EXTENSIONS = ("kernels._C", "kernels._cuda")          # compiled modules: leaves of the graph


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python module of Strata (generated stubs left out)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "stubs" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


@cache
def imports(module: str) -> frozenset[str]:
    """What `module` imports (anywhere in the file): Strata modules by their dotted name, others by theirs.
    `from a.b import c` names `a.b.c` when that is a module, else `a.b`."""
    known = set(modules()) | set(EXTENSIONS)
    out = set()
    for node in ast.walk(ast.parse(modules()[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                out.add(name if name in known else node.module)
    return frozenset(out)


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def edges(source: tuple[str, ...], target: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    """Imports from modules under `source` of modules under `target`, except from modules under `allowed`."""
    return sorted(f"{m} -> {i}" for m in modules() if under(m, *source) and not under(m, *allowed)
                  for i in imports(m) if under(i, *target))


def closure(module: str) -> set[str]:
    """Every module `module` imports, directly or through other Strata modules (and the packages whose
    __init__ Python runs on the way)."""
    reached, visited, todo = set(), set(), [module]
    while todo:
        m = todo.pop()
        if m in visited:
            continue
        visited.add(m)
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        reached.update(imports(m), parents)
        todo.extend(x for x in (*imports(m), *parents) if x in modules())
    return reached


def test_the_graph_is_read():
    assert {"services.inference.engine.scheduler", "kernels.attention", "services.gateway.service",
            "tools.cache_eval", "bench.kernels"} <= set(modules())
    assert "torch" in imports("kernels.attention") and "kernels.reference" in imports("kernels.attention")


def test_kernels_is_a_leaf():
    assert edges(("kernels",), ("services", "tools", "bench", "tests")) == []


def test_no_import_cycles():
    """Tarjan's strongly connected components over Strata's modules; a package's __init__ re-exporting its
    submodules (which import the package's other submodules by `from pkg import x`) is no cycle."""
    graph = {m: {i for i in imports(m) if i in modules() and not m.startswith(i + ".")} for m in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def foreign(package: str, may: tuple[str, ...]) -> list[str]:
    """Imports, from modules under `package`, of Strata's services modules outside it and outside `may`."""
    return sorted(f"{m} -> {i}" for m in modules() if under(m, package)
                  for i in imports(m) if under(i, "services") and not under(i, package, *may))


@pytest.mark.parametrize("package,may", [
    ("services.common", ()),
    ("services.embedding", ("services.common",)),
    ("services.client", ("services.common",)),
    ("services.gateway", ("services.common", "services.embedding")),
    ("services.cache", ("services.common", "services.embedding")),
    ("services.router", ("services.common",)),
    ("services.inference", ("services.common",)),
])
def test_services_import_only_what_they_may(package, may):
    assert foreign(package, may) == []


def test_only_the_cache_and_inference_use_the_kernels():
    assert edges(("services",), ("kernels",), allowed=("services.cache", "services.inference")) == []


def test_services_import_no_tool_and_no_benchmark():
    assert edges(("services",), ("tools", "bench")) == ["services.cli -> tools.cache_eval"]


def test_inference_layers():
    assert [i for i in imports("services.inference.config") if under(i, "services", "kernels")] == []
    layers = ("services.inference.engine", "services.inference.models")
    assert edges(("services.inference.sampling", "services.inference.spec_decode"), layers) == []
    assert edges(("services.inference.models",), ("services.inference.engine",)) == []


def test_the_scheduler_never_imports_torch():
    reached = closure("services.inference.engine.scheduler")
    assert "services.inference.engine.request" in reached and "services.inference.spec_decode.policy" in reached
    assert not [m for m in reached if under(m, "torch", "kernels", "services.inference.models")]


# the gRPC edges: what may see protobuf stubs or grpc
GRPC_EDGES = (
    "services.common.server", "services.common.grpc_errors", "services.common.telemetry", "services.common.tls",
    "services.common.pb", "services.common.protogen", "services.client", "services.console", "services.up",
    "services.gateway.servicer", "services.gateway.main", "services.gateway.clients", "services.gateway.translate",
    "services.gateway.jobs.codecs",  # a job item as SubmitJob stored it (a GatewayRequest) and its JobResult
    "services.cache.servicer", "services.cache.main",
    "services.inference.servicer", "services.inference.main",
    "services.router.servicer", "services.router.main", "services.router.backends",
    "services.router.service",      # the router's proxy logic (docs/architecture.md, section 8)
)


def test_only_the_grpc_edges_see_protobuf_or_grpc():
    assert edges(("services",), ("grpc", "grpc_health", "google.protobuf", "services.common.pb"),
                 allowed=GRPC_EDGES) == []


def test_the_pipelines_and_engines_see_no_protobuf():
    pure = ("services.gateway.service", "services.gateway.stages", "services.gateway.types",
            "services.gateway.backends", "services.cache.service", "services.inference.engine",
            "services.inference.models", "services.inference.sampling", "services.inference.spec_decode")
    assert edges(pure, ("grpc", "services.common.pb", "services.common.grpc_errors")) == []


def test_retry_after_is_written_and_read_in_one_module():
    written = [m for m, path in modules().items() if '"retry-after"' in path.read_text(encoding="utf-8")]
    assert written == ["services.common.retry_after"]
