"""A store shared by many machines: Redis (``--db redis://HOST:PORT/N``).

Each (namespace, kind) is one Redis hash; each namespace has a generation counter. A write
takes a per-namespace lock (``SET NX PX``, expiring, so a killed writer does not block the
store for long) and reads the generation in the same script, then commits all its records,
the change log and the generation bump in one script that first checks that the generation
is still the one it read: Redis runs a script whole or not at all, so a writer killed
mid-write leaves nothing, and if the lock expired under a slow writer and another committed
first, the commit is refused and the store retries the operation instead of losing an
update. The commit script also releases the lock and wakes the next waiting writer: a write
is two round trips under the lock (take it and read what changed since the writer last
looked; commit), not six. Waiting writers queue and get the lock first come, first served
(the release wakes the queue's head; a newcomer may not take a free lock ahead of it), so
no writer loses it several times in a row; a waiter that stops asking (killed) is dropped
from the queue after 250 ms.

The change log (a sorted set: each record changed, scored by the generation that changed it)
lets a reader catch up by reading only what changed since the generation it holds. It keeps
its newest ``SEQKV_REDIS_LOG_MAX`` entries (10,000; 0: no limit): the commit that goes past
that drops the oldest generations' entries and raises the log's floor to the newest
generation dropped, and a reader older than the floor reads the namespace whole instead
(it cannot tell what it missed), so a reader that fell behind never misses a change.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from .backend import (
    StoreBusyError,
    StoreConflict,
    StoreError,
    StoreUnavailableError,
    busy_timeout,
    log_max_setting,
)

# the generation, the change log's floor (KEYS[3]) and, if ARGV[1] is not below the floor,
# every record changed after ARGV[1] (one consistent read): the change log is a sorted set
# of "kind NUL key" scored by the generation that last wrote or deleted it
_CHANGES = """
local out = {redis.call('get', KEYS[1]) or '0', redis.call('get', KEYS[3]) or '0'}
if tonumber(ARGV[1]) < tonumber(out[2]) then
  return out
end
local members = redis.call('zrangebyscore', KEYS[2], '(' .. ARGV[1], '+inf')
for _, m in ipairs(members) do
  local sep = string.find(m, '\\0', 1, true)
  out[#out + 1] = m
  out[#out + 1] = redis.call('hget', ARGV[2] .. string.sub(m, 1, sep - 1),
                             string.sub(m, sep + 1)) or false
end
return out
"""
# The lock is handed over first come, first served: a writer that finds it held joins the
# namespace's queue (KEYS[4], a list of tokens; KEYS[5]: when each last asked, ms) and
# waits on its own wake key (ARGV[4] .. token, pushed by the release); only the queue's head
# may take a free lock. A waiter that stopped asking for 250 ms (killed, or gave up) is
# dropped from the head. ARGV[1]: this writer's token.
_QUEUE = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local head = redis.call('lindex', KEYS[4], 0)
while head and head ~= ARGV[1] and
      now - tonumber(redis.call('hget', KEYS[5], head) or '0') > 250 do
  redis.call('lpop', KEYS[4])
  redis.call('hdel', KEYS[5], head)
  head = redis.call('lindex', KEYS[4], 0)
end
if redis.call('exists', KEYS[1]) == 1 or (head and head ~= ARGV[1]) then
  if not redis.call('hget', KEYS[5], ARGV[1]) then
    redis.call('rpush', KEYS[4], ARGV[1])
  end
  redis.call('hset', KEYS[5], ARGV[1], now)
  redis.call('pexpire', KEYS[4], 60000)
  redis.call('pexpire', KEYS[5], 60000)
  return false
end
if head == ARGV[1] then
  redis.call('lpop', KEYS[4])
end
redis.call('hdel', KEYS[5], ARGV[1])
"""
# release the lock (KEYS[1]) if still ours (ARGV[1]) and wake the queue's head (KEYS[2];
# its wake key: ARGV[2] .. token)
_WAKE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  local head = redis.call('lindex', KEYS[2], 0)
  if head then
    redis.call('rpush', ARGV[2] .. head, '1')
    redis.call('pexpire', ARGV[2] .. head, 1000)
  end
end
"""
_RELEASE = _WAKE + "return 0"
# take the lock (KEYS[1]) if free and this writer's turn and, in the same round trip, read
# the generation (KEYS[2]), the log's floor (KEYS[6]) and what changed after generation
# ARGV[3] (the writer's; -1: nothing; below the floor: nothing either, it reads all) as
# _CHANGES does (change log KEYS[3], hashes ARGV[5] .. kind): nil if not taken
_ACQUIRE = _QUEUE + """
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
local out = {redis.call('get', KEYS[2]) or '0', redis.call('get', KEYS[6]) or '0'}
if tonumber(ARGV[3]) >= tonumber(out[2]) and tonumber(out[1]) > tonumber(ARGV[3]) then
  for _, m in ipairs(redis.call('zrangebyscore', KEYS[3], '(' .. ARGV[3], '+inf')) do
    local sep = string.find(m, '\\0', 1, true)
    out[#out + 1] = m
    out[#out + 1] = redis.call('hget', ARGV[5] .. string.sub(m, 1, sep - 1),
                               string.sub(m, sep + 1)) or false
  end
end
return out
"""
# commit: if the generation (KEYS[1]) is still ARGV[1], apply the puts and deletes (ARGV[6..]:
# op, kind, key, value), log them (KEYS[4]), bump the generation, record the namespace
# (KEYS[5]), and trim the log to its newest ARGV[5] entries (0: no limit): every entry of the
# generations dropped goes (a generation is kept whole or not at all) and the floor (KEYS[6])
# becomes the newest of them. Either way release the lock (KEYS[2], token ARGV[2]) and wake
# the queue's head (KEYS[3], wake keys ARGV[3] .. "wake:" .. token), as _RELEASE does.
# 1 committed, 0 refused.
_COMMIT = """
local gen = redis.call('get', KEYS[1]) or '0'
local ok = 0
if gen == ARGV[1] then
  local next = tonumber(gen) + 1
  for i = 6, #ARGV, 4 do
    local hash = ARGV[3] .. ARGV[i + 1]
    if ARGV[i] == 'put' then
      redis.call('hset', hash, ARGV[i + 2], ARGV[i + 3])
    else
      redis.call('hdel', hash, ARGV[i + 2])
    end
    redis.call('zadd', KEYS[4], next, ARGV[i + 1] .. '\\0' .. ARGV[i + 2])
  end
  redis.call('incr', KEYS[1])
  redis.call('sadd', KEYS[5], ARGV[4])
  local cap = tonumber(ARGV[5])
  local n = redis.call('zcard', KEYS[4])
  if cap > 0 and n > cap then
    local cut = redis.call('zrange', KEYS[4], n - cap - 1, n - cap - 1, 'WITHSCORES')[2]
    redis.call('zremrangebyscore', KEYS[4], '-inf', cut)
    redis.call('set', KEYS[6], cut)
  end
  ok = 1
end
if redis.call('get', KEYS[2]) == ARGV[2] then
  redis.call('del', KEYS[2])
  local head = redis.call('lindex', KEYS[3], 0)
  if head then
    redis.call('rpush', ARGV[3] .. 'wake:' .. head, '1')
    redis.call('pexpire', ARGV[3] .. 'wake:' .. head, 1000)
  end
end
return ok
"""


def _key(prefix: str, ns: str, kind: str) -> str:
    return f"{prefix}:{len(ns)}:{ns}:{kind}"


class _RedisTxn:
    def __init__(self, r: redis.Redis, prefix: str, ns: str, generation: int,
                 since: int = -1, changed: list | None = None, floor: int = 0) -> None:
        self.r, self.prefix, self.ns, self.generation = r, prefix, ns, generation
        self.ops: list[tuple[str, str, str, bytes | None]] = []
        # what changed after ``since``, read with the lock: (kind NUL key, value) pairs; and
        # the change log's floor then (an older ``since`` cannot catch up through the log)
        self._since, self._changed, self._floor = since, changed, floor

    def read_kind(self, kind: str) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(_key(self.prefix, self.ns, kind)).items()}

    def read(self, kind: str, key: str) -> bytes | None:
        return self.r.hget(_key(self.prefix, self.ns, kind), key)

    def changes(self, since: int, kinds: tuple[str, ...]
                ) -> dict[str, dict[str, bytes | None]] | None:
        """What changed after ``since`` (None: the log was trimmed past it, read all)."""
        if since == self._since and self._changed is not None:  # read when the lock was taken
            return None if since < self._floor else _parse_changes(self._changed, kinds)
        got = _changes(self.r, self.prefix, self.ns, since, kinds)
        return None if got is None else got[1]

    def put(self, kind: str, key: str, value: bytes) -> None:
        self.ops.append(("put", kind, key, value))

    def delete(self, kind: str, key: str) -> None:
        self.ops.append(("del", kind, key, None))


def _changes(r: redis.Redis, prefix: str, ns: str, since: int, kinds: tuple[str, ...]
             ) -> tuple[int, dict[str, dict[str, bytes | None]]] | None:
    """The generation and what changed after ``since``; None if the log no longer reaches
    back to ``since`` (trimmed)."""
    reply = r.eval(_CHANGES, 3, _key(prefix, ns, "gen"), _key(prefix, ns, "changes"),
                   _key(prefix, ns, "logfloor"), int(since), _key(prefix, ns, ""))
    if since < int(reply[1]):
        return None
    return int(reply[0]), _parse_changes(reply[2:], kinds)


def _parse_changes(pairs: list, kinds: tuple[str, ...]) -> dict[str, dict[str, bytes | None]]:
    """[kind NUL key, value or None, ...] -> {kind: {key: value}} for ``kinds``."""
    out: dict[str, dict[str, bytes | None]] = {k: {} for k in kinds}
    for i in range(0, len(pairs), 2):
        kind, _, key = pairs[i].decode().partition("\0")
        if kind in out:
            out[kind][key] = pairs[i + 1]
    return out


LOG_MAX_ENV = "SEQKV_REDIS_LOG_MAX"


def _log_max() -> int:
    """How many change-log entries a namespace keeps: $SEQKV_REDIS_LOG_MAX or 10,000."""
    return log_max_setting(LOG_MAX_ENV)


class RedisBackend:
    def __init__(self, url: str, create: bool = True, lock_wait: float | None = None,
                 log_max: int | None = None) -> None:
        """``redis://HOST:PORT/N``; an optional ``#PREFIX`` keeps several stores in one DB.
        (``create`` is the registry's common signature: a Redis store is created by its first
        write either way, and reading commands check for its meta record.) ``log_max``: the
        change-log entries a namespace keeps (default $SEQKV_REDIS_LOG_MAX or 10,000; 0: all)."""
        self.url = url
        url, _, prefix = url.partition("#")
        self.prefix = f"seqkv:{prefix}" if prefix else "seqkv"
        self.lock_ttl = float(os.environ.get("SEQKV_REDIS_LOCK_TTL", "30"))
        self.log_max = _log_max() if log_max is None else log_max
        self.lock_wait = busy_timeout() if lock_wait is None else lock_wait
        try:
            self.r = redis.Redis.from_url(url, socket_timeout=30)
            self.r.ping()
        except redis.RedisError as e:
            raise StoreUnavailableError(f"cannot reach Redis at {url}: {e}") from e
        except ValueError as e:
            raise StoreError(f"cannot reach Redis at {url}: {e}") from e
        self._acquire = self.r.register_script(_ACQUIRE)  # EVALSHA, the source sent once
        self._commit_script = self.r.register_script(_COMMIT)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A Redis failure (connection lost, timeout, out of memory) as one StoreError line."""
        try:
            yield
        except redis.RedisError as e:
            raise StoreUnavailableError(f"Redis at {self.url}: {type(e).__name__}: {e}") from e

    @contextmanager
    def transaction(self, ns: str, since: int = -1) -> Iterator[_RedisTxn]:
        """``since``: the generation the writer holds; what changed after it is read with the
        lock, in the same round trip (``txn.changes(since, ...)``)."""
        with self._errors(), self._transaction(ns, since) as txn:
            yield txn

    @contextmanager
    def _transaction(self, ns: str, since: int = -1) -> Iterator[_RedisTxn]:
        lock, token = _key(self.prefix, ns, "lock"), secrets.token_hex(8)
        gen_key, queue = _key(self.prefix, ns, "gen"), _key(self.prefix, ns, "queue")
        wake = _key(self.prefix, ns, "wake:")  # + a token: each waiter's own
        deadline = time.monotonic() + self.lock_wait
        while True:
            got = self._acquire(keys=[lock, gen_key, _key(self.prefix, ns, "changes"), queue,
                                      _key(self.prefix, ns, "asked"),
                                      _key(self.prefix, ns, "logfloor")],
                                args=[token, int(self.lock_ttl * 1000), int(since), wake,
                                      _key(self.prefix, ns, "")])
            if got is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreBusyError(f"store busy, retry: namespace {ns!r} stayed locked by "
                                     f"other writers for {self.lock_wait:g} s")
            # wait in Redis for our turn (the release wakes the queue's head: no polling); at
            # most 50 ms, so that a lock left by a killed writer is retaken soon after it expires
            self.r.blpop([wake + token], timeout=min(left, 0.05))
        released = False
        try:
            txn = _RedisTxn(self.r, self.prefix, ns, int(got[0]), int(since), got[2:],
                            int(got[1]))
            yield txn
            args: list = [txn.generation, token, _key(self.prefix, ns, ""), ns, self.log_max]
            for op, kind, key, value in txn.ops:
                args += [op, kind, key, b"" if value is None else value]
            ok = self._commit([gen_key, lock, queue, _key(self.prefix, ns, "changes"),
                               f"{self.prefix}:namespaces", _key(self.prefix, ns, "logfloor")],
                              args)
            released = True  # the commit script released the lock, committed or not
            if not ok:  # the lock expired under us and another writer committed first
                raise StoreConflict(ns)
        finally:
            if not released:  # also where the commit call failed: release is token-guarded,
                with contextlib.suppress(redis.RedisError):  # a no-op if it had run
                    self.r.eval(_RELEASE, 2, lock, queue, token, wake)

    def _commit(self, keys: list[str], args: list) -> int:
        """The commit script: 1 if it committed, 0 if the generation had moved."""
        return int(self._commit_script(keys=keys, args=args))

    def snapshot(self, ns: str, kinds: tuple[str, ...]) -> tuple[int, dict[str, dict[str, bytes]]]:
        # MULTI/EXEC: one consistent read
        with self._errors(), self.r.pipeline(transaction=True) as pipe:
            pipe.get(_key(self.prefix, ns, "gen"))
            for k in kinds:
                pipe.hgetall(_key(self.prefix, ns, k))
            gen, *data = pipe.execute()
        return int(gen or 0), {
            k: {kk.decode(): v for kk, v in d.items()} for k, d in zip(kinds, data, strict=True)
        }

    def changes(self, ns: str, since: int, kinds: tuple[str, ...]
                ) -> tuple[int, dict[str, dict[str, bytes | None]]] | None:
        """One consistent read (a script): the generation, and what changed after ``since``
        (None where the log was trimmed past ``since``: read the namespace whole)."""
        with self._errors():
            return _changes(self.r, self.prefix, ns, since, kinds)

    def generation(self, ns: str) -> int:
        with self._errors():
            return int(self.r.get(_key(self.prefix, ns, "gen")) or 0)

    def read(self, ns: str, kind: str, key: str) -> bytes | None:
        with self._errors():
            return self.r.hget(_key(self.prefix, ns, kind), key)

    def namespaces(self) -> list[str]:
        with self._errors():
            return sorted(m.decode() for m in self.r.smembers(f"{self.prefix}:namespaces"))

    def close(self) -> None:
        self.r.close()
