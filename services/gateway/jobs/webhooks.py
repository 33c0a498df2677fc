"""Webhooks: a job's end POSTed to its URL, signed.

Headers: `Strata-Webhook-Id: <job id>` (the same on every retry: a receiver deduplicates by it) and
`Strata-Signature: t=<unix seconds>,hmac-sha256=<hex>`, the HMAC-SHA256 under the job's webhook secret of
`<t>.<body>`. A receiver recomputes it over the raw body and refuses a timestamp older than a few minutes
(`verify`), so that a captured delivery cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx

SIGNATURE_HEADER = "Strata-Signature"
ID_HEADER = "Strata-Webhook-Id"
ALGORITHM = "hmac-sha256"


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    """The signature header's value for `body` at time `t` (now)."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},{ALGORITHM}={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Whether `header` signs `body` under `secret` within `tolerance_s` of now."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
        given = parts[ALGORITHM]
    except (KeyError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, t).encode(), f"t={t},{ALGORITHM}={given}".encode())


async def deliver(client: httpx.AsyncClient, url: str, secret: str, job_id: str, body: bytes,
                  timeout_s: float) -> tuple[int, str]:
    """POST once: (the HTTP status, 0 when there was no answer; an error's description, "" when none)."""
    headers = {"Content-Type": "application/json", ID_HEADER: job_id, SIGNATURE_HEADER: sign(secret, body)}
    try:
        r = await client.post(url, content=body, headers=headers, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure to send is a failed delivery, recorded and retried
        return 0, f"{type(exc).__name__}: {str(exc).replace(url, '<url>')}"[:300]
    return r.status_code, "" if r.is_success else f"HTTP {r.status_code}"
