"""gRPC face of the gateway: credentials from metadata, GatewayRequest translated into the gateway's
Request, its Chunks and Result back into GatewayChunk / GatewayResponse; the admin RPCs likewise."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any, AsyncIterator

import grpc
from opentelemetry import trace

from services.common.errors import FailedPreconditionError, InvalidArgumentError, UnauthenticatedError
from services.common.grpc_errors import map_errors
from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.admin import GatewayAdmin
from services.gateway.budgets import Budget
from services.gateway.jobs.batch_lines import CHAT, batch_items
from services.gateway.jobs.store import Job, JobState, JobStore
from services.gateway.keys import ApiKey
from services.gateway.limits import Limits
from services.gateway.service import Gateway
from services.gateway.translate import (finish_reason_to_pb, logprobs_to_pb, messages_from_pb, sampling_from_pb,
                                        source_to_pb, tool_calls_to_pb, tools_from_pb, usage_to_pb)
from services.gateway.types import CachePolicy, Chunk, Finish, Request, Result

# an unknown value (proto3 enums are open) skips the lookup and stores the answer, as REFRESH does
_POLICY = {common_pb2.CACHE_POLICY_UNSPECIFIED: CachePolicy.USE, common_pb2.CACHE_POLICY_USE: CachePolicy.USE,
           common_pb2.CACHE_POLICY_BYPASS: CachePolicy.BYPASS}


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


def request_from_pb(r: gateway_pb2.GatewayRequest) -> Request:
    chat = r.HasField("messages")
    return Request(r.model, r.prompt, messages_from_pb(r.messages) if chat else None,
                   sampling_from_pb(r.sampling), _POLICY.get(r.cache_policy, CachePolicy.REFRESH), r.priority,
                   r.allow_sampled_cache, tools_from_pb(r.messages) if chat else None, r.user)


def _finish_fields(f: Finish) -> dict[str, Any]:
    out: dict[str, Any] = {"finish_reason": finish_reason_to_pb(f.reason), "usage": usage_to_pb(f.usage),
                           "source": source_to_pb(f.source), "flags": f.flags}
    if f.mean_logprob is not None:
        out["mean_logprob"] = f.mean_logprob
    return out


def chunk_to_pb(c: Chunk) -> gateway_pb2.GatewayChunk:
    extra: dict[str, Any] = {"tool_calls": tool_calls_to_pb(c.tool_calls)} if c.tool_calls else {}
    if c.logprobs:
        extra["logprobs"] = logprobs_to_pb(c.logprobs)
    if c.index:
        extra["index"] = c.index
    if c.finish is None:
        return gateway_pb2.GatewayChunk(request_id=c.request_id, text=c.text, token_ids=c.token_ids, **extra)
    return gateway_pb2.GatewayChunk(request_id=c.request_id, text=c.text, token_ids=c.token_ids,
                                    **_finish_fields(c.finish), **extra)


def result_to_pb(r: Result) -> gateway_pb2.GatewayResponse:
    choices = [gateway_pb2.GatewayChoice(index=c.index, text=c.text, token_ids=c.token_ids,
                                         finish_reason=finish_reason_to_pb(c.reason),
                                         tool_calls=tool_calls_to_pb(c.tool_calls), logprobs=logprobs_to_pb(c.logprobs))
               for c in r.choices] if len(r.choices) > 1 else []
    return gateway_pb2.GatewayResponse(request_id=r.request_id, text=r.text, token_ids=r.token_ids,
                                       tool_calls=tool_calls_to_pb(r.tool_calls), logprobs=logprobs_to_pb(r.logprobs),
                                       choices=choices, **_finish_fields(r.finish))


_JOB_STATES = {JobState.QUEUED: gateway_pb2.JOB_STATE_QUEUED, JobState.IN_PROGRESS: gateway_pb2.JOB_STATE_IN_PROGRESS,
               JobState.CANCELLING: gateway_pb2.JOB_STATE_CANCELLING, JobState.COMPLETED: gateway_pb2.JOB_STATE_COMPLETED,
               JobState.CANCELLED: gateway_pb2.JOB_STATE_CANCELLED, JobState.EXPIRED: gateway_pb2.JOB_STATE_EXPIRED}


def job_to_pb(j: Job, secret: str = "", deliveries: list[dict] | None = None) -> gateway_pb2.Job:
    return gateway_pb2.Job(
        id=j.id, state=_JOB_STATES[j.state], total=j.total, completed=j.completed, failed=j.failed,
        cancelled=j.cancelled, expired=j.expired, created_unix=j.created, started_unix=j.started,
        finished_unix=j.finished, expires_unix=j.expires, webhook_url=j.webhook_url, webhook_secret=secret,
        webhook_deliveries=[gateway_pb2.WebhookDelivery(attempt=d["attempt"], at_unix=d["at"], status_code=d["status_code"],
                                                        error=d["error"], duration_ms=d["duration_ms"])
                            for d in deliveries or ()],
        metadata=j.metadata, endpoint=j.endpoint, input_file_id=j.input_file_id)


def job_result_to_pb(j: Job, n: int, value: bytes) -> gateway_pb2.JobResult:
    """A stored result (its first byte says whether it was answered) as a JobResult."""
    ok, body = value[:1] == b"1", value[1:]
    if j.format == "pb":
        return gateway_pb2.JobResult.FromString(body)
    line = json.loads(body)
    return gateway_pb2.JobResult(index=n, ok=ok, custom_id=line.get("custom_id", ""), json=body.decode())


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    SERVICE = "strata.v1.Gateway"

    def __init__(self, gateway: Gateway, jobs: JobStore | None = None, follow_poll_s: float = 0.2) -> None:
        self.gateway = gateway
        self.tracer = gateway.tracer
        self.jobs = jobs
        self.follow_poll_s = follow_poll_s

    @map_errors
    async def Generate(self, request: gateway_pb2.GatewayRequest,
                       context: grpc.aio.ServicerContext) -> gateway_pb2.GatewayResponse:
        return result_to_pb(await self.gateway.generate(request_from_pb(request), bearer(context),
                                                        client_address(context), context.time_remaining()))

    @map_errors
    async def GenerateStream(self, request: gateway_pb2.GatewayRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GatewayChunk]:
        async for chunk in self.gateway.stream(request_from_pb(request), bearer(context), client_address(context),
                                               context.time_remaining()):
            yield chunk_to_pb(chunk)

    @map_errors
    async def Embed(self, request: gateway_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.EmbedResponse:
        out = await self.gateway.embed(request.model, list(request.input), bearer(context), client_address(context),
                                       request.truncate, context.time_remaining(), request.user)
        return gateway_pb2.EmbedResponse(request_id=out.request_id, model=out.model,
                                         embeddings=[gateway_pb2.Embedding(values=v.tolist()) for v in out.vectors],
                                         usage=common_pb2.Usage(prompt_tokens=out.prompt_tokens))


    # --- background jobs

    async def _job_store(self, context: grpc.aio.ServicerContext) -> tuple[JobStore, str, str]:
        """The store, and the caller's key id and tenant (its key checked as for Generate)."""
        if self.jobs is None:
            raise FailedPreconditionError("background jobs are off on this gateway")
        key = await self.gateway.authenticator.authenticate(bearer(context), client_address(context))
        return self.jobs, key.key_id, key.tenant

    @map_errors
    async def SubmitJob(self, request: gateway_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.Job:
        jobs, key_id, tenant = await self._job_store(context)
        kw: dict[str, Any] = dict(idempotency_key=request.idempotency_key, webhook_url=request.webhook_url,
                                  webhook_secret=request.webhook_secret, window_s=request.completion_window_s,
                                  metadata=dict(request.metadata))
        if request.input_file_id:             # an uploaded JSONL of OpenAI batch lines
            if request.requests:
                raise InvalidArgumentError("give requests or an input_file_id, not both")
            endpoint = request.endpoint or CHAT
            _, data = await jobs.file(key_id, request.input_file_id, content=True)
            job, secret = await jobs.submit(key_id, tenant, batch_items(data, endpoint, request.input_file_id), "openai",
                                            endpoint=endpoint, input_file_id=request.input_file_id, **kw)
        else:
            job, secret = await jobs.submit(key_id, tenant, [r.SerializeToString() for r in request.requests], "pb",
                                            **kw)
        return job_to_pb(job, secret)

    @map_errors
    async def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.Job:
        jobs, key_id, _ = await self._job_store(context)
        job = await jobs.get(key_id, request.job_id)
        return job_to_pb(job, deliveries=await jobs.deliveries(job.id))

    @map_errors
    async def ListJobs(self, request: gateway_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> gateway_pb2.ListJobsResponse:
        jobs, key_id, _ = await self._job_store(context)
        got, more = await jobs.list(key_id, request.limit or 20, request.after)
        return gateway_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in got], has_more=more)

    @map_errors
    async def CancelJob(self, request: gateway_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.Job:
        jobs, key_id, _ = await self._job_store(context)
        return job_to_pb(await jobs.cancel(key_id, request.job_id))

    @map_errors
    async def GetJobResults(self, request: gateway_pb2.GetJobResultsRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.JobResult]:
        jobs, key_id, _ = await self._job_store(context)
        job = await jobs.get(key_id, request.job_id)
        if not request.follow:
            for n, value in await jobs.all_results(job):
                yield job_result_to_pb(job, n, value)
            return
        after = "0-0"
        while True:                           # in the order they were written, until the job has ended
            ended = job.state.final           # read before the results: none written after it is missed
            got, after = await jobs.results(job.id, after)
            for n, value in got:
                yield job_result_to_pb(job, n, value)
            if ended and not got:
                return
            if not got:
                await asyncio.sleep(self.follow_poll_s)
                job = await jobs.get(key_id, job.id)


DEFAULT_ROTATION_OVERLAP_S = 3600.0


def admin_id(token: str) -> str:
    """The admin credential's id in the audit log: never the credential, but the same one each time."""
    return "admin-" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _limits(lim: gateway_pb2.KeyLimits) -> Limits:
    return Limits(lim.requests_per_minute, lim.tokens_per_minute, lim.tokens_per_day, lim.concurrent_requests)


def key_info(k: ApiKey) -> gateway_pb2.KeyInfo:
    lim = k.limits
    return gateway_pb2.KeyInfo(
        key_id=k.key_id, tenant=k.tenant, models=k.models, budget_usd=k.budget_usd, tier=k.tier, revoked=k.revoked,
        limits=gateway_pb2.KeyLimits(requests_per_minute=lim.requests_per_minute, tokens_per_minute=lim.tokens_per_minute,
                                     tokens_per_day=lim.tokens_per_day, concurrent_requests=lim.concurrent_requests),
        created_unix=k.created_s, expires_unix=k.expires_s, rotated_unix=k.rotated_s,
        previous_secret_until_unix=k.previous_until_s, budget_period=k.budget_period)


class GatewayAdminServicer(gateway_pb2_grpc.GatewayAdminServicer):
    SERVICE = "strata.v1.GatewayAdmin"

    def __init__(self, admin: GatewayAdmin, admin_token: str, tracer: trace.Tracer) -> None:
        self.admin = admin
        self.tracer = tracer
        self._admin = admin_token.encode()
        self._actor = admin_id(admin_token)

    def _check(self, context: grpc.aio.ServicerContext) -> str:
        """The admin credential's id (what the audit log names), or UnauthenticatedError."""
        token = bearer(context).encode()
        if not self._admin or not hmac.compare_digest(token, self._admin):
            raise UnauthenticatedError("the admin credential is missing or wrong")
        return self._actor

    @map_errors
    async def CreateKey(self, request, context: grpc.aio.ServicerContext):
        actor = self._check(context)
        key, record = await self.admin.create_key(request.tenant, list(request.models), _limits(request.limits),
                                                  request.budget_usd, request.tier, request.expires_unix, actor,
                                                  request.budget_period)
        return gateway_pb2.CreateKeyResponse(key=key, key_id=record.key_id)

    @map_errors
    async def RevokeKey(self, request, context: grpc.aio.ServicerContext):
        actor = self._check(context)
        await self.admin.revoke_key(request.key_id, actor)
        return gateway_pb2.RevokeKeyResponse()

    @map_errors
    async def ListKeys(self, request, context: grpc.aio.ServicerContext):
        self._check(context)
        keys = await self.admin.list_keys(request.tenant, request.include_revoked)
        return gateway_pb2.ListKeysResponse(keys=[key_info(k) for k in keys])

    @map_errors
    async def UpdateKey(self, request, context: grpc.aio.ServicerContext):
        actor = self._check(context)
        has = request.HasField
        after = await self.admin.update_key(
            request.key_id, actor, models=list(request.models.names) if has("models") else None,
            limits=_limits(request.limits) if has("limits") else None,
            budget_usd=request.budget_usd if has("budget_usd") else None, tier=request.tier if has("tier") else None,
            expires_s=request.expires_unix if has("expires_unix") else None,
            budget_period=request.budget_period if has("budget_period") else None)
        return key_info(after)

    @map_errors
    async def SetTenantBudget(self, request, context: grpc.aio.ServicerContext):
        actor = self._check(context)
        after = await self.admin.set_tenant_budget(request.tenant, Budget(request.budget_usd, request.period or "none"),
                                                   actor)
        return gateway_pb2.TenantBudget(tenant=request.tenant, budget_usd=after.usd, period=after.period)

    @map_errors
    async def RotateKey(self, request, context: grpc.aio.ServicerContext):
        actor = self._check(context)
        overlap = request.overlap_s if request.HasField("overlap_s") else DEFAULT_ROTATION_OVERLAP_S
        key, after = await self.admin.rotate_key(request.key_id, overlap, actor)
        return gateway_pb2.RotateKeyResponse(key=key, info=key_info(after))

    @map_errors
    async def ListAudit(self, request, context: grpc.aio.ServicerContext):
        self._check(context)
        if request.limit < 0:
            raise InvalidArgumentError("limit must be 1-1000, or 0 for 100")
        entries, after = await self.admin.audit(request.key_id, request.before_id, request.limit)
        return gateway_pb2.ListAuditResponse(next_before_id=after, entries=[
            gateway_pb2.AuditEntry(id=e.entry_id, at_unix=e.at_s, actor=e.actor, action=e.action, key_id=e.key_id,
                                   before_json=json.dumps(e.before), after_json=json.dumps(e.after)) for e in entries])

    @map_errors
    async def GetUsage(self, request, context: grpc.aio.ServicerContext):
        self._check(context)
        day, u, total, users = await self.admin.get_usage(request.key_id, request.day)
        return gateway_pb2.GetUsageResponse(
            key_id=request.key_id, day=day, requests=u.requests, prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens, spend_usd=u.spend_usd, cache_hits=u.cache_hits, total_spend_usd=total,
            users=[gateway_pb2.UserUsage(user=name, requests=v.requests, prompt_tokens=v.prompt_tokens,
                                         completion_tokens=v.completion_tokens, spend_usd=v.spend_usd,
                                         cache_hits=v.cache_hits) for name, v in users.items()])

    @map_errors
    async def ListModels(self, request, context: grpc.aio.ServicerContext):
        self._check(context)
        out = gateway_pb2.ListModelsResponse()
        for m in self.admin.models():
            st = m.state
            out.models.add(name=m.name, usd_per_1k_prompt_tokens=m.price.usd_per_1k_prompt_tokens,
                           usd_per_1k_completion_tokens=m.price.usd_per_1k_completion_tokens, tiers=m.tiers,
                           fallbacks=m.fallbacks, state="unknown" if st is None else st.state,
                           replicas=st.replicas if st else 0, healthy_replicas=st.healthy if st else 0,
                           chat=bool(st and st.chat), pending_tokens=st.pending_tokens if st else 0,
                           waiting=st.waiting if st else 0, running=st.running if st else 0)
        return out
