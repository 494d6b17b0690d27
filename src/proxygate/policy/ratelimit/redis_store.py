"""Leaky buckets in Redis, shared by every gateway replica.

One Lua script per check does the whole read-drain-decide-write atomically,
with the time taken from the Redis server (`TIME`), so replicas whose clocks
disagree still agree on every bucket. Keys carry a hash tag per client
(`pg:rl:{client}`), so the script touches one slot and runs on Redis Cluster.
"""

from __future__ import annotations

import logging

from .bucket import BucketSpec, Decision
from .redis_client import PipelinedRedis, RedisUnavailable, Script
from .resp import RespError

log = logging.getLogger("proxygate.ratelimit")

# KEYS[1] bucket; ARGV: capacity, rate (units/s), cost, force (1: charge whatever
# the level, and a negative cost gives units back).
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
if ARGV[4] == '1' then
  level = level + cost
  if level < 0 then level = 0 end
  allowed = 1
elseif level + cost <= capacity + 1e-9 then
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

    def __init__(self, spec: BucketSpec, addr: str, timeout: float = 0.25, connections: int = 4) -> None:
        self.spec = spec
        host, port = parse_redis_addr(addr)
        self.addr = f"{host}:{port}"
        self.client = PipelinedRedis(host, port, timeout, connections)
        self._script = Script(self.client, LEAKY_BUCKET_LUA)
        self._args = [str(spec.capacity), repr(spec.rate), "1", "0"]

    async def ping(self) -> None:
        """Raises LimiterUnavailable when Redis cannot be reached (used at start)."""
        try:
            await self.client.call("PING")
        except (RedisUnavailable, RespError) as exc:
            raise LimiterUnavailable(f"cannot reach Redis at {self.addr}: {exc}") from None

    async def check(self, key: str) -> Decision:
        allowed, level = await self._run(key, self._args)
        return self.spec.decision(allowed, level)

    async def charge(self, key: str, spec: BucketSpec, cost: float, force: bool) -> tuple[bool, float]:
        """Add `cost` to the bucket `key` of shape `spec` (see BucketSpec.charge); (allowed, level)."""
        return await self._run(key, [str(spec.capacity), repr(spec.rate), repr(cost), "1" if force else "0"])

    async def _run(self, key: str, args: list[str]) -> tuple[bool, float]:
        try:
            reply = await self._script(keys=[f"pg:rl:{{{key}}}"], args=args)
        except (RedisUnavailable, RespError) as exc:
            raise LimiterUnavailable(str(exc)) from None
        if not isinstance(reply, list) or len(reply) != 2:
            raise LimiterUnavailable(f"unexpected reply from the rate-limit script: {reply!r}")
        allowed, level = reply
        return allowed == 1, float(level)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        await self.client.aclose()
