"""A key-value store capped per team, in entries and in bytes.

The response cache and the idempotency store both keep whatever a team's requests
produce; without a cap one team could fill Redis (and, on a Redis with `noeviction`,
make every budget write fail). Each team has an index of its entries in insertion
order (a sorted set) and their sizes (a hash with a running total): storing an entry
first evicts the team's oldest entries until the new one fits, all in one Lua script,
so concurrent writers never overshoot. Only the team's own entries are evicted. An
entry larger than the byte cap on its own is not stored at all.

An entry that expired by its TTL (or that an LRU policy evicted) stays in the index
until it is the oldest and gets evicted, so it can only make the cap feel smaller
for a while, never let the team grow past it. The index and the sizes live as long
as the longest entry stored in them, then expire with it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from core import redis_client
from core.backends import Backend, LuaScripts

# The running total's field in the sizes hash; members are Redis key names ("gw:…").
_TOTAL = "#bytes"

_SET_LUA = """
local item, index, sizes = KEYS[1], KEYS[2], KEYS[3]
local ttl = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local max_entries = tonumber(ARGV[4])
local max_bytes = tonumber(ARGV[5])
if ARGV[6] == '1' and redis.call('EXISTS', item) == 1 then
  return 0
end
local size = string.len(ARGV[1]) + string.len(item)
local total = tonumber(redis.call('HGET', sizes, '#bytes') or '0')
-- Replacing an entry: its old bytes stop counting.
local old = redis.call('HGET', sizes, item)
if old then
  total = total - tonumber(old)
  redis.call('HDEL', sizes, item)
  redis.call('ZREM', index, item)
end
if size > max_bytes then
  redis.call('DEL', item)
  redis.call('HSET', sizes, '#bytes', math.max(total, 0))
  return -1
end
local count = redis.call('ZCARD', index)
while count > 0 and (count >= max_entries or total + size > max_bytes) do
  local victim = redis.call('ZRANGE', index, 0, 0)[1]
  total = total - tonumber(redis.call('HGET', sizes, victim) or '0')
  redis.call('DEL', victim)
  redis.call('HDEL', sizes, victim)
  redis.call('ZREM', index, victim)
  count = count - 1
end
redis.call('SET', item, ARGV[1], 'EX', ttl)
redis.call('ZADD', index, now, item)
redis.call('HSET', sizes, item, size, '#bytes', math.max(total, 0) + size)
if redis.call('TTL', index) < ttl then
  redis.call('EXPIRE', index, ttl)
end
if redis.call('TTL', sizes) < ttl then
  redis.call('EXPIRE', sizes, ttl)
end
return 1
"""

_DELETE_LUA = """
local old = redis.call('HGET', KEYS[3], KEYS[1])
if old then
  redis.call('HINCRBY', KEYS[3], '#bytes', -tonumber(old))
  redis.call('HDEL', KEYS[3], KEYS[1])
  redis.call('ZREM', KEYS[2], KEYS[1])
end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True)
class Caps:
    max_entries: int
    max_bytes: int


STORED = 1
EXISTS = 0  # set_nx only: the key is already taken
TOO_LARGE = -1


class RedisCappedStore:
    """The capped store on one of the gateway's Redis roles."""

    def __init__(self, prefix: str, client: Callable[[], aioredis.Redis]) -> None:
        self.prefix = prefix
        self._scripts = LuaScripts(client, _SET_LUA, _DELETE_LUA)

    def _index_keys(self, team_id: int) -> list[str]:
        return [f"{self.prefix}:idx:{team_id}", f"{self.prefix}:sz:{team_id}"]

    async def set(
        self, team_id: int, key: str, value: bytes, ttl: int, caps: Caps, *, nx: bool = False
    ) -> int:
        """STORED, EXISTS (nx and the key is taken) or TOO_LARGE (nothing stored)."""
        _, set_script, _ = self._scripts.get()
        args = [value, ttl, time.time_ns(), caps.max_entries, caps.max_bytes, int(nx)]
        keys = [key, *self._index_keys(team_id)]
        return int(await redis_client.guarded(set_script(keys=keys, args=args)))

    async def get(self, team_id: int, key: str) -> bytes | None:
        client, _, _ = self._scripts.get()
        value = await redis_client.guarded(client.get(key))
        return value.encode() if isinstance(value, str) else value

    async def delete(self, team_id: int, key: str) -> None:
        _, _, delete_script = self._scripts.get()
        await redis_client.guarded(delete_script(keys=[key, *self._index_keys(team_id)]))


@dataclass
class _Team:
    # key → (value, monotonic expiry, size), oldest first.
    items: OrderedDict[str, tuple[bytes, float, int]] = field(default_factory=OrderedDict)
    total: int = 0


class LocalCappedStore:
    """The same caps in the process, for the embedded default without Redis.

    No method awaits between its reads and writes, so the event loop makes each
    one atomic, as the Lua script is in Redis.
    """

    def __init__(self) -> None:
        self.teams: dict[int, _Team] = {}

    def _pop(self, team: _Team, key: str) -> None:
        found = team.items.pop(key, None)
        if found is not None:
            team.total -= found[2]

    async def set(
        self, team_id: int, key: str, value: bytes, ttl: int, caps: Caps, *, nx: bool = False
    ) -> int:
        team = self.teams.setdefault(team_id, _Team())
        now = time.monotonic()
        found = team.items.get(key)
        if nx and found is not None and found[1] > now:
            return EXISTS
        self._pop(team, key)
        size = len(value) + len(key)
        if size > caps.max_bytes:
            return TOO_LARGE
        while team.items and (
            len(team.items) >= caps.max_entries or team.total + size > caps.max_bytes
        ):
            self._pop(team, next(iter(team.items)))
        team.items[key] = (value, now + ttl, size)
        team.total += size
        return STORED

    async def get(self, team_id: int, key: str) -> bytes | None:
        team = self.teams.get(team_id)
        found = team.items.get(key) if team is not None else None
        return found[0] if found is not None and found[1] > time.monotonic() else None

    async def delete(self, team_id: int, key: str) -> None:
        team = self.teams.get(team_id)
        if team is not None:
            self._pop(team, key)


CappedStore = LocalCappedStore | RedisCappedStore


def capped_store(prefix: str, client: Callable[[], aioredis.Redis]) -> Backend[CappedStore]:
    """The store for keys under `prefix`: on the given Redis role, or in the process."""
    return Backend(redis=lambda: RedisCappedStore(prefix, client), local=LocalCappedStore)
