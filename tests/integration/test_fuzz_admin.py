"""Property-based fuzzing (hypothesis) of the gateway's admin RPCs (CreateKey, RevokeKey, GetUsage,
ListModels) on real sockets, with test_fuzz's helpers: with the admin token, a wrong one, an API key and
none; hostile tenants, model lists, limits (negative, huge), budgets (NaN, inf, negative), tiers, key ids and
days ("2026-13-45", huge, not UTF-8 on the wire), and corrupt wire data.

Every call ends with an answer or a clear status and a short message (never UNKNOWN / INTERNAL, never a
hang); a request that does not parse is INVALID_ARGUMENT; without the admin token nothing happens
(UNAUTHENTICATED); CreateKey creates exactly the keys the API's rules allow, and each serves: its first
Generate is answered and the same request again comes from its tenant's cache (a key whose limits or budget
leave no room for two requests may refuse with RESOURCE_EXHAUSTED instead); a revoked key is refused at
once, one not revoked still works; GetUsage counts what a key's requests did.

Examples are derandomized (the same every run) and bounded: 30-40 per RPC, plus explicit ones (@example) for
the bugs the fuzzing found and for a key id that names no key."""

from __future__ import annotations

import collections
import datetime as dt
import math
import re
import time

import grpc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.common.models_file import DEFAULT_TIERS
from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.usage import utc_day
from tests.conftest import assert_all_blocks_free, settled
from tests.integration.test_fuzz import (ADMIN, CALL_TIMEOUT_S, CLEAR, INVALID, MARK, MODEL, OK, SETTINGS, garbage,
                                         mostly, outcome, parses, raw, running_services, still_serving, texts, wire)

pytestmark = pytest.mark.asyncio(loop_scope="session")

SEEN: collections.Counter = collections.Counter()     # status codes the fuzzing produced, per RPC
UNAUTHENTICATED, NOT_FOUND = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
ALLOWED = CLEAR | {UNAUTHENTICATED}
TENANT_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")    # as gateway.proto documents CreateKey's tenant
KEY_ID_RULE = re.compile(r"[0-9a-f]{12}")
FRESH = "<a fresh key>"           # a key id the RevokeKey test replaces with a key it has just created
CREATED = "<a created key>"       # a key id the GetUsage test replaces with one CreateKey created (and used)
TODAY = "<today>"
SERVED: dict[str, tuple[int, int]] = {}     # key id -> (answered, from the cache) of the keys CreateKey created
HELLO = gateway_pb2.GatewayRequest(model=MODEL, prompt="Say hello.",
                                   sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=1))

# ---- strategies
ADMIN_TOKENS = {"admin": f"Bearer {ADMIN}", "admin, lower-case scheme": f"bearer {ADMIN}"}
OTHER_TOKENS = {"wrong": f"Bearer {ADMIN}x", "prefix": f"Bearer {ADMIN[:-1]}", "basic": f"Basic {ADMIN}",
                "empty": "Bearer ", "none": None, "api key": "<the fixture's API key>"}
credentials = mostly(st.sampled_from(sorted(ADMIN_TOKENS)), st.sampled_from(sorted(OTHER_TOKENS)))

tenants = mostly(st.sampled_from(["acme", "a", "A.b_c-9", "t" * 64, "fuzz"]),
                 st.one_of(st.sampled_from(["", " ", "-acme", ".acme", "a b", "t" * 65, "acme\n", "acme:victim", "ÿ",
                                            "٣", "acme/..", "*", MARK]), texts))
model_lists = mostly(st.sampled_from([[], [MODEL]]), st.one_of(
    st.lists(st.one_of(st.just(MODEL), st.sampled_from(["", "gpt-5", MODEL.lower(), MARK]), texts), max_size=4),
    st.just([MODEL] * 5000)))
int32_limits = mostly(st.sampled_from([0, 0, 2, 1000]), st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([-1, 1])))
int64_limits = mostly(st.sampled_from([0, 0, 1000, 10**9]),
                      st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([-1, 1, 3])))
budgets = mostly(st.sampled_from([0.0, 5.0, 1e6]), st.one_of(st.floats(), st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, -1.0, 5e-324, 1e-9, 1e308])))
tiers = mostly(st.sampled_from(["", "free", "premium", "pro"]), st.one_of(texts, st.sampled_from(["t" * 64, "t" * 65, MARK])))
periods = mostly(st.sampled_from(["", "none", "daily", "monthly"]), st.one_of(texts, st.sampled_from(["weekly", "Daily", MARK])))
create_key_requests = st.builds(
    gateway_pb2.CreateKeyRequest, tenant=tenants, models=model_lists, budget_usd=budgets, tier=tiers,
    budget_period=periods,
    limits=st.builds(gateway_pb2.KeyLimits, requests_per_minute=int32_limits, tokens_per_minute=int64_limits,
                     tokens_per_day=int64_limits, concurrent_requests=int32_limits))
hostile_key_ids = st.one_of(st.sampled_from(["000000000000", "0123456789ab",                  # no such key
                                             "", "0" * 11, "0" * 13, "ABCDEF012345", "*", "key:*", "00000000000\n",
                                             MARK, "f" * 100_000]), texts)
days = mostly(st.sampled_from(["", TODAY, "2026-01-01", "2024-02-29", "9999-12-31"]), st.one_of(st.sampled_from(
    ["2026-13-45", "2026-02-30", "2025-02-29", "2026-1-1", "20260101", "2026-W01-1", "26-01-01", "2026-01-01\n",
     " 2026-01-01", "٢٠٢٦-٠١-٠١", "0000-01-01", "2026/01/01", MARK, "9" * 100_000]), texts))


# ---- the services
@pytest.fixture(scope="module")
async def services(redis_server, make_engine, embedder):
    async with running_services(redis_server, make_engine("float32"), embedder, "fuzz-admin") as s:
        yield s


def credential(services, who: str) -> tuple[tuple, bool]:
    """(call metadata, whether it carries the admin token)."""
    token = ADMIN_TOKENS.get(who, OTHER_TOKENS.get(who))
    if who == "api key":
        token = f"Bearer {services.key}"
    return ((("authorization", token),) if token is not None else ()), who in ADMIN_TOKENS


async def call_admin(services, method: str, data: bytes, who: str) -> tuple[grpc.StatusCode, object]:
    """GatewayAdmin's `method` ("CreateKey") with `data` as the request and `who`'s credential."""
    rpc = raw(services.gateway_channel, f"/strata.v1.GatewayAdmin/{method}", getattr(gateway_pb2, f"{method}Response"))
    md, _ = credential(services, who)
    return await outcome(SEEN, method, lambda: rpc(data, metadata=md, timeout=CALL_TIMEOUT_S), ALLOWED)


async def create_key(services, tenant: str) -> gateway_pb2.CreateKeyResponse:
    return await gateway_pb2_grpc.GatewayAdminStub(services.gateway_channel).CreateKey(
        gateway_pb2.CreateKeyRequest(tenant=tenant), metadata=credential(services, "admin")[0], timeout=CALL_TIMEOUT_S)


async def generate(services, key: str, req: gateway_pb2.GatewayRequest, rpc: str):
    return await outcome(SEEN, rpc, lambda: gateway_pb2_grpc.GatewayStub(services.gateway_channel).Generate(
        req, metadata=(("authorization", f"Bearer {key}"),), timeout=CALL_TIMEOUT_S), ALLOWED)


def brief(msg) -> str:
    return str(msg)[:300]


# ---- what the API documents
def creatable(req: gateway_pb2.CreateKeyRequest) -> bool:
    lim = req.limits
    return (TENANT_RULE.fullmatch(req.tenant) is not None and set(req.models) <= {MODEL}
            and min(lim.requests_per_minute, lim.tokens_per_minute, lim.tokens_per_day, lim.concurrent_requests) >= 0
            and math.isfinite(req.budget_usd) and req.budget_usd >= 0 and req.tier in ("", *DEFAULT_TIERS)
            and req.budget_period in ("", "none", "daily", "monthly"))


def room_for_two_requests(req: gateway_pb2.CreateKeyRequest) -> bool:
    """Whether the key's limits and budget let two HELLOs through (a few tokens, a few micro-dollars each)."""
    lim = req.limits
    return ((lim.requests_per_minute == 0 or lim.requests_per_minute >= 2)
            and all(t == 0 or t >= 100 for t in (lim.tokens_per_minute, lim.tokens_per_day))
            and (req.budget_usd == 0 or req.budget_usd >= 1))


def a_date(day: str) -> bool:
    """YYYY-MM-DD (ASCII digits) naming a day of the calendar."""
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", day):
        return False
    try:
        dt.date(int(day[:4]), int(day[5:7]), int(day[8:]))
    except ValueError:
        return False
    return True


# ---- CreateKey
@SETTINGS
@given(data=mostly(create_key_requests.map(wire), garbage), who=credentials)
@example(data=wire(gateway_pb2.CreateKeyRequest(tenant="acme", budget_usd=math.nan)), who="admin")  # was a key
@example(data=wire(gateway_pb2.CreateKeyRequest(tenant="acme", budget_usd=math.inf)), who="admin")  # with no budget
@example(data=wire(gateway_pb2.CreateKeyRequest(tenant="acme", limits=gateway_pb2.KeyLimits(tokens_per_day=-1))),
         who="admin")                                                                   # was INTERNAL
@example(data=wire(gateway_pb2.CreateKeyRequest(tenant="acme\n")), who="admin")          # was a key the cache refused
async def test_create_key_creates_exactly_the_keys_its_rules_allow_and_each_serves(services, data, who):
    code, created = await call_admin(services, "CreateKey", data, who)
    if not parses(gateway_pb2.CreateKeyRequest, data):
        assert code == INVALID, code
        return
    req = gateway_pb2.CreateKeyRequest.FromString(data)
    admin = credential(services, who)[1]
    assert code == (UNAUTHENTICATED if not admin else OK if creatable(req) else INVALID), (code, brief(req))
    if code != OK:
        return
    assert KEY_ID_RULE.fullmatch(created.key_id) and created.key.startswith(f"sk-strata-{created.key_id}-"), created
    codes, answers = [], []
    for _ in range(2):                    # the model's answer, then the same from the tenant's cache
        code, answer = await generate(services, created.key, HELLO, "CreateKey: Generate")
        assert code == OK or (code == EXHAUSTED and not room_for_two_requests(req)), (code, brief(req))
        codes.append(code)
        answers.append(answer)
    if codes == [OK, OK]:
        assert answers[1].source.kind == common_pb2.Source.KIND_CACHE_EXACT, answers[1]
        assert answers[1].text == answers[0].text
    SERVED[created.key_id] = (codes.count(OK), sum(a is not None and a.source.kind == common_pb2.Source.KIND_CACHE_EXACT
                                                   for a in answers))


# ---- RevokeKey
@settings(SETTINGS, max_examples=35)
@given(key_id=mostly(st.just(FRESH), hostile_key_ids), corrupt=mostly(st.none(), garbage), who=credentials)
@example(key_id="000000000000", corrupt=None, who="admin")      # no such key
@example(key_id="key:*", corrupt=None, who="admin")             # was NOT_FOUND: any text went into a Redis key's name
async def test_revoke_key_revokes_a_key_only_for_the_admin_and_refuses_it_at_once(services, key_id, corrupt, who):
    fresh = await create_key(services, "revokee") if key_id == FRESH else None
    if fresh is not None:
        key_id = fresh.key_id
    data = wire(gateway_pb2.RevokeKeyRequest(key_id=key_id)) if corrupt is None else corrupt
    code, _ = await call_admin(services, "RevokeKey", data, who)
    if not parses(gateway_pb2.RevokeKeyRequest, data):
        expected = INVALID
    elif not credential(services, who)[1]:
        expected = UNAUTHENTICATED
    elif not KEY_ID_RULE.fullmatch(key_id):
        expected = INVALID
    else:
        expected = OK if fresh is not None else NOT_FOUND      # hypothesis does not guess a real id
    assert code == expected, (code, key_id[:100])
    if fresh is not None:                 # a request without a prompt: the key is checked before the request
        probe, _ = await generate(services, fresh.key, gateway_pb2.GatewayRequest(model=MODEL), "RevokeKey: probe")
        assert probe == (UNAUTHENTICATED if code == OK else INVALID), probe


# ---- UpdateKey, RotateKey, ListKeys and ListAudit
expiries = mostly(st.sampled_from([0.0, 4.0e9]), st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -1.0, 1.0])))
overlaps = mostly(st.sampled_from([0.0, 60.0, 3600.0]),
                  st.one_of(st.floats(), st.sampled_from([math.nan, -1.0, 1e12, 30 * 86_400 + 1.0])))


def settable(models, budget, tier, expires) -> bool:
    """Whether UpdateKey's given settings are ones a key may have (unset: None)."""
    return ((models is None or set(models) <= {MODEL}) and (tier is None or tier in ("", *DEFAULT_TIERS))
            and (budget is None or (math.isfinite(budget) and budget >= 0))
            and (expires is None or expires == 0 or (math.isfinite(expires) and expires > time.time() + 60)))


@settings(SETTINGS, max_examples=35)
@given(key_id=mostly(st.just(FRESH), hostile_key_ids), models=st.one_of(st.none(), model_lists),
       budget=st.one_of(st.none(), budgets), tier=st.one_of(st.none(), tiers), expires=st.one_of(st.none(), expiries),
       overlap=st.one_of(st.none(), overlaps), corrupt=mostly(st.none(), garbage), who=credentials)
async def test_update_and_rotate_change_a_key_only_for_the_admin_and_only_to_real_settings(
        services, key_id, models, budget, tier, expires, overlap, corrupt, who):
    fresh = await create_key(services, "updatee") if key_id == FRESH else None
    if fresh is not None:
        key_id = fresh.key_id
    req = gateway_pb2.UpdateKeyRequest(key_id=key_id)
    if models is not None:
        req.models.names.extend(models)
    for name, value in (("budget_usd", budget), ("tier", tier), ("expires_unix", expires)):
        if value is not None:
            setattr(req, name, value)
    data = wire(req) if corrupt is None else corrupt
    md, admin = credential(services, who)
    rpc = raw(services.gateway_channel, "/strata.v1.GatewayAdmin/UpdateKey", gateway_pb2.KeyInfo)
    code, info = await outcome(SEEN, "UpdateKey", lambda: rpc(data, metadata=md, timeout=CALL_TIMEOUT_S), ALLOWED)
    known_settings = models is None or set(models) <= {MODEL}, tier is None or tier in ("", *DEFAULT_TIERS)
    if not parses(gateway_pb2.UpdateKeyRequest, data):
        expected = INVALID
    elif not admin:
        expected = UNAUTHENTICATED
    elif not KEY_ID_RULE.fullmatch(key_id) or not all(known_settings):
        expected = INVALID
    elif fresh is None:
        expected = NOT_FOUND                                  # hypothesis does not guess a real id
    else:
        expected = OK if settable(models, budget, tier, expires) else INVALID
    assert code == expected, (code, key_id[:100], models and models[:3], budget, tier and tier[:70], expires)
    if code == OK:
        assert info.key_id == key_id and (models is None or list(info.models) == list(dict.fromkeys(models))), info
        assert budget is None or info.budget_usd == budget
    if fresh is None or not admin:
        return
    rotate = gateway_pb2.RotateKeyRequest(key_id=key_id)
    if overlap is not None:
        rotate.overlap_s = overlap
    code, rotated = await call_admin(services, "RotateKey", wire(rotate), who)
    valid = overlap is None or (math.isfinite(overlap) and 0 <= overlap <= 30 * 86_400)
    assert code == (OK if valid else INVALID), (code, overlap)
    if code == OK:
        assert rotated.key.startswith(f"sk-strata-{key_id}-") and rotated.info.rotated_unix > 0
    listed = await gateway_pb2_grpc.GatewayAdminStub(services.gateway_channel).ListKeys(
        gateway_pb2.ListKeysRequest(tenant="updatee"), metadata=md, timeout=CALL_TIMEOUT_S)
    assert key_id in {k.key_id for k in listed.keys} and fresh.key not in str(listed)
    audit = await gateway_pb2_grpc.GatewayAdminStub(services.gateway_channel).ListAudit(
        gateway_pb2.ListAuditRequest(key_id=key_id), metadata=md, timeout=CALL_TIMEOUT_S)
    assert audit.entries[-1].action == "create" and fresh.key not in str(audit)
    assert [e.action for e in audit.entries[:-1]] == ["rotate"] * (code == OK) + ["update"] * (expected == OK)


# ---- GetUsage
@settings(SETTINGS, max_examples=35)
@given(key_id=mostly(st.sampled_from([CREATED, CREATED, "000000000000"]), hostile_key_ids), day=days,
       corrupt=mostly(st.none(), garbage), who=credentials)
@example(key_id="000000000000", day="", corrupt=None, who="admin")         # no such key (was OK, all zeros)
@example(key_id=CREATED, day="2026-13-45", corrupt=None, who="admin")      # no such day (the same)
@example(key_id=CREATED, day="2026-02-30", corrupt=None, who="admin")
@example(key_id=CREATED, day="2026-01-01\n", corrupt=None, who="admin")
async def test_get_usage_counts_what_a_keys_requests_did_and_refuses_what_is_no_key_or_no_day(
        services, key_id, day, corrupt, who):
    answered = cached = 0
    known = key_id == CREATED             # hypothesis does not guess a real id
    if known:
        if SERVED:                        # the CreateKey test's keys, with what their requests did
            key_id, (answered, cached) = sorted(SERVED.items())[len(day) % len(SERVED)]
        else:
            key_id = (await create_key(services, "unused")).key_id
    today = utc_day()
    day = today if day == TODAY else day
    data = wire(gateway_pb2.GetUsageRequest(key_id=key_id, day=day)) if corrupt is None else corrupt
    code, usage = await call_admin(services, "GetUsage", data, who)
    if not parses(gateway_pb2.GetUsageRequest, data):
        expected = INVALID
    elif not credential(services, who)[1]:
        expected = UNAUTHENTICATED
    elif (day and not a_date(day)) or not KEY_ID_RULE.fullmatch(key_id):
        expected = INVALID
    else:
        expected = OK if known else NOT_FOUND
    assert code == expected, (code, key_id[:100], day[:100])
    if code != OK:
        return
    assert usage.key_id == key_id and usage.day == (day or today), usage
    if usage.day != today:
        answered = cached = 0
    assert (usage.requests, usage.cache_hits) == (answered, cached), (usage, answered, cached)
    assert min(usage.prompt_tokens, usage.completion_tokens) >= 0 and 0 <= usage.spend_usd <= usage.total_spend_usd


# ---- ListModels
@settings(SETTINGS, max_examples=30)
@given(data=st.one_of(st.just(b""), st.binary(max_size=60), garbage,
                     create_key_requests.map(wire)),          # another message: each field unknown, skipped
       who=credentials)
async def test_list_models_lists_the_served_models_to_the_admin_only(services, data, who):
    code, listed = await call_admin(services, "ListModels", data, who)
    if not parses(gateway_pb2.ListModelsRequest, data):
        assert code == INVALID, code
    elif not credential(services, who)[1]:
        assert code == UNAUTHENTICATED, code
    else:
        assert code == OK and [m.name for m in listed.models] == [MODEL], (code, listed)
        assert all(m.usd_per_1k_prompt_tokens >= 0 and m.usd_per_1k_completion_tokens >= 0 for m in listed.models)


# ---- afterwards
async def test_after_the_fuzzing_everything_still_serves_and_every_block_is_free(services):
    await still_serving(services)
    code, answer = await generate(services, services.key, HELLO, "afterwards")
    assert code == OK and answer.text, code
    await settled(lambda: assert_all_blocks_free(services.engine))
    for rpc in ("CreateKey", "RevokeKey", "GetUsage", "ListModels"):   # answers and each kind of refusal
        assert SEEN[rpc, "OK"] >= 3 and SEEN[rpc, "INVALID_ARGUMENT"] >= 3 and SEEN[rpc, "UNAUTHENTICATED"] >= 2, SEEN
    assert SEEN["RevokeKey", "NOT_FOUND"] >= 1 and SEEN["GetUsage", "NOT_FOUND"] >= 1, SEEN
    assert len(SERVED) >= 3 and SEEN["CreateKey: Generate", "OK"] >= 6, (SERVED, SEEN)
    print(dict(SEEN))
