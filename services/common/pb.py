"""The one import point for generated protobuf/gRPC stubs."""

from __future__ import annotations

try:
    from services.common.stubs.strata.v1 import common_pb2, inference_pb2, inference_pb2_grpc
except ImportError as exc:  # pragma: no cover - only on a checkout that skipped `make protos`
    raise ImportError("gRPC stubs are missing: run `make protos` (or `make install`)") from exc

__all__ = ["common_pb2", "inference_pb2", "inference_pb2_grpc"]
