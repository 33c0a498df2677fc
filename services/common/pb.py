"""The one import point for generated protobuf/gRPC stubs."""

from __future__ import annotations

try:
    from services.common.stubs.strata.v1 import (
        cache_pb2,
        cache_pb2_grpc,
        common_pb2,
        gateway_pb2,
        gateway_pb2_grpc,
        inference_pb2,
        inference_pb2_grpc,
        router_pb2,
        router_pb2_grpc,
    )
except ImportError as exc:  # pragma: no cover - only on a checkout that skipped `make protos`
    raise ImportError("gRPC stubs are missing or stale: run `make protos` (or `make install`)") from exc

# The names both gRPC edges use for common.proto's enums (the inference servicer and the gateway's translation)
FORMAT_KINDS = {common_pb2.ResponseFormat.TYPE_JSON_OBJECT: "json_object",
                common_pb2.ResponseFormat.TYPE_JSON_SCHEMA: "json_schema",
                common_pb2.ResponseFormat.TYPE_REGEX: "regex", common_pb2.ResponseFormat.TYPE_GRAMMAR: "grammar"}
TOOL_CHOICES = {common_pb2.ToolChoice.MODE_AUTO: "auto", common_pb2.ToolChoice.MODE_NONE: "none",
                common_pb2.ToolChoice.MODE_REQUIRED: "required", common_pb2.ToolChoice.MODE_FUNCTION: "function"}

__all__ = ["FORMAT_KINDS", "TOOL_CHOICES", "cache_pb2", "cache_pb2_grpc", "common_pb2", "gateway_pb2", "gateway_pb2_grpc", "inference_pb2", "inference_pb2_grpc", "router_pb2",
           "router_pb2_grpc"]
