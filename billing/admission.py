"""Admission: budgets that cannot be overspent, and per-minute rate limits.

Before a request reaches a provider, its maximum possible cost is reserved against
every budget that applies (key and team) and its request/token counts against
every rate limit, all in one atomic step: a Lua script in Redis, or, on the
embedded default (one process, no Redis), the same arithmetic in the event loop,
which nothing else can interleave with. After the call the reservation is settled
with the actual cost and the rest released. However many requests arrive at once,
spent + reserved never passes a limit.

Counters live per budget period (`gw:bud:t:<team>:<period>`), so a new period
starts from zero by itself. A counter that does not exist yet (a new period, or a
Redis that lost its data) is first filled from the ledger, which stays the source
of truth.

A reservation lives as long as its request: it is leased for
GATEWAY_RESERVATION_LEASE_SECONDS, and one renewer task per process extends the
lease of every reservation the process still holds (one Redis call for all of
them), whatever the request is doing: streaming for minutes, retrying, waiting
out a Retry-After. Only when the holding process is gone do the renewals stop;
the next admission after the lease sweeps the reservation, so a crash never turns
into a permanent false refusal.

Fail policy: when Redis cannot be reached within GATEWAY_REDIS_TIMEOUT_SECONDS, a
key that has a budget or a rate limit (its own or its team's) is refused with 503
`budget_service_unavailable`; a key with neither never touches Redis.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import secrets
import time
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.http.response import HttpResponseBase

from billing import alerts, selectors
from billing.periods import Period, current_period
from billing.pricing import Prices, max_cost_micro_usd, micro_usd_to_str
from core import redis_client
from core.aio import spawn
from core.backends import Backend, LuaScripts
from core.db import run_db
from core.errors import GatewayError

if TYPE_CHECKING:
    from accounts.auth import KeyPrincipal

logger = logging.getLogger(__name__)

RESERVATIONS_ZSET = "gw:res:exp"
RESERVATIONS_HASH = "gw:res:val"


@dataclass(frozen=True, slots=True)
class Budget:
    scope: str  # "key" | "team"
    owner_id: int
    limit_micro_usd: int
    period_kind: str
    period: Period

    @property
    def redis_key(self) -> str:
        letter = "k" if self.scope == "key" else "t"
        return f"gw:bud:{letter}:{self.owner_id}:{self.period.id}"


@dataclass(frozen=True, slots=True)
class Limit:
    scope: str  # "key" | "team"
    kind: str  # "requests" | "tokens"
    limit: int
    amount: int
    window_start: int  # epoch seconds of the current minute

    @property
    def redis_key(self) -> str:
        letter = "k" if self.scope == "key" else "t"
        return f"gw:rl:{letter}:{self.kind}:{self.window_start}"


@dataclass
class Ticket:
    """What admission handed out for one request, and what settling it needs."""

    reservation_id: str
    amount: int
    budgets: list[Budget]
    team_id: int = 0
    thresholds: list[int] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    # The budget keys of a reservation admitted by another process (a native batch's,
    # settled by whichever worker downloads its results), stored instead of `budgets`.
    stored_keys: tuple[str, ...] = ()

    @property
    def budget_keys(self) -> list[str]:
        if self.stored_keys:
            return list(self.stored_keys)
        return [b.redis_key for b in self.budgets]


NO_TICKET_NEEDED = ""


def _budgets(principal: KeyPrincipal, now: datetime) -> list[Budget]:
    budgets = []
    if principal.key_budget_micro_usd is not None:
        budgets.append(
            Budget(
                "key",
                principal.key_id,
                principal.key_budget_micro_usd,
                principal.key_budget_period,
                current_period(principal.key_budget_period, principal.team_timezone, now),
            )
        )
    if principal.team_budget_micro_usd is not None:
        budgets.append(
            Budget(
                "team",
                principal.team_id,
                principal.team_budget_micro_usd,
                principal.team_budget_period,
                current_period(principal.team_budget_period, principal.team_timezone, now),
            )
        )
    return budgets


def _limits(principal: KeyPrincipal, tokens: int, now_s: float) -> list[Limit]:
    window = int(now_s // 60) * 60
    out = []
    for scope, owner, rpm, tpm in (
        ("key", principal.key_id, principal.key_rpm_limit, principal.key_tpm_limit),
        ("team", principal.team_id, principal.team_rpm_limit, principal.team_tpm_limit),
    ):
        if rpm:
            out.append(Limit(scope, f"requests:{owner}", rpm, 1, window))
        if tpm:
            out.append(Limit(scope, f"tokens:{owner}", tpm, tokens, window))
    return out


def _reset_text(seconds: float) -> str:
    # OpenAI's x-ratelimit-reset-* format: "6m0s", "20ms", "1s".
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _rate_headers(limits: list[Limit], used_after: list[int], now_s: float) -> dict[str, str]:
    headers: dict[str, str] = {}
    reset = _reset_text(60 - (now_s % 60))
    for kind in ("requests", "tokens"):
        tightest: tuple[int, int] | None = None
        for limit, used in zip(limits, used_after, strict=True):
            if limit.kind.split(":")[0] != kind:
                continue
            remaining = max(0, limit.limit - used)
            if tightest is None or remaining < tightest[1]:
                tightest = (limit.limit, remaining)
        if tightest is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(tightest[0])
            headers[f"x-ratelimit-remaining-{kind}"] = str(tightest[1])
            headers[f"x-ratelimit-reset-{kind}"] = reset
    return headers


def _budget_refusal(budget: Budget, spent: int, reserved: int, amount: int) -> GatewayError:
    who = "This key's" if budget.scope == "key" else "The team's"
    period = "one-off credit" if budget.period_kind == "total" else f"{budget.period_kind} budget"
    reset = (
        f"It resets at {budget.period.end.isoformat()}."
        if budget.period.end
        else "It does not reset: ask an admin to add credit."
    )
    return GatewayError(
        f"{who} {period} of ${micro_usd_to_str(budget.limit_micro_usd)} is exhausted: "
        f"${micro_usd_to_str(spent)} spent and ${micro_usd_to_str(reserved)} reserved by requests "
        f"in flight; this request may cost up to ${micro_usd_to_str(amount)}. {reset} "
        "A smaller max_tokens needs less headroom.",
        429,
        "insufficient_quota",
        f"{budget.scope}_budget_exceeded",
    )


def _rate_refusal(limit: Limit, retry_after_s: float) -> GatewayError:
    kind = limit.kind.split(":")[0]
    who = "this key" if limit.scope == "key" else "this key's team"
    unit = "requests" if kind == "requests" else "tokens (prompt plus max output)"
    wait = max(1, math.ceil(retry_after_s))
    return GatewayError(
        f"Rate limit reached for {who}: {limit.limit} {unit} per minute. Retry after {wait}s.",
        429,
        "rate_limit_exceeded" if kind == "requests" else "tokens_exceeded",
        "rate_limit_exceeded",
        headers={
            "retry-after": str(wait),
            f"x-ratelimit-limit-{kind}": str(limit.limit),
            f"x-ratelimit-remaining-{kind}": "0",
            f"x-ratelimit-reset-{kind}": _reset_text(retry_after_s),
        },
    )


def unavailable() -> GatewayError:
    return GatewayError(
        "Budget and rate-limit checks are unavailable (Redis did not answer), so requests "
        "on keys with a budget or limit are refused for now. Retry shortly.",
        503,
        "server_error",
        "budget_service_unavailable",
        headers={"retry-after": "1"},
    )


# --- the ledger as source of truth ---------------------------------------------------------------


async def _ledger_spend(budget: Budget) -> int:
    try:
        return await run_db(
            selectors.period_spend,
            scope=budget.scope,
            owner_id=budget.owner_id,
            period=budget.period,
        )
    except Exception as exc:  # Postgres unreachable: no counter can be trusted yet
        raise GatewayError(
            "The budget cannot be checked: the gateway's database is unreachable. Retry shortly.",
            503,
            "server_error",
            "database_unavailable",
            headers={"retry-after": "2"},
        ) from exc


# A one-off credit never resets, but its counter is only a copy of the ledger: it
# expires this long after it was filled and is filled again from the ledger on the
# next request, so an idle key leaves nothing behind in Redis.
TOTAL_COUNTER_SECONDS = 30 * 24 * 3600


def _expiry_seconds(budget: Budget) -> int:
    if budget.period.end is None:
        return TOTAL_COUNTER_SECONDS
    # Keep a finished period's counter a while for the spend API, then let it go.
    return int((budget.period.end + timedelta(days=7) - datetime.now(UTC)).total_seconds())


# --- backends ----------------------------------------------------------------------------------

_ADMIT_LUA = """
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local amount = tonumber(ARGV[3])
local expires = tonumber(ARGV[4])
local nb = tonumber(ARGV[5])

-- Release reservations of requests that died without settling.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
for _, old in ipairs(expired) do
  local v = redis.call('HGET', KEYS[2], old)
  if v then
    local amt = nil
    for part in string.gmatch(v, '[^|]+') do
      if amt == nil then
        amt = tonumber(part)
      elseif redis.call('EXISTS', part) == 1 then
        redis.call('HINCRBY', part, 'reserved', -amt)
      end
    end
    redis.call('HDEL', KEYS[2], old)
  end
  redis.call('ZREM', KEYS[1], old)
end

local idx = 6
for i = 1, nb do
  local key = KEYS[2 + i]
  local limit = tonumber(ARGV[idx])
  idx = idx + 1
  if redis.call('EXISTS', key) == 0 then
    return {'init', i}
  end
  local spent = tonumber(redis.call('HGET', key, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', key, 'reserved') or '0')
  if spent + reserved + amount > limit then
    return {'budget', i, spent, reserved}
  end
end

local nr = tonumber(ARGV[idx])
idx = idx + 1
local used = {}
for j = 1, nr do
  local key = KEYS[2 + nb + j]
  local limit = tonumber(ARGV[idx])
  local inc = tonumber(ARGV[idx + 1])
  idx = idx + 2
  local cur = tonumber(redis.call('GET', key) or '0')
  if cur + inc > limit then
    local ttl = redis.call('PTTL', key)
    return {'rate', j, cur, ttl}
  end
  used[j] = cur + inc
end

for j = 1, nr do
  local key = KEYS[2 + nb + j]
  local inc = tonumber(ARGV[6 + nb + 1 + (j - 1) * 2 + 1])
  redis.call('INCRBY', key, inc)
  redis.call('EXPIRE', key, 120, 'NX')
end
if nb > 0 then
  local members = {tostring(amount)}
  for i = 1, nb do
    redis.call('HINCRBY', KEYS[2 + i], 'reserved', amount)
    table.insert(members, KEYS[2 + i])
  end
  redis.call('HSET', KEYS[2], rid, table.concat(members, '|'))
  redis.call('ZADD', KEYS[1], expires, rid)
end
local out = {'ok'}
for j = 1, nr do
  table.insert(out, used[j])
end
return out
"""

_SETTLE_LUA = """
local rid = ARGV[1]
local actual = tonumber(ARGV[2])
-- Settling twice (a retry after a lost reply) must not count the spend twice.
if redis.call('SET', 'gw:res:done:' .. rid, '1', 'NX', 'EX', 86400) == false then
  return {}
end
local v = redis.call('HGET', KEYS[2], rid)
local amt = 0
if v then
  amt = tonumber(string.match(v, '^[^|]+'))
  redis.call('HDEL', KEYS[2], rid)
  redis.call('ZREM', KEYS[1], rid)
end
local spent = {}
for i = 3, #KEYS do
  -- A counter that does not exist will be filled from the ledger, which already
  -- holds this request's row; creating it here would count the spend twice.
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if amt > 0 then
      redis.call('HINCRBY', KEYS[i], 'reserved', -amt)
    end
    table.insert(spent, redis.call('HINCRBY', KEYS[i], 'spent', actual))
  else
    table.insert(spent, -1)
  end
end
return spent
"""

_INIT_LUA = """
if redis.call('HSETNX', KEYS[1], 'spent', ARGV[1]) == 1 then
  redis.call('HSETNX', KEYS[1], 'reserved', 0)
  if tonumber(ARGV[2]) > 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  end
end
return 1
"""


class RedisBackend:
    def __init__(self) -> None:
        self._scripts = LuaScripts(redis_client.client, _ADMIT_LUA, _SETTLE_LUA, _INIT_LUA)

    async def _guard(self, coro: Any) -> Any:
        try:
            return await redis_client.guarded(coro)
        except redis_client.RedisUnavailable as exc:
            logger.warning("redis unavailable for admission: %s", exc)
            raise unavailable() from exc

    async def admit(
        self,
        rid: str,
        amount: int,
        budgets: list[Budget],
        limits: list[Limit],
        now_s: float,
        lease_seconds: float | None = None,
    ) -> list[Any]:
        _, admit_script, _, init_script = self._scripts.get()
        keys = [RESERVATIONS_ZSET, RESERVATIONS_HASH]
        keys += [b.redis_key for b in budgets]
        keys += [limit.redis_key for limit in limits]
        args: list[Any] = [
            int(now_s * 1000),
            rid,
            amount,
            int((now_s + (lease_seconds or settings.GATEWAY_RESERVATION_LEASE_SECONDS)) * 1000),
            len(budgets),
            *[b.limit_micro_usd for b in budgets],
            len(limits),
        ]
        for limit in limits:
            args += [limit.limit, limit.amount]
        for _ in range(len(budgets) + 1):
            result = await self._guard(admit_script(keys=keys, args=args))
            if result[0] != b"init":
                return [result[0].decode(), *result[1:]]
            budget = budgets[int(result[1]) - 1]
            spent = await _ledger_spend(budget)
            await self._guard(
                init_script(keys=[budget.redis_key], args=[spent, _expiry_seconds(budget)])
            )
        raise unavailable()

    async def settle(self, ticket: Ticket, actual: int) -> list[int]:
        """Settle; returns each budget's spend after it (-1 if not counted, [] if a repeat)."""
        _, _, settle_script, _ = self._scripts.get()
        result = await self._guard(
            settle_script(
                keys=[RESERVATIONS_ZSET, RESERVATIONS_HASH, *ticket.budget_keys],
                args=[ticket.reservation_id, actual],
            )
        )
        return [int(v) for v in result]

    async def snapshot(self, budget: Budget) -> tuple[int, int] | None:
        client = redis_client.client()
        values = await self._guard(client.hmget(budget.redis_key, ["spent", "reserved"]))
        if values[0] is None:
            return None
        return int(values[0]), int(values[1] or 0)

    async def open_reservations(self) -> int:
        client = redis_client.client()
        return int(await self._guard(client.hlen(RESERVATIONS_HASH)))

    async def renew(self, rids: list[str], now_s: float) -> None:
        """Extend the lease of every reservation in `rids` that still exists, in one call.

        XX updates members already present and never adds one: a reservation that
        was settled (or swept) meanwhile stays gone, so a renewal racing a settle
        cannot resurrect it.
        """
        expires = int((now_s + settings.GATEWAY_RESERVATION_LEASE_SECONDS) * 1000)
        client = redis_client.client()
        await redis_client.guarded(
            client.zadd(RESERVATIONS_ZSET, dict.fromkeys(rids, expires), xx=True)
        )


class LocalBackend:
    """The same semantics in one process, for the embedded default without Redis.

    Each method runs without awaiting between its reads and writes, so the event
    loop makes it atomic, as the Lua script is in Redis.
    """

    def __init__(self) -> None:
        self.budgets: dict[str, dict[str, int]] = {}
        self.rates: dict[str, int] = {}
        self.reservations: dict[str, tuple[float, int, list[str]]] = {}
        self.settled: set[str] = set()

    def _sweep(self, now_s: float) -> None:
        # A reservation dies with this process, so while its request holds it, it
        # never expires (the Redis lease's renewals, without the round trips); one
        # whose ticket is gone unsettled (a bug) is released after the lease.
        for rid, (expires, amount, keys) in list(self.reservations.items()):
            if expires <= now_s and not _is_held(rid):
                for key in keys:
                    if key in self.budgets:
                        self.budgets[key]["reserved"] -= amount
                del self.reservations[rid]

    def _try(
        self,
        rid: str,
        amount: int,
        budgets: list[Budget],
        limits: list[Limit],
        now_s: float,
        lease_seconds: float | None = None,
    ) -> list[Any]:
        self._sweep(now_s)
        for index, budget in enumerate(budgets, start=1):
            state = self.budgets.get(budget.redis_key)
            if state is None:
                return ["init", index]
            if state["spent"] + state["reserved"] + amount > budget.limit_micro_usd:
                return ["budget", index, state["spent"], state["reserved"]]
        used = []
        for index, limit in enumerate(limits, start=1):
            current = self.rates.get(limit.redis_key, 0)
            if current + limit.amount > limit.limit:
                return ["rate", index, current, int((limit.window_start + 60 - now_s) * 1000)]
            used.append(current + limit.amount)
        for limit in limits:
            self.rates[limit.redis_key] = self.rates.get(limit.redis_key, 0) + limit.amount
        if budgets:
            for budget in budgets:
                self.budgets[budget.redis_key]["reserved"] += amount
            expires = now_s + (lease_seconds or settings.GATEWAY_RESERVATION_LEASE_SECONDS)
            self.reservations[rid] = (expires, amount, [b.redis_key for b in budgets])
        if len(self.rates) > 10_000:
            floor = int(now_s // 60) * 60 - 60
            self.rates = {k: v for k, v in self.rates.items() if int(k.rsplit(":", 1)[1]) >= floor}
        return ["ok", *used]

    async def admit(
        self,
        rid: str,
        amount: int,
        budgets: list[Budget],
        limits: list[Limit],
        now_s: float,
        lease_seconds: float | None = None,
    ) -> list[Any]:
        for _ in range(len(budgets) + 1):
            result = self._try(rid, amount, budgets, limits, now_s, lease_seconds)
            if result[0] != "init":
                return result
            budget = budgets[int(result[1]) - 1]
            spent = await _ledger_spend(budget)
            self.budgets.setdefault(budget.redis_key, {"spent": spent, "reserved": 0})
        raise unavailable()

    async def settle(self, ticket: Ticket, actual: int) -> list[int]:
        if ticket.reservation_id in self.settled:
            return []
        self.settled.add(ticket.reservation_id)
        if len(self.settled) > 100_000:
            self.settled.clear()
        entry = self.reservations.pop(ticket.reservation_id, None)
        amount = entry[1] if entry else 0
        spent = []
        for key in ticket.budget_keys:
            state = self.budgets.get(key)
            if state is None:
                spent.append(-1)
                continue
            state["reserved"] -= amount
            state["spent"] += actual
            spent.append(state["spent"])
        return spent

    async def snapshot(self, budget: Budget) -> tuple[int, int] | None:
        state = self.budgets.get(budget.redis_key)
        return (state["spent"], state["reserved"]) if state else None

    async def open_reservations(self) -> int:
        return len(self.reservations)

    async def renew(self, rids: list[str], now_s: float) -> None:
        """Nothing to do: held reservations are never swept (see _sweep)."""


backend = Backend[RedisBackend | LocalBackend](redis=RedisBackend, local=LocalBackend)


# --- leases: a reservation lives as long as the request that holds it ----------------------


@dataclass
class _Holder:
    """The reservations held by one event loop's requests, and the task renewing them.

    Per loop because the Redis client is; a process serves from one loop, so this is
    one renewer per process, not one per request.
    """

    loop: asyncio.AbstractEventLoop
    # Weak values: a ticket dropped without being settled (a bug) stops being renewed,
    # so its money comes back one lease later rather than when the process exits.
    tickets: weakref.WeakValueDictionary[str, Ticket] = field(
        default_factory=weakref.WeakValueDictionary
    )
    renewer: asyncio.Task[None] | None = None


_holders: dict[int, _Holder] = {}


def _holder() -> _Holder:
    loop = asyncio.get_running_loop()
    holder = _holders.get(id(loop))
    if holder is None or holder.loop is not loop:
        # A loop's id can be reused once it is gone; forget the holders of closed loops.
        for loop_id, old in list(_holders.items()):
            if old.loop.is_closed():
                del _holders[loop_id]
        holder = _Holder(loop)
        _holders[id(loop)] = holder
    return holder


def _hold(ticket: Ticket) -> None:
    holder = _holder()
    holder.tickets[ticket.reservation_id] = ticket
    if holder.renewer is None and isinstance(backend(), RedisBackend):
        holder.renewer = holder.loop.create_task(_renew(holder), context=contextvars.Context())


def _unhold(ticket: Ticket) -> None:
    for holder in _holders.values():
        holder.tickets.pop(ticket.reservation_id, None)


def _is_held(rid: str) -> bool:
    return any(rid in holder.tickets for holder in _holders.values())


async def _renew(holder: _Holder) -> None:
    """Every third of a lease, extend the lease of everything this loop still holds.

    A failed renewal (Redis away) is retried at the next tick: two in a row may
    fail before a lease lapses. The task ends when nothing is held, and the next
    admission starts it again.
    """
    interval = settings.GATEWAY_RESERVATION_LEASE_SECONDS / 3
    loop = asyncio.get_running_loop()
    tick = loop.time()
    try:
        while True:
            # A fixed cadence: a renewal that stalls (for up to twice the Redis timeout,
            # at most a sixth of the lease) does not push the next one later. Ticks
            # missed while the loop was blocked are not made up.
            tick = max(tick + interval, loop.time())
            await asyncio.sleep(tick - loop.time())
            rids = list(holder.tickets.keys())
            if not rids:
                return
            try:
                await backend().renew(rids, time.time())
            except redis_client.RedisUnavailable as exc:
                logger.warning("renewing %d reservation leases failed: %s", len(rids), exc)
            except Exception:  # a bug must not end the renewals of every request
                logger.exception("renewing %d reservation leases failed", len(rids))
    finally:
        holder.renewer = None


# --- the API the data plane calls ---------------------------------------------------------------


async def admit(
    *,
    principal: KeyPrincipal,
    request_id: str,
    prompt_tokens: int,
    prompt_tokens_bound: int,
    max_output_tokens: int,
    prices: Prices,
) -> Ticket:
    """Admit a request or refuse it with 429 (or 503 when Redis is unreachable).

    Rate limits count `prompt_tokens` (the gateway's count) plus the max output;
    the budget reservation uses `prompt_tokens_bound`, an upper bound of what any
    provider's tokenizer can report, so the reservation covers the settled cost.
    """
    now = datetime.now(UTC)
    now_s = time.time()
    budgets = _budgets(principal, now)
    limits = _limits(principal, prompt_tokens + max_output_tokens, now_s)
    if not budgets and not limits:
        return Ticket(reservation_id=NO_TICKET_NEEDED, amount=0, budgets=[], settled=True)
    amount = max_cost_micro_usd(
        prompt_tokens_bound, max_output_tokens, prices, principal.markup_percent
    )
    rid = f"{request_id}:{secrets.token_hex(4)}"
    result = await backend().admit(rid, amount, budgets, limits, now_s)
    outcome = result[0]
    if outcome == "budget":
        budget = budgets[int(result[1]) - 1]
        raise _budget_refusal(budget, int(result[2]), int(result[3]), amount)
    if outcome == "rate":
        limit = limits[int(result[1]) - 1]
        # Fixed windows: the limit resets when this minute ends (the counter's own
        # TTL is longer, to outlive clock skew between processes).
        raise _rate_refusal(limit, limit.window_start + 60 - now_s)
    used = [int(v) for v in result[1:]]
    ticket = Ticket(
        reservation_id=rid,
        amount=amount,
        budgets=budgets,
        team_id=principal.team_id,
        thresholds=list(principal.alert_thresholds),
        headers=_rate_headers(limits, used, now_s),
        settled=not budgets,
    )
    if budgets:
        # Held, and so renewed, until settled: from here on, whatever the request does.
        _hold(ticket)
    return ticket


async def admit_batch(
    *, principal: KeyPrincipal, reservation_id: str, amount: int, lease_seconds: float
) -> list[str]:
    """Reserve `amount` (the most a native batch can cost) against the key's and team's
    budgets, for `lease_seconds` without renewal: the batch outlives any one process.

    Returns the budget keys to settle later (empty: no budget applies), or raises the
    429 of the budget it does not fit. Rate limits do not apply: a provider batch is
    not live traffic. Reserving twice under one id would count it twice, so callers
    store the returned keys before anything else and never reserve again once stored.
    """
    now = datetime.now(UTC)
    budgets = _budgets(principal, now)
    if not budgets:
        return []
    result = await backend().admit(
        reservation_id, amount, budgets, [], time.time(), lease_seconds=lease_seconds
    )
    if result[0] == "budget":
        budget = budgets[int(result[1]) - 1]
        raise _budget_refusal(budget, int(result[2]), int(result[3]), amount)
    return [b.redis_key for b in budgets]


async def settle_batch(*, reservation_id: str, budget_keys: list[str], actual: int) -> None:
    """Settle a native batch's reservation to what its lines were charged. A repeat (a
    worker resumed after settling) is ignored by the settle script."""
    if not budget_keys:
        return
    ticket = Ticket(
        reservation_id=reservation_id, amount=0, budgets=[], stored_keys=tuple(budget_keys)
    )
    await backend().settle(ticket, actual)


SETTLE_RETRY_DELAYS = (0.5, 1, 2, 4, 8, 16, 32)


async def _settle_later(ticket: Ticket, actual: int) -> None:
    for delay in SETTLE_RETRY_DELAYS:
        await asyncio.sleep(delay)
        try:
            await _settle_now(ticket, actual)
            return
        except GatewayError:
            continue
    # Given up: stop renewing, so the lease lapses and the reservation is released.
    _unhold(ticket)
    logger.error(
        "reservation %s could not be settled (%s micro-USD); the budget counter is behind "
        "the ledger until it is reconciled",
        ticket.reservation_id,
        actual,
    )


async def _settle_now(ticket: Ticket, actual: int) -> None:
    spent_after = await backend().settle(ticket, actual)
    # Only now: while a settle is retried, the money stays reserved.
    _unhold(ticket)
    if not ticket.thresholds or actual <= 0:
        return
    found = []
    for budget, after in zip(ticket.budgets, spent_after, strict=False):
        if after < 0:
            continue
        found += alerts.crossings(
            scope=budget.scope,
            owner_id=budget.owner_id,
            team_id=ticket.team_id,
            period_id=budget.period.id,
            limit=budget.limit_micro_usd,
            before=after - actual,
            after=after,
            thresholds=ticket.thresholds,
        )
    if found:
        # Recorded off the request's path; a fresh context lets it outlive the request.
        spawn(run_db(alerts.alerts_record, found))


async def settle(ticket: Ticket, actual_micro_usd: int) -> None:
    """Turn the reservation into the actual spend and release the rest.

    Idempotent, and never fails the request: the ledger row is already written, so
    a Redis hiccup here is retried in the background (the settle script ignores a
    repeat) rather than turned into an error for a request that succeeded.
    """
    if ticket.settled:
        return
    ticket.settled = True
    try:
        await _settle_now(ticket, actual_micro_usd)
    except GatewayError:
        spawn(_settle_later(ticket, actual_micro_usd))


async def release(ticket: Ticket) -> None:
    """Give back a reservation for a request that cost nothing."""
    await settle(ticket, 0)


def apply_headers(response: HttpResponseBase, ticket: Ticket) -> None:
    for name, value in ticket.headers.items():
        response[name] = value


# --- provider rate limits, per deployment ------------------------------------------------

_DEPLOYMENT_LUA = """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local r = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(redis.call('GET', KEYS[2]) or '0')
if (rpm > 0 and r + 1 > rpm) or (tpm > 0 and t + tokens > tpm) then
  return 0
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 120, 'NX')
redis.call('INCRBY', KEYS[2], tokens)
redis.call('EXPIRE', KEYS[2], 120, 'NX')
return 1
"""


def _minute(deployment_id: str) -> tuple[list[str], float]:
    """This minute's request and token counter keys, and the seconds until it ends."""
    now_s = time.time()
    window = int(now_s // 60) * 60
    rest = 60 - (now_s - window)
    return [f"gw:dep:{deployment_id}:r:{window}", f"gw:dep:{deployment_id}:t:{window}"], rest


class RedisDeploymentLimits:
    def __init__(self) -> None:
        self._scripts = LuaScripts(redis_client.client, _DEPLOYMENT_LUA)

    async def take(self, deployment_id: str, rpm: int, tpm: int, tokens: int) -> float | None:
        keys, rest = _minute(deployment_id)
        _, script = self._scripts.get()
        try:
            taken = await redis_client.guarded(script(keys=keys, args=[rpm, tpm, tokens]))
        except redis_client.RedisUnavailable as exc:
            raise unavailable() from exc
        return None if int(taken) else rest


class LocalDeploymentLimits:
    """The same counts in the process; `take` never awaits, so it is atomic."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    async def take(self, deployment_id: str, rpm: int, tpm: int, tokens: int) -> float | None:
        keys, rest = _minute(deployment_id)
        requests = self.counts.get(keys[0], 0)
        used = self.counts.get(keys[1], 0)
        if (rpm and requests + 1 > rpm) or (tpm and used + tokens > tpm):
            return rest
        if len(self.counts) > 10_000:
            self.counts.clear()
        self.counts[keys[0]] = requests + 1
        self.counts[keys[1]] = used + tokens
        return None


_deployment_limits = Backend[RedisDeploymentLimits | LocalDeploymentLimits](
    redis=RedisDeploymentLimits, local=LocalDeploymentLimits
)


def deployment_take(
    deployment_id: str, rpm: int | None, tpm: int | None, tokens: int
) -> Awaitable[float | None]:
    """Count one request against a deployment's rpm/tpm for this minute.

    Resolves to None when it fits, else the seconds until the minute (and the limit)
    resets. Not a coroutine itself: the backend's is awaited directly, one frame less.
    """
    return _deployment_limits().take(deployment_id, rpm or 0, tpm or 0, tokens)
