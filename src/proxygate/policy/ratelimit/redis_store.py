"""Leaky buckets in Redis, shared by every gateway replica.

One Lua script per check does the whole read-drain-decide-write atomically,
with the time taken from the Redis server (`TIME`), so replicas whose clocks
disagree still agree on every bucket. Keys carry a hash tag per client
(`pg:rl:{client}`), so the script touches one slot and runs on Redis Cluster.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .bucket import BucketSpec, Decision

log = logging.getLogger("proxygate.ratelimit")

# KEYS[1] bucket; ARGV: capacity, rate (units/s), cost.
# Returns {allowed, level-as-string} (a Lua number would be truncated to an integer).
LEAKY_BUCKET_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level = tonumber(state[1]) or 0
local last = tonumber(state[2]) or now
local elapsed = now - last
if elapsed < 0 then elapsed = 0 end
level = level - elapsed * rate
if level < 0 then level = 0 end
local allowed = 0
if level + cost <= capacity + 1e-9 then
  level = level + cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'level', string.format('%.17g', level), 'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(level / rate * 1000) + 1000)
return {allowed, string.format('%.17g', level)}
"""


class LimiterUnavailable(Exception):
    """The shared store could not be asked in time."""


def parse_redis_addr(addr: str) -> tuple[str, int]:
    if addr.startswith("["):
        host, _, port = addr[1:].partition("]:")
    else:
        host, _, port = addr.rpartition(":")
    return host or "localhost", int(port or 6379)


class RedisLimiter:
    name = "redis"

    def __init__(self, spec: BucketSpec, addr: str, timeout: float = 0.25, max_connections: int = 64) -> None:
        self.spec = spec
        host, port = parse_redis_addr(addr)
        self.addr = f"{host}:{port}"
        pool = aioredis.BlockingConnectionPool(
            host=host,
            port=port,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self.client: Any = aioredis.Redis(connection_pool=pool)
        self._script = self.client.register_script(LEAKY_BUCKET_LUA)
        self._capacity = str(spec.capacity)
        self._rate = repr(spec.rate)

    async def ping(self) -> None:
        """Raises LimiterUnavailable when Redis cannot be reached (used at start)."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"cannot reach Redis at {self.addr}: {exc}") from None

    async def check(self, key: str) -> Decision:
        try:
            allowed, level = await self._script(keys=[f"pg:rl:{{{key}}}"], args=[self._capacity, self._rate, "1"])
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(str(exc) or type(exc).__name__) from None
        return self.spec.decision(bool(allowed), float(level))

    async def aclose(self) -> None:
        await self.client.aclose()
