"""Every service's Redis connection from one URL: a single server as redis-py reads it (redis://, rediss://,
unix://), or a master watched by Redis Sentinel, through redis-py's own Sentinel support:

    redis+sentinel://[:password@]host:port[,host:port...]/<master name>[/<db>]

The client asks the sentinels for the master and asks again whenever a connection fails, so after a failover
(a replica promoted) it reaches the new master on its next connection; commands in flight at the failover fail
as they would against a server that went away (the services' own retry and fail-open rules apply). The password
is the data servers' (the sentinels are asked without one).

A Redis Cluster, through redis-py's RedisCluster (it learns the slots from the nodes given and follows MOVED and
ASK redirections):

    redis+cluster://[:password@]host:port[,host:port...]

Lua scripts and transactions may only touch keys of one hash slot, so on a cluster each keyspace's prefix is
hash-tagged (`keyspace`): every key of the gateway (keys, limits, usage, budgets, audit, jobs) lands in the slot
of `{strata:gw}`, every key of the cache in that of `{strata:cache}`. A keyspace is then served by one shard (and
its replicas): a cluster buys failover there, and room for the other keyspaces, not sharding of one keyspace. One
Redis shard answers on the order of 100,000 simple commands a second; the gateway makes a few per request, and
writes usage in batches."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"


def connect(url: str, **kwargs) -> aioredis.Redis | RedisCluster:
    """A client for `url` (see the module's docstring); `kwargs` go to every connection (socket_timeout, ...)."""
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    if parts.scheme == CLUSTER_SCHEME:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in parse_cluster(url)], password=password,
                            **kwargs)
    if parts.scheme != SENTINEL_SCHEME:
        return aioredis.from_url(url, **kwargs)
    hosts, service, db = parse_sentinel(url)
    sentinel = Sentinel(hosts, sentinel_kwargs={k: v for k, v in kwargs.items() if k.startswith("socket")}, **kwargs)
    return sentinel.master_for(service, db=db, password=password)


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def keyspace(client: aioredis.Redis | RedisCluster, prefix: str) -> str:
    """The prefix a keyspace's keys get on `client`: `prefix` itself, or on a cluster its hash-tagged form
    ("strata:gw:" -> "{strata:gw}:"), which puts all of them in one slot."""
    return "{" + prefix.rstrip(":") + "}:" if isinstance(client, RedisCluster) else prefix


def _hosts(url: str, scheme: str) -> list[tuple[str, int]]:
    netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{scheme}:// wants host:port[,host:port...], got {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def parse_cluster(url: str) -> list[tuple[str, int]]:
    """The nodes of a redis+cluster:// URL (any of the cluster's nodes: the client learns the rest)."""
    if [p for p in urlsplit(url).path.split("/") if p]:
        raise ValueError(f"{CLUSTER_SCHEME}:// takes no path: a cluster has one database")
    return _hosts(url, CLUSTER_SCHEME)


def parse_sentinel(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """(the sentinels' (host, port), the master's name, the db) of a redis+sentinel:// URL; ValueError naming
    what is wrong."""
    parts = urlsplit(url)
    hosts = _hosts(url, SENTINEL_SCHEME)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{SENTINEL_SCHEME}:// wants /<master name>[/<db>] after the sentinels")
    return hosts, unquote(path[0]), int(path[1]) if len(path) == 2 else 0
