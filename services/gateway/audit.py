"""The audit log of admin actions: an append-only Redis stream (`strata:gw:audit`), one entry per action on
an API key (create, update, rotate, revoke) or a tenant's budget (tenant_budget, with key_id ""): who did it
(the admin credential's id), what, when, and the record before and after. Entries never hold a key, a secret or a hash (`key_view` is what is kept).
KeyStore writes each entry in the same MULTI as the change it records, so an action is never unaudited;
nothing ever trims or deletes the stream."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.common.errors import InvalidArgumentError

MAX_AUDIT_PAGE = 1000
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    entry_id: str                 # the stream id ("<ms>-<seq>"): later entries sort after
    at_s: float                   # unix time
    actor: str                    # the admin credential's id
    action: str                   # create | update | rotate | revoke
    key_id: str
    before: dict[str, Any] | None # the key's record (key_view) before the action; None for create
    after: dict[str, Any] | None


def entry_fields(actor: str, action: str, key_id: str, before: dict | None, after: dict | None) -> dict[str, str]:
    return {"at": repr(time.time()), "actor": actor, "action": action, "key_id": key_id,
            "before": json.dumps(before, sort_keys=True), "after": json.dumps(after, sort_keys=True)}


class AuditLog:
    def __init__(self, redis: aioredis.Redis, prefix: str = "strata:gw:") -> None:
        self.redis = redis
        self.stream = prefix + "audit"

    async def list(self, key_id: str = "", before_id: str = "", limit: int = 100) -> tuple[list[AuditEntry], str]:
        """Entries newest first (only `key_id`'s when given), older than `before_id` when given; and the id to
        pass as before_id for the next page ("" when there is none)."""
        if before_id and not _STREAM_ID.fullmatch(before_id):
            raise InvalidArgumentError("before_id must be an entry id a ListAudit page gave (<ms>-<seq>)")
        limit = max(1, min(limit or 100, MAX_AUDIT_PAGE))
        out: list[AuditEntry] = []
        end = f"({before_id}" if before_id else "+"
        while len(out) < limit:
            batch = await self.redis.xrevrange(self.stream, max=end, min="-", count=max(limit, 100))
            if not batch:
                return out, ""
            for raw_id, fields in batch:
                d = {k.decode(): v.decode() for k, v in fields.items()}
                entry_id = raw_id.decode()
                end = f"({entry_id}"
                if key_id and d.get("key_id") != key_id:
                    continue
                out.append(AuditEntry(entry_id, float(d["at"]), d["actor"], d["action"], d["key_id"],
                                      json.loads(d["before"]), json.loads(d["after"])))
                if len(out) == limit:
                    return out, entry_id
        return out, ""
