"""Every service's Redis connection from one URL: a single server as redis-py reads it (redis://, rediss://,
unix://), or a master watched by Redis Sentinel, through redis-py's own Sentinel support:

    redis+sentinel://[:password@]host:port[,host:port...]/<master name>[/<db>]

The client asks the sentinels for the master and asks again whenever a connection fails, so after a failover
(a replica promoted) it reaches the new master on its next connection; commands in flight at the failover fail
as they would against a server that went away (the services' own retry and fail-open rules apply). The password
is the data servers' (the sentinels are asked without one). Redis Cluster URLs are not served yet: several Lua
scripts touch keys that would land in different slots."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"


def connect(url: str, **kwargs) -> aioredis.Redis:
    """A client for `url` (see the module's docstring); `kwargs` go to every connection (socket_timeout, ...)."""
    parts = urlsplit(url)
    if parts.scheme == "redis+cluster":
        raise ValueError("Redis Cluster URLs are not served yet; use a single server or redis+sentinel://")
    if parts.scheme != SENTINEL_SCHEME:
        return aioredis.from_url(url, **kwargs)
    hosts, service, db = parse_sentinel(url)
    password = unquote(parts.password) if parts.password else None
    sentinel = Sentinel(hosts, sentinel_kwargs={k: v for k, v in kwargs.items() if k.startswith("socket")}, **kwargs)
    return sentinel.master_for(service, db=db, password=password)


def parse_sentinel(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """(the sentinels' (host, port), the master's name, the db) of a redis+sentinel:// URL; ValueError naming
    what is wrong."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{SENTINEL_SCHEME}:// wants host:port[,host:port...], got {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{SENTINEL_SCHEME}:// wants /<master name>[/<db>] after the sentinels")
    return hosts, unquote(path[0]), int(path[1]) if len(path) == 2 else 0
