"""GrpcServer's tolerant request deserializers: bytes that do not parse are INVALID_ARGUMENT (gRPC alone
answers UNKNOWN "Unexpected DecodeError"), through the registered handlers and the generic ones alike."""

from __future__ import annotations

import grpc
import pytest

from services.common.grpc_errors import map_errors
from services.common.pb import cache_pb2, cache_pb2_grpc
from services.common.server import GrpcServer

pytestmark = pytest.mark.asyncio(loop_scope="session")
NOT_UTF8 = cache_pb2.StatsRequest(namespace="ab").SerializeToString().replace(b"ab", b"\xff\xfe")


class Stats(cache_pb2_grpc.SemanticCacheServicer):
    @map_errors
    async def Stats(self, request: cache_pb2.StatsRequest, context) -> cache_pb2.CacheStats:
        return cache_pb2.CacheStats(decision=request.namespace)


def generic_only(server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(Stats().Stats, request_deserializer=cache_pb2.StatsRequest.FromString,
                                                  response_serializer=cache_pb2.CacheStats.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("strata.v1.SemanticCache",
                                                                          {"Stats": handler}),))


@pytest.mark.parametrize("register", [lambda s: cache_pb2_grpc.add_SemanticCacheServicer_to_server(Stats(), s),
                                      generic_only], ids=["registered", "generic"])
async def test_a_request_that_does_not_parse_is_invalid_argument_and_the_rest_is_served(register):
    server = GrpcServer(register, ["strata.v1.SemanticCache"])
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stats = channel.unary_unary("/strata.v1.SemanticCache/Stats", response_deserializer=cache_pb2.CacheStats.FromString)
        for data in (NOT_UTF8, b"\xff\xff"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stats(data, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "StatsRequest" in err.value.details()
        assert (await stats(cache_pb2.StatsRequest(namespace="ok").SerializeToString(), timeout=5)).decision == "ok"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/strata.v1.SemanticCache/Nope")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    await server.stop(0)
