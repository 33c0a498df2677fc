"""Background jobs over real sockets and a real Redis: gateway (gRPC and HTTP on port 0, its job worker inside) →
router → SmolLM2 replica. Results are written once and charged once; failures are retried with backoff and
dead-lettered; cancel ends what has not started; webhooks are signed, retried and recorded; OpenAI's /v1/files and
/v1/batches work with the official SDK. The faults on real processes are in test_jobs_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import replace
from types import SimpleNamespace

import grpc
import httpx
import openai
import pytest
import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewayConfig
from services.gateway.jobs import JobsConfig
from services.gateway.jobs.webhooks import ID_HEADER, SIGNATURE_HEADER, verify
from services.gateway.main import GatewayService, GatewayServiceConfig
from services.gateway.usage import utc_day
from tests.integration.downstream import running_downstream

pytestmark = pytest.mark.asyncio(loop_scope="session")
ADMIN, PEPPER = "admin-token-for-tests", "pepper-for-tests-0123456789"
MODEL = "SmolLM2-135M-Instruct"
FAST = JobsConfig(workers=2, backoff_base_s=0.05, backoff_max_s=0.2, claim_idle_s=2.0, poll_s=0.05, webhook_backoff_s=0.05,
                  webhook_private=True)             # the receivers here listen on 127.0.0.1
SECRET = "webhook-secret-for-tests"


def auth(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def chat(text: str, max_tokens: int = 4, **kw) -> gateway_pb2.GatewayRequest:
    kw.setdefault("cache_policy", common_pb2.CACHE_POLICY_BYPASS)
    return gateway_pb2.GatewayRequest(
        model=kw.pop("model", MODEL), messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens), **kw)


async def started(redis_url: str, router: str, cache: str, jobs: JobsConfig, http: bool = False) -> tuple[GatewayService, int]:
    svc = GatewayService(GatewayServiceConfig(GatewayConfig(), redis_url, router, cache, PEPPER, ADMIN, jobs=jobs),
                         http_port=0 if http else -1)
    return svc, await svc.start()


@pytest.fixture()
async def suite(redis_url, make_engine, embedder):
    async with running_downstream(redis_url, make_engine("float32"), embedder) as down:
        svc, port = await started(redis_url, down.router_address, down.cache_address, FAST, http=True)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        admin = gateway_pb2_grpc.GatewayAdminStub(ch)

        async def new_key(**kw) -> gateway_pb2.CreateKeyResponse:
            kw.setdefault("tenant", "acme")
            return await admin.CreateKey(gateway_pb2.CreateKeyRequest(**kw), metadata=auth(ADMIN))

        async def usage(key_id: str) -> gateway_pb2.GetUsageResponse:
            return await admin.GetUsage(gateway_pb2.GetUsageRequest(key_id=key_id, day=utc_day()), metadata=auth(ADMIN))
        redis = aioredis.from_url(redis_url)
        try:
            yield SimpleNamespace(svc=svc, grpc=gateway_pb2_grpc.GatewayStub(ch), new_key=new_key, usage=usage,
                                  redis=redis, down=down, redis_url=redis_url, base=f"http://127.0.0.1:{svc.http_port}")
        finally:
            await redis.aclose()
            await ch.close()
            await svc.stop(0)


async def finished(stub, key: str, job_id: str, timeout_s: float = 120.0) -> gateway_pb2.Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = await stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), metadata=auth(key))
        if job.state in (gateway_pb2.JOB_STATE_COMPLETED, gateway_pb2.JOB_STATE_CANCELLED, gateway_pb2.JOB_STATE_EXPIRED):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end: {job}")


async def nothing_pending(redis) -> None:
    """No item or webhook left queued, pending or scheduled."""
    for stream, group in ((b"strata:jobs:queue", "workers"), (b"strata:jobs:webhooks", "senders")):
        assert (await redis.xpending(stream, group))["pending"] == 0
        assert await redis.xlen(stream) == 0
    assert await redis.zcard("strata:jobs:delayed") == 0


async def test_a_job_answers_every_request_once_as_generate_does_and_is_charged_once(suite):
    key = await suite.new_key()
    texts = [f"Name a colour number {i}." for i in range(6)]
    job = await suite.grpc.SubmitJob(gateway_pb2.SubmitJobRequest(requests=[chat(t) for t in texts],
                                                                  metadata={"team": "search"}), metadata=auth(key.key))
    assert job.id.startswith("batch_") and job.total == 6 and job.state == gateway_pb2.JOB_STATE_QUEUED
    assert dict(job.metadata) == {"team": "search"}
    # followed: every result once, as it is written, then the stream ends with the job
    followed = [r async for r in suite.grpc.GetJobResults(gateway_pb2.GetJobResultsRequest(job_id=job.id, follow=True),
                                                            metadata=auth(key.key))]
    assert sorted(r.index for r in followed) == list(range(6))
    done = await finished(suite.grpc, key.key, job.id)
    assert (done.completed, done.failed, done.cancelled) == (6, 0, 0) and done.finished_unix >= done.started_unix > 0
    results = [r async for r in suite.grpc.GetJobResults(gateway_pb2.GetJobResultsRequest(job_id=job.id),
                                                           metadata=auth(key.key))]
    assert [r.index for r in results] == list(range(6)) and all(r.ok and r.attempts == 1 for r in results)
    # the answers are Generate's (greedy)
    for r, text in zip(results, texts):
        direct = await suite.grpc.Generate(chat(text), metadata=auth(key.key))
        assert r.response.text == direct.text and r.response.usage.completion_tokens == direct.usage.completion_tokens
    # charged once each: the job's six and the six direct calls
    await suite.svc.usage.flush()
    used = (await suite.usage(key.key_id))
    assert used.requests == 12
    assert used.prompt_tokens == 2 * sum(r.response.usage.prompt_tokens for r in results)
    assert used.completion_tokens == 2 * sum(r.response.usage.completion_tokens for r in results)
    await nothing_pending(suite.redis)
    # another key sees nothing of it
    other = await suite.new_key()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await suite.grpc.GetJob(gateway_pb2.GetJobRequest(job_id=job.id), metadata=auth(other.key))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await suite.grpc.ListJobs(gateway_pb2.ListJobsRequest(), metadata=auth(other.key))
    assert list(listed.jobs) == []


async def test_a_large_submit_is_queued_in_chunks_and_a_stopped_one_is_carried_on_once(redis_url):
    """Items are queued QUEUE_CHUNK per script (one script for 50,000 held Redis 46 ms). A submitter that stops
    after the first chunk leaves the job in `submitting`; a worker's resume_submits (here two at once, and a
    retried submit with the same idempotency key) queues the rest, each item exactly once."""
    from services.gateway.jobs.store import QUEUE_CHUNK, JobStore

    redis = aioredis.from_url(redis_url)
    store = JobStore(redis, FAST)
    n = 2 * QUEUE_CHUNK + 500
    try:
        await store.ensure_groups()
        job, _ = await store.submit("0123456789ab", "acme", [b"x"] * n, "pb")
        entries = await redis.xrange(store.queue)
        assert sorted(int(f[b"n"]) for _, f in entries) == list(range(n)) and job.queued == n
        assert await redis.zcard(store.submitting) == 0
        await redis.delete(store.queue)

        async def stops_after_the_first_chunk(job_id: str, total: int, queued: int) -> None:
            return None
        store.queue_rest, carry_on = stops_after_the_first_chunk, store.queue_rest
        stopped, _ = await store.submit("0123456789ab", "acme", [b"x"] * n, "pb", idempotency_key="k1")
        assert (stopped.queued, await redis.xlen(store.queue)) == (QUEUE_CHUNK, QUEUE_CHUNK)
        assert [m.decode() for m in await redis.zrange(store.submitting, 0, -1)] == [stopped.id]
        store.queue_rest = carry_on
        assert await store.resume_submits(older_than_s=60) == 0          # a live submitter gets its time
        await asyncio.gather(store.resume_submits(older_than_s=0), store.resume_submits(older_than_s=0),
                             store.submit("0123456789ab", "acme", [b"x"] * n, "pb", idempotency_key="k1"))
        entries = await redis.xrange(store.queue)
        assert sorted(int(f[b"n"]) for _, f in entries) == list(range(n))
        assert {f[b"job"].decode() for _, f in entries} == {stopped.id}
        assert (await store.get("0123456789ab", stopped.id)).queued == n and await redis.zcard(store.submitting) == 0
    finally:
        await redis.aclose()


async def test_the_same_idempotency_key_returns_the_same_job(suite):
    key = await suite.new_key()
    req = gateway_pb2.SubmitJobRequest(requests=[chat("Say hi.")] * 3, idempotency_key="nightly-2026-12-03")
    first, again = await asyncio.gather(suite.grpc.SubmitJob(req, metadata=auth(key.key)),
                                        suite.grpc.SubmitJob(req, metadata=auth(key.key)))
    assert first.id == again.id
    await finished(suite.grpc, key.key, first.id)
    listed = await suite.grpc.ListJobs(gateway_pb2.ListJobsRequest(), metadata=auth(key.key))
    assert [j.id for j in listed.jobs] == [first.id]
    await suite.svc.usage.flush()
    assert (await suite.usage(key.key_id)).requests == 3


async def test_a_request_that_cannot_succeed_fails_alone_at_once(suite):
    key = await suite.new_key()
    job = await suite.grpc.SubmitJob(gateway_pb2.SubmitJobRequest(
        requests=[chat("Say hi."), chat("Say hi.", model="no-such-model"), chat("x", max_tokens=100_000)]),
        metadata=auth(key.key))
    done = await finished(suite.grpc, key.key, job.id)
    assert (done.state, done.completed, done.failed) == (gateway_pb2.JOB_STATE_COMPLETED, 1, 2)
    results = {r.index: r async for r in suite.grpc.GetJobResults(gateway_pb2.GetJobResultsRequest(job_id=job.id),
                                                                     metadata=auth(key.key))}
    assert results[0].ok
    assert (results[1].ok, results[1].error_code, results[1].attempts) == (False, "NOT_FOUND", 1)
    assert (results[2].error_code, results[2].attempts) == ("INVALID_ARGUMENT", 1)
    assert await suite.redis.xlen("strata:jobs:dead") == 0       # not transient: no dead letter
    await nothing_pending(suite.redis)


async def test_a_throttled_item_waits_for_its_turn_without_using_up_its_attempts(suite):
    # one request at a time for this key, two job workers: every other run is refused with a retry-after
    key = await suite.new_key(limits=gateway_pb2.KeyLimits(concurrent_requests=1))
    job = await suite.grpc.SubmitJob(gateway_pb2.SubmitJobRequest(requests=[chat(f"Say {i}.") for i in range(8)]),
                                     metadata=auth(key.key))
    done = await finished(suite.grpc, key.key, job.id)
    assert (done.completed, done.failed) == (8, 0)
    assert suite.svc.metrics.job_throttled._value.get() > 0
    results = [r async for r in suite.grpc.GetJobResults(gateway_pb2.GetJobResultsRequest(job_id=job.id),
                                                           metadata=auth(key.key))]
    assert [r.attempts for r in results] == [1] * 8          # throttled runs do not count
    await nothing_pending(suite.redis)


@contextlib.asynccontextmanager
async def routerless_gateway(redis_url: str, config: JobsConfig):
    """A gateway whose router is not there (every run is UNAVAILABLE), a key on it: (service, stub, Redis, key)."""
    svc, port = await started(redis_url, "127.0.0.1:1", "", config)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    redis = aioredis.from_url(redis_url)
    try:
        key = await gateway_pb2_grpc.GatewayAdminStub(ch).CreateKey(gateway_pb2.CreateKeyRequest(tenant="acme"),
                                                                    metadata=auth(ADMIN))
        yield svc, gateway_pb2_grpc.GatewayStub(ch), redis, key
    finally:
        await ch.close()
        await svc.stop(0)
        await redis.aclose()


async def test_transient_failures_are_retried_with_backoff_then_dead_lettered_with_the_reason(redis_url):
    async with routerless_gateway(redis_url, replace(FAST, max_attempts=3)) as (svc, stub, redis, key):
        job = await stub.SubmitJob(gateway_pb2.SubmitJobRequest(requests=[chat("a"), chat("b")]), metadata=auth(key.key))
        done = await finished(stub, key.key, job.id, 30)
        assert (done.completed, done.failed) == (0, 2)
        results = [r async for r in stub.GetJobResults(gateway_pb2.GetJobResultsRequest(job_id=job.id), metadata=auth(key.key))]
        assert [(r.error_code, r.attempts) for r in results] == [("UNAVAILABLE", 3)] * 2
        dead = await redis.xrange("strata:jobs:dead")
        assert sorted(int(f[b"n"]) for _, f in dead) == [0, 1]
        assert all(f[b"job"].decode() == job.id and b"UNAVAILABLE" in f[b"reason"] and b"after 3 runs" in f[b"reason"]
                   for _, f in dead)
        assert svc.metrics.job_retries._value.get() == 4            # two retries each
        await nothing_pending(redis)
        # nothing was charged: no run was answered, and the failed runs used no tokens
        await svc.usage.flush()
        assert not await redis.keys("strata:gw:usage:*")


async def test_cancel_brings_forward_the_jobs_own_waiting_retries_only(redis_url):
    """Items waiting a minute for their retry end at once when their job is cancelled, while another job's retries
    keep their due times (a cancel reads its job's retries set, not every job's)."""
    minute = replace(FAST, max_attempts=3, backoff_base_s=60, backoff_max_s=60)
    async with routerless_gateway(redis_url, minute) as (_, stub, redis, key):
        a, b = [await stub.SubmitJob(gateway_pb2.SubmitJobRequest(requests=[chat("a"), chat("b")]), metadata=auth(key.key))
                for _ in range(2)]
        waiting = {f"i|{j.id}|{n}" for j in (a, b) for n in (0, 1)}
        for _ in range(200):                                 # every item failed once (no router), its retry a minute out
            if {m.decode() for m in await redis.zrange("strata:jobs:delayed", 0, -1)} >= waiting:
                break
            await asyncio.sleep(0.05)
        due_b = {m: await redis.zscore("strata:jobs:delayed", m) for m in waiting if b.id in m}
        assert all(d > time.time() + 30 for d in due_b.values()), due_b
        await stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=a.id), metadata=auth(key.key))
        done = await finished(stub, key.key, a.id, 10)
        assert (done.state, done.cancelled) == (gateway_pb2.JOB_STATE_CANCELLED, 2)
        assert {m: await redis.zscore("strata:jobs:delayed", m) for m in due_b} == due_b    # b's retries untouched
        await stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=b.id), metadata=auth(key.key))
        assert (await finished(stub, key.key, b.id, 10)).cancelled == 2
        await nothing_pending(redis)


async def test_cancel_ends_the_queued_items_and_lets_the_running_ones_finish(suite):
    key = await suite.new_key()
    job = await suite.grpc.SubmitJob(gateway_pb2.SubmitJobRequest(requests=[chat(f"Count to {i}.", 12) for i in range(30)]),
                                     metadata=auth(key.key))
    results = suite.grpc.GetJobResults(gateway_pb2.GetJobResultsRequest(job_id=job.id, follow=True), metadata=auth(key.key))
    await anext(aiter(results))                          # one answered: the workers are busy with the next ones
    cancelling = await suite.grpc.CancelJob(gateway_pb2.CancelJobRequest(job_id=job.id), metadata=auth(key.key))
    assert cancelling.state in (gateway_pb2.JOB_STATE_CANCELLING, gateway_pb2.JOB_STATE_CANCELLED)
    done = await finished(suite.grpc, key.key, job.id)
    assert done.state == gateway_pb2.JOB_STATE_CANCELLED
    assert done.completed + done.cancelled == 30 and done.failed == 0
    assert 1 <= done.completed <= 1 + 2 * FAST.workers and done.cancelled >= 30 - 1 - 2 * FAST.workers
    all_results = [r async for r in suite.grpc.GetJobResults(gateway_pb2.GetJobResultsRequest(job_id=job.id),
                                                               metadata=auth(key.key))]
    assert len(all_results) == 30
    assert {r.error_code for r in all_results if not r.ok} == {"CANCELLED"}
    assert all(r.attempts == 0 for r in all_results if not r.ok)     # never run
    await suite.svc.usage.flush()
    assert (await suite.usage(key.key_id)).requests == done.completed
    await nothing_pending(suite.redis)
    # a second cancel of an ended job changes nothing
    again = await suite.grpc.CancelJob(gateway_pb2.CancelJobRequest(job_id=job.id), metadata=auth(key.key))
    assert again.state == gateway_pb2.JOB_STATE_CANCELLED and again.completed == done.completed


@contextlib.asynccontextmanager
async def hook_receiver(hook, **tls):
    """A real HTTP server on 127.0.0.1 (port 0) answering POST /hook with `hook`; yields its port. `tls`:
    uvicorn's ssl_keyfile and ssl_certfile."""
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), host="127.0.0.1",
                                           port=0, log_level="warning", lifespan="off", **tls))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await serving


async def test_webhooks_are_signed_retried_and_every_delivery_recorded(suite):
    seen: list[tuple[dict, bytes]] = []

    async def hook(request: HttpRequest) -> Response:
        seen.append((dict(request.headers), await request.body()))
        return Response(status_code=500 if len(seen) == 1 else 204)     # the first delivery fails
    async with hook_receiver(hook) as port:
        key = await suite.new_key()
        job = await suite.grpc.SubmitJob(gateway_pb2.SubmitJobRequest(
            requests=[chat("Say hi.")], webhook_url=f"http://127.0.0.1:{port}/hook", webhook_secret=SECRET),
            metadata=auth(key.key))
        assert job.webhook_secret == ""                                 # the caller's own: never echoed
        await finished(suite.grpc, key.key, job.id)
        for _ in range(100):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(seen) == 2
        for headers, body in seen:
            assert headers[ID_HEADER.lower()] == job.id
            sig = headers[SIGNATURE_HEADER.lower()]
            assert "hmac-sha256=" in sig and sig.startswith("t=")
            assert verify(SECRET, sig, body) and not verify("another-secret-1234", sig, body)
            assert not verify(SECRET, sig, body + b" ")
            assert not verify(SECRET, sig + "é", body) and not verify(SECRET, "t=1,hmac-sha256=é", body)
            sent = json.loads(body)
            assert (sent["id"], sent["state"], sent["completed"]) == (job.id, "completed", 1)
        got = await suite.grpc.GetJob(gateway_pb2.GetJobRequest(job_id=job.id), metadata=auth(key.key))
        assert [(d.attempt, d.status_code) for d in got.webhook_deliveries] == [(1, 500), (2, 204)]
        assert got.webhook_deliveries[0].error == "HTTP 500"
        await nothing_pending(suite.redis)
        # without a secret the gateway makes one, shown once
        made = await suite.grpc.SubmitJob(gateway_pb2.SubmitJobRequest(
            requests=[chat("Say hi.")], webhook_url=f"http://127.0.0.1:{port}/hook"), metadata=auth(key.key))
        assert made.webhook_secret.startswith("whsec_")
        again = await suite.grpc.GetJob(gateway_pb2.GetJobRequest(job_id=made.id), metadata=auth(key.key))
        assert again.webhook_secret == ""
        # a retried submit (same idempotency key) whose first answer was lost gets the made secret again
        retried = gateway_pb2.SubmitJobRequest(requests=[chat("Say hi.")], webhook_url=f"http://127.0.0.1:{port}/hook",
                                               idempotency_key="lost-answer")
        first = await suite.grpc.SubmitJob(retried, metadata=auth(key.key))
        second = await suite.grpc.SubmitJob(retried, metadata=auth(key.key))
        assert second.id == first.id and second.webhook_secret == first.webhook_secret != ""
        await finished(suite.grpc, key.key, first.id)
        await finished(suite.grpc, key.key, made.id)


async def test_webhooks_go_to_public_addresses_only_unless_allowed(suite):
    """A tenant's webhook URL must not reach into the gateway's network. By default an IP literal or localhost
    outside the public addresses is refused at submit (INVALID_ARGUMENT), and a name is resolved at each
    delivery: one that resolves to loopback is refused there, and nothing is sent. Allowed, the request goes to
    the address that was checked, with the URL's own Host header."""
    from services.common.errors import InvalidArgumentError
    from services.gateway.jobs.store import JobStore
    from services.gateway.jobs.webhooks import deliver

    strict = JobStore(suite.redis, JobsConfig())
    for url in ("http://127.0.0.1:8080/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]/h",
                "http://10.0.0.7/h", "http://localhost:9/h", "http://[::ffff:192.168.1.1]/h"):
        with pytest.raises(InvalidArgumentError, match="public addresses only"):
            await strict.submit("0123456789ab", "acme", [b"x"], "pb", webhook_url=url)

    seen: list[dict] = []

    async def hook(request: HttpRequest) -> Response:
        seen.append(dict(request.headers))
        return Response(status_code=204)
    async with hook_receiver(hook) as port:
        async with httpx.AsyncClient() as client:
            # 0x7f000001 is no IP literal to the URL parser, but the resolver reads it as 127.0.0.1
            url = f"http://0x7f000001:{port}/hook"
            status, error = await deliver(client, url, SECRET, "job-1", b"{}", 5.0)
            assert status == 0 and error.startswith("refused:") and "private" in error and not seen
            status, error = await deliver(client, url, SECRET, "job-1", b"{}", 5.0, allow_private=True)
            assert (status, error) == (204, "") and len(seen) == 1
            assert seen[0]["host"] == f"0x7f000001:{port}" and seen[0][ID_HEADER.lower()] == "job-1"


async def test_an_https_webhook_sent_to_the_checked_address_is_verified_for_the_urls_name(tmp_path):
    """Pinned to the address it checked, a delivery still verifies TLS for the URL's name (SNI and the hostname
    check), and no connection is reused across names: the server's certificate names localhost only, so the
    same server reached as 127.0.0.1 right after is refused, not served over the first delivery's connection."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from services.gateway.jobs.webhooks import deliver

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    seen: list[str] = []

    async def hook(request: HttpRequest) -> Response:
        seen.append(request.headers["host"])
        return Response(status_code=204)
    async with hook_receiver(hook, ssl_keyfile=str(tmp_path / "k.pem"), ssl_certfile=str(tmp_path / "c.pem")) as port:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(tmp_path / "c.pem"))) as client:
            got = await deliver(client, f"https://localhost:{port}/hook", SECRET, "job-1", b"{}", 5.0, allow_private=True)
            assert got == (204, "") and seen == [f"localhost:{port}"]
            status, error = await deliver(client, f"https://127.0.0.1:{port}/hook", SECRET, "job-1", b"{}", 5.0,
                                          allow_private=True)
            assert status == 0 and "CERTIFICATE_VERIFY_FAILED" in error and len(seen) == 1


async def test_bad_submissions_get_a_clear_status(suite):
    key = await suite.new_key()
    cases = [
        (gateway_pb2.SubmitJobRequest(), "1 to 50000"),
        (gateway_pb2.SubmitJobRequest(requests=[chat("a")], webhook_url="ftp://x/y"), "http(s) URL"),
        (gateway_pb2.SubmitJobRequest(requests=[chat("a")], webhook_url="http://exämple..com/"), "http(s) URL"),
        (gateway_pb2.SubmitJobRequest(requests=[chat("a")], webhook_url="http://u:pw@x/y"), "user or password"),
        (gateway_pb2.SubmitJobRequest(requests=[chat("a")], webhook_url="http://x/y", webhook_secret="short"), "16"),
        (gateway_pb2.SubmitJobRequest(requests=[chat("a")], completion_window_s=5), "completion_window_s"),
        (gateway_pb2.SubmitJobRequest(requests=[chat("a")], metadata={str(i): "v" for i in range(17)}), "metadata"),
    ]
    for req, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await suite.grpc.SubmitJob(req, metadata=auth(key.key))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await suite.grpc.SubmitJob(gateway_pb2.SubmitJobRequest(requests=[chat("a")]), metadata=auth("sk-strata-nope"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await suite.grpc.GetJob(gateway_pb2.GetJobRequest(job_id="batch_nope"), metadata=auth(key.key))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _batch_file(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def _line(custom_id: str, **body) -> dict:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "strata": {"cache_policy": "bypass"}, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def test_openai_batches_with_the_sdk_files_in_results_out(suite):
    key = await suite.new_key()
    client = openai.AsyncOpenAI(base_url=suite.base + "/v1", api_key=key.key, max_retries=0, timeout=60)
    lines = [_line(f"q{i}", messages=[{"role": "user", "content": f"Name a fruit number {i}."}]) for i in range(4)]
    lines.append(_line("bad", messages=[{"role": "user", "content": "hi"}], model="no-such-model"))
    f = await client.files.create(file=("in.jsonl", _batch_file(lines)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(_batch_file(lines))
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                        metadata={"run": "nightly"})
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 5
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "cancelled", "expired") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        batch = await client.batches.retrieve(batch.id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (4, 1)
    out = [json.loads(x) for x in (await client.files.content(batch.output_file_id)).text.splitlines()]
    err = [json.loads(x) for x in (await client.files.content(batch.error_file_id)).text.splitlines()]
    assert [x["custom_id"] for x in out] == ["q0", "q1", "q2", "q3"]
    assert all(x["response"]["status_code"] == 200 and x["response"]["body"]["object"] == "chat.completion" for x in out)
    body = {k: v for k, v in lines[2]["body"].items() if k != "strata"}
    direct = await client.chat.completions.create(**body, extra_body={"strata": {"cache_policy": "bypass"}})
    assert out[2]["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert [(x["custom_id"], x["response"]["status_code"], x["error"]["code"]) for x in err] == [("bad", 404, "not_found")]
    # the same uploaded file as a gRPC job: results carry each output line
    grpc_job = await suite.grpc.SubmitJob(gateway_pb2.SubmitJobRequest(input_file_id=f.id), metadata=auth(key.key))
    assert grpc_job.endpoint == "/v1/chat/completions" and grpc_job.input_file_id == f.id and grpc_job.total == 5
    await finished(suite.grpc, key.key, grpc_job.id)
    lines_out = [r async for r in suite.grpc.GetJobResults(gateway_pb2.GetJobResultsRequest(job_id=grpc_job.id),
                                                             metadata=auth(key.key))]
    assert [(r.custom_id, r.ok) for r in lines_out] == [("q0", True), ("q1", True), ("q2", True), ("q3", True),
                                                        ("bad", False)]
    assert json.loads(lines_out[2].json)["response"]["body"]["choices"][0]["message"]["content"] == \
        direct.choices[0].message.content
    listed = await client.batches.list()
    assert [b.id for b in listed.data] == [grpc_job.id, batch.id]
    # cancel of an ended batch: unchanged
    assert (await client.batches.cancel(batch.id)).status == "completed"
    # a bad line is a 400 naming it; a file of another key is not found
    bad = await client.files.create(file=("bad.jsonl", _batch_file([lines[0], {"custom_id": "x", "method": "GET"}])),
                                    purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 2"):
        await client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    unknown = await client.files.create(file=("unknown.jsonl", _batch_file([lines[0], _line("y", messages=[], foo=1)])),
                                        purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 2: unknown field 'foo'"):
        await client.batches.create(input_file_id=unknown.id, endpoint="/v1/chat/completions", completion_window="24h")
    other = openai.AsyncOpenAI(base_url=suite.base + "/v1", api_key=(await suite.new_key()).key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await other.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        await other.batches.retrieve(batch.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert (await client.files.delete(f.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(f.id)
