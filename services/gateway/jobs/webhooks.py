"""Webhooks: a job's end POSTed to its URL, signed.

Headers: `Strata-Webhook-Id: <job id>` (the same on every retry: a receiver deduplicates by it) and
`Strata-Signature: t=<unix seconds>,hmac-sha256=<hex>`, the HMAC-SHA256 under the job's webhook secret of
`<t>.<body>`. A receiver recomputes it over the raw body and refuses a timestamp older than a few minutes
(`verify`), so that a captured delivery cannot be replayed later.

Destinations: the URL is a tenant's, and the gateway sits inside the operator's network, so a webhook goes
only to public addresses unless the gateway runs with --webhook-allow-private. The host is resolved at each
delivery, every address it resolves to must be allowed, and the request is sent to the address that was
checked (the Host header and TLS name stay the URL's), so a DNS answer that changes between the check and the
connection (rebinding) cannot redirect it. Redirects are not followed, and each delivery has a connection of its
own (`Connection: close`): two names resolving to one address must not share a TLS connection verified for one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
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


class DestinationRefused(ValueError):
    """The webhook's host is, or resolves to, an address this gateway does not send to."""


def address_allowed(address: str, allow_private: bool) -> bool:
    """Whether a webhook may go to this IP address: a public unicast one, or any when `allow_private`."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if allow_private:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def literal_refused(host: str, allow_private: bool) -> str:
    """Why a URL's host is refused without resolving it ("" when it is not): an IP literal outside the allowed
    addresses, or localhost."""
    if allow_private:
        return ""
    if host.rstrip(".").lower() == "localhost" or host.lower().endswith(".localhost"):
        return "localhost"
    try:
        return "" if address_allowed(host, False) else "a private, loopback, link-local or reserved address"
    except ValueError:
        return ""                                        # a name: resolved and checked at each delivery


async def resolve_allowed(host: str, port: int, allow_private: bool) -> str:
    """The address to send to: the first the host resolves to, once every address it resolves to is allowed."""
    why = literal_refused(host, allow_private)
    if why:
        raise DestinationRefused(f"the webhook host is {why}")
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise DestinationRefused("the webhook host resolves to no address")
    if not all(address_allowed(a, allow_private) for a in addresses):
        raise DestinationRefused("the webhook host resolves to a private, loopback, link-local or reserved address "
                                 "(a gateway started with --webhook-allow-private sends there)")
    return addresses[0]


async def deliver(client: httpx.AsyncClient, url: str, secret: str, job_id: str, body: bytes,
                  timeout_s: float, allow_private: bool = False) -> tuple[int, str]:
    """POST once: (the HTTP status, 0 when there was no answer; an error's description, "" when none). A
    destination that is not allowed is answered with status 0 and the reason, and nothing is sent."""
    headers = {"Content-Type": "application/json", ID_HEADER: job_id, SIGNATURE_HEADER: sign(secret, body)}
    try:
        parsed = httpx.URL(url)
        address = await resolve_allowed(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80),
                                        allow_private)
        headers["Host"] = parsed.netloc.decode("ascii")
        # a connection to the checked address, never reused: a client pools connections by address, and one that
        # was verified for another name resolving to it must not carry this one
        headers["Connection"] = "close"
        extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
        r = await client.post(parsed.copy_with(host=address), content=body, headers=headers, timeout=timeout_s,
                              extensions=extensions, follow_redirects=False)
    except DestinationRefused as exc:
        return 0, f"refused: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure to send is a failed delivery, recorded and retried
        return 0, f"{type(exc).__name__}: {str(exc).replace(url, '<url>')}"[:300]
    return r.status_code, "" if r.is_success else f"HTTP {r.status_code}"
