"""gRPC face of the gateway: credentials from metadata, protobuf in and out."""

from __future__ import annotations

import hmac

import grpc

from services.common.errors import UnauthenticatedError
from services.common.grpc_errors import map_errors
from services.common.pb import gateway_pb2, gateway_pb2_grpc
from services.gateway.limits import Limits
from services.gateway.service import Gateway


def bearer(context: grpc.aio.ServicerContext) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            return v[7:].strip() if v[:7].lower() == "bearer " else ""
    return ""


def client_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:10.0.0.7", "ipv6:[::1]"): what failed API key
    attempts are counted by."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    SERVICE = "strata.v1.Gateway"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.tracer = gateway.tracer

    @map_errors
    async def Generate(self, request, context: grpc.aio.ServicerContext):
        return await self.gateway.generate(request, bearer(context), context.time_remaining(), client_address(context))

    @map_errors
    async def GenerateStream(self, request, context: grpc.aio.ServicerContext):
        async for chunk in self.gateway.stream(request, bearer(context), context.time_remaining(),
                                               client_address(context)):
            yield chunk


class GatewayAdminServicer(gateway_pb2_grpc.GatewayAdminServicer):
    SERVICE = "strata.v1.GatewayAdmin"

    def __init__(self, gateway: Gateway, admin_token: str) -> None:
        self.gateway = gateway
        self.tracer = gateway.tracer
        self._admin = admin_token.encode()

    def _check(self, context: grpc.aio.ServicerContext) -> None:
        token = bearer(context).encode()
        if not self._admin or not hmac.compare_digest(token, self._admin):
            raise UnauthenticatedError("the admin credential is missing or wrong")

    @map_errors
    async def CreateKey(self, request, context: grpc.aio.ServicerContext):
        self._check(context)
        lim = request.limits
        key, record = await self.gateway.create_key(
            request.tenant, list(request.models),
            Limits(lim.requests_per_minute, lim.tokens_per_minute, lim.tokens_per_day, lim.concurrent_requests),
            request.budget_usd, request.tier)
        return gateway_pb2.CreateKeyResponse(key=key, key_id=record.key_id)

    @map_errors
    async def RevokeKey(self, request, context: grpc.aio.ServicerContext):
        self._check(context)
        await self.gateway.revoke_key(request.key_id)
        return gateway_pb2.RevokeKeyResponse()

    @map_errors
    async def GetUsage(self, request, context: grpc.aio.ServicerContext):
        self._check(context)
        day, u, total = await self.gateway.get_usage(request.key_id, request.day)
        return gateway_pb2.GetUsageResponse(key_id=request.key_id, day=day, requests=u.requests,
                                            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                            spend_usd=u.spend_usd, cache_hits=u.cache_hits, total_spend_usd=total)

    @map_errors
    async def ListModels(self, request, context: grpc.aio.ServicerContext):
        self._check(context)
        return gateway_pb2.ListModelsResponse(models=[
            gateway_pb2.ModelPrice(name=n, usd_per_1k_prompt_tokens=p.usd_per_1k_prompt_tokens,
                                   usd_per_1k_completion_tokens=p.usd_per_1k_completion_tokens)
            for n, p in self.gateway.config.models.items()])
