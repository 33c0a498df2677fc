"""The engine's configuration, written once.

Every engine setting is a field of one section (`ModelConfig`, `CacheConfig`, `SchedulerConfig`,
`SpeculativeConfig`, `DeviceConfig`) declared with `option(...)`: its name, default, help text and choices
live there and nowhere else. The `strata serve inference` / `strata generate` flags (`add_engine_args`) and
the `STRATA_*` environment variables that set their defaults are generated from those fields: the flag is
`--<name>` (or the option's `flag`), the variable `STRATA_<FLAG>` (`--kv-cache-gb` -> `STRATA_KV_CACHE_GB`).
`engine_config(**settings)` builds the nested `EngineConfig` from flat names, as tests and benchmarks do.

No torch here: the scheduler imports its section from this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
QUANTIZATIONS = ("int8", "gguf")      # the quantization passes (models/quantize.py)
SPECULATIVE_METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16            # the most proposals one verification run may carry
_NONE = "none"                         # how flags and variables say None for a choice
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A configuration field. `flag`: the command-line name when it is not --<field-name>; `choices`: the
    allowed values (for `str | None` fields, "none" on the command line means None)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass(slots=True, frozen=True)
class ModelConfig:
    model_path: str | None = option(None, "GGUF file (default: the packaged SmolLM2-135M-Instruct)")
    model_name: str | None = option(None, "the name clients ask for (default: the GGUF file's stem; "
                                          f"{DEFAULT_MODEL_NAME} for the packaged model)")
    dtype: str = option("auto", "auto = bfloat16 on CPUs with native bf16 (AMX/AVX512-BF16), else float32 "
                                "(float32 on a GPU); quantized models run float32", choices=DTYPE_CHOICES)
    quantization: str | None = option(
        "auto", "auto = gguf on CPU when the kernels multiply every projection's block type, else dense "
                "(float files, other block types, GPUs; an explicit --dtype bfloat16 also means dense); "
                "gguf = every product multiplies the file's own Q4_1/Q8_0 blocks, float32 activations; "
                "int8 = W8A8 with SmoothQuant (int8 matmuls, float32 activations); none = dense",
        choices=("auto", *QUANTIZATIONS))
    max_model_len: int | None = option(None, "prompt + output tokens of one request (default: the model's)")

    def __post_init__(self) -> None:
        _check_choice(self, "dtype", "quantization")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")


@dataclass(slots=True, frozen=True)
class CacheConfig:
    block_size: int = option(16, "tokens per KV block")
    num_kv_blocks: int | None = option(None, "blocks in the KV pool (default: from --kv-cache-gb)")
    kv_cache_memory_gb: float = option(1.0, "memory of the paged KV pool, in GiB", flag="--kv-cache-gb")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompts' shared prefixes",
                                         flag="--prefix-caching")

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be > 0")


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_num_seqs: int = option(64, "requests running at once")
    max_num_batched_tokens: int = option(2048, "tokens computed per step (decodes + prefill chunks)")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(slots=True, frozen=True)
class SpeculativeConfig:
    speculative: str | None = option(
        None, "speculative decoding, proposals verified in one forward (greedy output unchanged): ngram = "
              "prompt lookup in the request's own tokens; draft = a draft model's greedy tokens",
        choices=SPECULATIVE_METHODS)
    draft_model_path: str | None = option(None, "--speculative draft: a GGUF sharing the tokenizer (default: "
                                                "the served model's own file)")
    draft_quantization: str | None = option("gguf", "--speculative draft: the draft's precision (gguf: the "
                                                    "file's Q4_1/Q8_0 blocks)", choices=QUANTIZATIONS)
    num_speculative_tokens: int = option(4, "k, the most proposals per step (requests may lower it or turn it "
                                            "off)")
    spec_row_cost: float = option(
        0.25, "one extra verified row's cost relative to a 1-row decode step: with it and each request's "
              "acceptance rate the engine picks k per step, or none when proposals do not pay (measure it with "
              "python -m bench.spec_decode)")
    ngram_min: int = option(2, "shortest suffix the ngram proposer matches")
    ngram_max: int = option(4, "longest suffix the ngram proposer matches")
    spec_max_batch: int = option(4, "no proposals while more requests than this are decoding (verification "
                                    "stops paying)")

    def __post_init__(self) -> None:
        _check_choice(self, "speculative", "draft_quantization")
        if not 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}]")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        if self.spec_max_batch < 0:
            raise ValueError("spec_max_batch must be >= 0")
        if not 0 <= self.spec_row_cost <= 10:
            raise ValueError(f"spec_row_cost must be in [0, 10], got {self.spec_row_cost}")


@dataclass(slots=True, frozen=True)
class DeviceConfig:
    device: str = option("auto", "cpu, cuda, cuda:N, or auto = the GPU where torch sees one and the weights are "
                                 "dense (--quantization runs on CPU), else cpu")
    num_threads: int | None = option(None, "torch intra-op threads (default: torch's)", flag="--threads")

    def __post_init__(self) -> None:
        d = self.device
        if d not in ("auto", "cpu", "cuda") and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {d!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")


SECTIONS: dict[str, type] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                             "spec": SpeculativeConfig, "device": DeviceConfig}


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """One engine's settings, by section. Each section checks its own values when built."""
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    spec: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def with_settings(self, **settings: Any) -> "EngineConfig":
        """A copy with flat settings changed (`dtype="float32"`, `num_kv_blocks=64`, ...)."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in settings.items():
            changes.setdefault(_SECTION_OF.get(name) or _unknown(name), {})[name] = value
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **c) for s, c in changes.items()})


def engine_config(**settings: Any) -> EngineConfig:
    """An EngineConfig from flat setting names, each the field of one section (unset ones keep their
    defaults): `engine_config(dtype="float32", speculative="ngram")`."""
    return EngineConfig().with_settings(**settings)


# ---- flags and environment variables, generated from the sections

def _optional(cls: type, name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def _fields() -> list[tuple[str, dataclasses.Field, type]]:
    """(section, field, value type without None) for every setting, in declaration order."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
            out.append((section, f, kinds[0]))
    return out


_FIELDS = _fields()
_SECTION_OF = {f.name: section for section, f, _ in _FIELDS}
_OPTIONAL = {f.name for section, f, _ in _FIELDS if _optional(SECTIONS[section], f.name)}


def _unknown(name: str) -> str:
    raise TypeError(f"unknown engine setting {name!r}; settings: {', '.join(_SECTION_OF)}")


def _check_choice(section: Any, *names: str) -> None:
    """Each named field holds one of its choices (or None where its type allows it)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name in names and value is not None and value not in f.metadata["choices"]:
            none = "None or " if f.name in _OPTIONAL else ""
            raise ValueError(f"{f.name} must be {none}one of {', '.join(map(repr, f.metadata['choices']))}, "
                             f"got {value!r}")


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a setting: --<field-name> unless the option names another."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def env_name(f: dataclasses.Field) -> str:
    """The environment variable that sets a setting's default: STRATA_<FLAG>."""
    return "STRATA_" + flag_name(f)[2:].replace("-", "_").upper()


def _parse(text: str, kind: type, f: dataclasses.Field, where: str) -> Any:
    """A flag's or variable's text as the setting's value; ValueError naming `where` otherwise."""
    word, choices = text.strip(), f.metadata["choices"]
    if kind is bool:
        if word.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{where} must be one of {', '.join(_TRUE + _FALSE)}, got {text!r}")
        return word.lower() in _TRUE
    if choices:
        allowed = (*choices, _NONE) if f.name in _OPTIONAL else choices
        if word not in allowed:
            raise ValueError(f"{where} must be one of {', '.join(allowed)}, got {text!r}")
        return None if word == _NONE else word
    try:
        return kind(word)
    except ValueError:
        raise ValueError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _flag_type(kind: type, f: dataclasses.Field, flag: str):
    def parse(text: str) -> Any:
        try:
            return _parse(text, kind, f, flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = kind.__name__
    return parse


def _metavar(f: dataclasses.Field) -> str:
    choices = f.metadata["choices"]
    if not choices:
        return flag_name(f)[2:].replace("-", "_").upper()
    return "{" + ",".join((*choices, _NONE) if f.name in _OPTIONAL else choices) + "}"


def env_variables() -> list[str]:
    """Every STRATA_* variable the engine's settings read, in declaration order."""
    return [env_name(f) for _, f, _ in _FIELDS]


def env_setting(name: str) -> Any:
    """A setting's default: its STRATA_* variable when set (ValueError naming it when malformed), else the
    field's default."""
    _, f, kind = next(x for x in _FIELDS if x[1].name == name)
    text = os.environ.get(env_name(f), "")
    return _parse(text, kind, f, env_name(f)) if text.strip() else f.default


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every engine setting as a flag, one argument group per section. A flag's default is its STRATA_*
    variable when set (a malformed one stops the command with a message naming it), else the field's."""
    groups: dict[str, Any] = {}
    for section, f, kind in _FIELDS:
        if section not in groups:
            groups[section] = parser.add_argument_group(f"engine: {section}")
        flag, env = flag_name(f), env_name(f)
        try:
            default = env_setting(f.name)
        except ValueError as exc:
            parser.error(str(exc))
        help_text = f"{f.metadata['help']} (env {env})"
        if kind is bool:
            groups[section].add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                         help=help_text)
        else:
            groups[section].add_argument(flag, dest=f.name, default=default, type=_flag_type(kind, f, flag),
                                         metavar=_metavar(f), help=help_text)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig that add_engine_args' flags parsed into."""
    return engine_config(**{name: getattr(args, name) for name in _SECTION_OF})
