"""The models file: the models a suite serves, what they cost, who may use them, and how requests are
routed between them (TOML, or YAML, which JSON also is). `strata up --models-file`, the gateway's and the
router's `--models-file` read the same file; deploy/models.toml is the suite's default, annotated.

    [[models]]
    name = "SmolLM2-135M-Instruct"       # the name clients ask for (the replica's --model-name)
    file = "SmolLM2-135M-Instruct"       # an installed model (`strata models`: name or file stem) or a path
    replicas = 1
    quantization = "gguf"                 # "" = the replica's default
    usd_per_1k_prompt_tokens = 0.01
    usd_per_1k_completion_tokens = 0.02
    tiers = []                            # tiers allowed to use it; empty = every tier
    fallbacks = ["gemma-3-270m"]          # tried in order when none of its replicas can start an answer

    [tiers.free]
    priority_floor = 10                   # the soonest priority its requests may ask for (lower asks are raised)
    requests_per_minute = 60              # limits for its keys (a key's own non-zero limits win)
    shed_waiting = 4                      # refused while the model has this many requests queued per replica,
    shed_in_flight = 6                    # ... or this many in flight (running or queued) per replica,
    shed_pending_tokens = 0               # ... or this many pending tokens per replica (0 = never, each)

    default_tier = "standard"             # a key created without a tier

    [[auto]]                              # model "auto": the first rule that matches picks the model
    name = "code"
    model = "SmolLM2-135M-Instruct"
    has_code = true                       # also: min_prompt_chars, tiers, min_complexity

    [cascades.SmolLM2-135M-Instruct]      # its answers re-asked of `to` below a mean token log-probability
    to = "gemma-3-270m"
    min_mean_logprob = -1.5

    [splits.ab]                           # model "ab": a weighted draw, sticky per key or conversation if asked
    weights = { "SmolLM2-135M-Instruct" = 0.9, "gemma-3-270m" = 0.1 }
    sticky = "key"                        # none | key | conversation

    [embedding]                           # the Embed RPC and /v1/embeddings (the semantic cache's MiniLM)
    name = "all-MiniLM-L6-v2"
    usd_per_1k_tokens = 0.0
    tiers = []

Everything is checked when the file is read: unknown fields, unknown models or tiers named anywhere, bad
numbers, fallback cycles are allowed (the router tries each model once) but a model may not fall back to itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

STICKY = ("none", "key", "conversation")
DEFAULT_TIERS_TEXT = "free, standard, premium"


class ModelsFileError(ValueError):
    """The file cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    file: str = ""                        # "" = the installed default model
    replicas: int = 1
    quantization: str = ""
    usd_per_1k_prompt_tokens: float = 0.0
    usd_per_1k_completion_tokens: float = 0.0
    tiers: tuple[str, ...] = ()           # empty: every tier
    fallbacks: tuple[str, ...] = ()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.usd_per_1k_prompt_tokens
                + completion_tokens * self.usd_per_1k_completion_tokens) / 1000

    def allows(self, tier: str) -> bool:
        return not self.tiers or tier in self.tiers


@dataclass(frozen=True, slots=True)
class TierSpec:
    name: str
    priority_floor: int = 0               # requests asking for a lower (sooner) priority get this one
    requests_per_minute: int = 0          # 0: no limit (the key's own limits, where set, win)
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    concurrent_requests: int = 0
    shed_waiting: int = 0                 # refused while the model has this many requests queued per healthy
    shed_pending_tokens: int = 0          # replica, or this many tokens pending per replica, or this many
    shed_in_flight: int = 0               # requests in flight (running or queued) per replica (0 = never, each)

    def sheds(self, waiting: float, pending_tokens: float, in_flight: float = 0.0) -> bool:
        """Whether the tier is refused at this load (per healthy replica). In flight bounds the batch: on a
        CPU a step's time grows with each request in it, and every request arriving, whatever its priority,
        waits for the step in flight before its own (docs/architecture.md, "Tiers and shedding")."""
        return bool((self.shed_waiting and waiting >= self.shed_waiting)
                    or (self.shed_pending_tokens and pending_tokens >= self.shed_pending_tokens)
                    or (self.shed_in_flight and in_flight >= self.shed_in_flight))


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    """The embedding model (served by the semantic cache): its name for callers, price and tiers."""

    name: str = "all-MiniLM-L6-v2"       # services.embedding.MODEL_NAME (services.common imports no service)
    usd_per_1k_tokens: float = 0.0
    tiers: tuple[str, ...] = ()           # empty: every tier

    def allows(self, tier: str) -> bool:
        return not self.tiers or tier in self.tiers


@dataclass(frozen=True, slots=True)
class AutoRule:
    """Model "auto": a rule picks `model` when all its conditions hold."""

    model: str
    name: str = ""                        # shown in the answer's source ("auto:<name>") and the trace
    min_prompt_chars: int = 0
    has_code: bool | None = None          # None: either
    tiers: tuple[str, ...] = ()           # empty: any tier
    min_complexity: float = 0.0


@dataclass(frozen=True, slots=True)
class Cascade:
    to: str                               # the larger model to re-ask
    min_mean_logprob: float = -1.0        # answers below this are re-asked


@dataclass(frozen=True, slots=True)
class Split:
    weights: Mapping[str, float]
    sticky: str = "none"                  # none | key | conversation


# the suite's defaults when no file is given: three tiers, premium first under load
DEFAULT_TIERS: Mapping[str, TierSpec] = {
    "free": TierSpec("free", priority_floor=10, requests_per_minute=60, tokens_per_minute=20_000, shed_waiting=4,
                     shed_in_flight=6),
    "standard": TierSpec("standard", priority_floor=0, shed_waiting=32),
    "premium": TierSpec("premium", priority_floor=-10),
}


@dataclass(frozen=True, slots=True)
class ModelsFile:
    models: tuple[ModelSpec, ...]
    tiers: Mapping[str, TierSpec] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    default_tier: str = "standard"
    auto: tuple[AutoRule, ...] = ()
    auto_default: str = ""                # "" = the first model
    cascades: Mapping[str, Cascade] = field(default_factory=dict)
    splits: Mapping[str, Split] = field(default_factory=dict)
    embedding: EmbeddingSpec = EmbeddingSpec()

    def __post_init__(self) -> None:
        check(self)

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def to_dict(self) -> dict[str, Any]:
        """The file's own layout (what `load` reads back): `strata up` writes it for the services it starts."""
        def plain(obj) -> dict[str, Any]:
            out = {}
            for f in fields(obj):
                v = getattr(obj, f.name)
                if f.name != "name" or not isinstance(obj, TierSpec):
                    out[f.name] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
            return {k: v for k, v in out.items() if v is not None}
        return {"models": [plain(m) for m in self.models], "tiers": {n: plain(t) for n, t in self.tiers.items()},
                "default_tier": self.default_tier, "auto": [plain(r) for r in self.auto],
                "auto_default": self.auto_default, "cascades": {n: plain(c) for n, c in self.cascades.items()},
                "splits": {n: plain(s) for n, s in self.splits.items()}, "embedding": plain(self.embedding)}


def check(mf: ModelsFile) -> None:
    if not mf.models:
        raise ModelsFileError("the models file names no model ([[models]] with a name)")
    names = [m.name for m in mf.models]
    if len(set(names)) != len(names):
        raise ModelsFileError(f"a model is named twice: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
    reserved = {"auto", *mf.splits}
    for m in mf.models:
        if not m.name or m.name in reserved:
            raise ModelsFileError(f"model name {m.name!r} is empty or taken by 'auto' or a split")
        if m.replicas < 0:
            raise ModelsFileError(f"model {m.name!r}: replicas must be >= 0")
        for price in (m.usd_per_1k_prompt_tokens, m.usd_per_1k_completion_tokens):
            if not (math.isfinite(price) and price >= 0):
                raise ModelsFileError(f"model {m.name!r}: prices must be finite and >= 0")
        _known(f"model {m.name!r} tiers", m.tiers, mf.tiers)
        _known(f"model {m.name!r} fallbacks", m.fallbacks, names)
        if m.name in m.fallbacks:
            raise ModelsFileError(f"model {m.name!r} falls back to itself")
    if mf.default_tier not in mf.tiers:
        raise ModelsFileError(f"default_tier {mf.default_tier!r} is not a configured tier ({', '.join(mf.tiers)})")
    for t in mf.tiers.values():
        if min(t.requests_per_minute, t.tokens_per_minute, t.tokens_per_day, t.concurrent_requests,
               t.shed_waiting, t.shed_pending_tokens, t.shed_in_flight) < 0:
            raise ModelsFileError(f"tier {t.name!r}: limits and shedding thresholds must be >= 0 (0 = none)")
    for r in mf.auto:
        _known(f"auto rule {r.name or r.model!r}", (r.model,), names)
        _known(f"auto rule {r.name or r.model!r} tiers", r.tiers, mf.tiers)
    if mf.auto_default:
        _known("auto_default", (mf.auto_default,), names)
    for source, c in mf.cascades.items():
        _known("cascade", (source, c.to), names)
        if source == c.to:
            raise ModelsFileError(f"cascade {source!r} re-asks itself")
    for split_name, s in mf.splits.items():
        _known(f"split {split_name!r}", tuple(s.weights), names)
        if not s.weights or any(not math.isfinite(w) or w < 0 for w in s.weights.values()) or sum(s.weights.values()) <= 0:
            raise ModelsFileError(f"split {split_name!r} needs non-negative weights with a positive sum")
        if s.sticky not in STICKY:
            raise ModelsFileError(f"split {split_name!r}: sticky must be one of {', '.join(STICKY)}")
    e = mf.embedding
    if not e.name or e.name in reserved or e.name in names:
        raise ModelsFileError(f"embedding model name {e.name!r} is empty or taken by a model, 'auto' or a split")
    if not (math.isfinite(e.usd_per_1k_tokens) and e.usd_per_1k_tokens >= 0):
        raise ModelsFileError("embedding: usd_per_1k_tokens must be finite and >= 0")
    _known("embedding tiers", e.tiers, mf.tiers)


def _known(where: str, named, known) -> None:
    unknown = [n for n in named if n not in known]
    if unknown:
        raise ModelsFileError(f"{where}: unknown {', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def _build(cls, raw: Any, where: str, **extra):
    if not isinstance(raw, Mapping):
        raise ModelsFileError(f"{where}: expected a table, got {type(raw).__name__}")
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ModelsFileError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    kwargs = dict(extra)
    for k, v in raw.items():
        default = allowed[k].default
        try:
            if isinstance(default, tuple):
                v = (v,) if isinstance(v, str) else tuple(str(x) for x in v)
            elif isinstance(default, bool) or k == "has_code":
                if v is not None and not isinstance(v, bool):
                    raise TypeError("expected true or false")
            elif isinstance(default, int):
                if isinstance(v, bool) or int(v) != v:
                    raise TypeError("expected a whole number")
                v = int(v)
            elif isinstance(default, float):
                if isinstance(v, bool):
                    raise TypeError("expected a number")
                v = float(v)
            elif k == "weights":
                v = {str(m): float(w) for m, w in dict(v).items()}
            elif isinstance(default, str) or default is None:
                v = str(v)
        except (TypeError, ValueError) as exc:
            raise ModelsFileError(f"{where}.{k}: {exc}") from None
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ModelsFileError(f"{where}: {exc}") from None


def parse(raw: Mapping[str, Any]) -> ModelsFile:
    """A models file from its parsed TOML/YAML/JSON."""
    if not isinstance(raw, Mapping):
        raise ModelsFileError("the models file must be a table (mapping) at its top")
    unknown = sorted(set(raw) - {"models", "tiers", "default_tier", "auto", "auto_default", "cascades", "splits",
                                 "embedding"})
    if unknown:
        raise ModelsFileError(f"unknown top-level key(s): {', '.join(unknown)}")
    models = tuple(_build(ModelSpec, m, f"models[{i}]") for i, m in enumerate(raw.get("models") or ()))
    tiers = {str(n): _build(TierSpec, t or {}, f"tiers.{n}", name=str(n)) for n, t in (raw.get("tiers") or {}).items()} \
        if "tiers" in raw else dict(DEFAULT_TIERS)
    auto = tuple(_build(AutoRule, r, f"auto[{i}]") for i, r in enumerate(raw.get("auto") or ()))
    cascades = {str(n): _build(Cascade, c, f"cascades.{n}") for n, c in (raw.get("cascades") or {}).items()}
    splits = {str(n): _build(Split, s, f"splits.{n}") for n, s in (raw.get("splits") or {}).items()}
    embedding = _build(EmbeddingSpec, raw.get("embedding") or {}, "embedding")
    return ModelsFile(models, tiers, str(raw.get("default_tier", "standard")), auto, str(raw.get("auto_default", "")),
                      cascades, splits, embedding)


def load(path: str | Path) -> ModelsFile:
    """Read a models file: `.toml` as TOML, anything else as YAML (JSON is YAML too)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelsFileError(f"cannot read the models file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            import tomllib
            raw = tomllib.loads(text)
        else:
            import yaml
            raw = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - tomllib / yaml syntax errors, reported with the file's name
        raise ModelsFileError(f"{path}: {type(exc).__name__}: {exc}") from None
    try:
        return parse(raw)
    except ModelsFileError as exc:
        raise ModelsFileError(f"{path}: {exc}") from None


def dump(mf: ModelsFile, path: str | Path) -> None:
    """Written as JSON (which YAML reads): `load` reads it back whatever the suffix but .toml."""
    Path(path).write_text(json.dumps(mf.to_dict(), indent=2) + "\n", encoding="utf-8")
