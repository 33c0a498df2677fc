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

__all__ = ["cache_pb2", "cache_pb2_grpc", "common_pb2", "gateway_pb2", "gateway_pb2_grpc", "inference_pb2", "inference_pb2_grpc", "router_pb2",
           "router_pb2_grpc"]
