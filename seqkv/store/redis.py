"""A store shared by many machines: Redis (``--db redis://HOST:PORT/N``).

Each (namespace, kind) is one Redis hash; each namespace has a generation counter. A write
takes a per-namespace lock (``SET NX PX``, expiring, so a killed writer does not block the
store for long), WATCHes the generation, and commits all its records and the generation bump
in one MULTI/EXEC: Redis applies it whole or not at all, so a writer killed mid-write leaves
nothing, and if the lock expired under a slow writer and another committed first, EXEC fails
and the store retries the operation instead of losing an update.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from .backend import (
    StoreBusyError,
    StoreConflict,
    StoreError,
    busy_timeout,
    pause_before_commit,
)

_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) end return 0")


def _key(prefix: str, ns: str, kind: str) -> str:
    return f"{prefix}:{len(ns)}:{ns}:{kind}"


class _RedisTxn:
    def __init__(self, r: redis.Redis, prefix: str, ns: str, generation: int) -> None:
        self.r, self.prefix, self.ns, self.generation = r, prefix, ns, generation
        self.ops: list[tuple[str, str, str, bytes | None]] = []

    def read_kind(self, kind: str) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(_key(self.prefix, self.ns, kind)).items()}

    def read(self, kind: str, key: str) -> bytes | None:
        return self.r.hget(_key(self.prefix, self.ns, kind), key)

    def put(self, kind: str, key: str, value: bytes) -> None:
        self.ops.append(("put", kind, key, value))

    def delete(self, kind: str, key: str) -> None:
        self.ops.append(("del", kind, key, None))


class RedisBackend:
    def __init__(self, url: str, lock_wait: float | None = None) -> None:
        """``redis://HOST:PORT/N``; an optional ``#PREFIX`` keeps several stores in one DB."""
        self.url = url
        url, _, prefix = url.partition("#")
        self.prefix = f"seqkv:{prefix}" if prefix else "seqkv"
        self.lock_ttl = float(os.environ.get("SEQKV_REDIS_LOCK_TTL", "30"))
        self.lock_wait = busy_timeout() if lock_wait is None else lock_wait
        try:
            self.r = redis.Redis.from_url(url, socket_timeout=30)
            self.r.ping()
        except (redis.RedisError, ValueError) as e:
            raise StoreError(f"cannot reach Redis at {url}: {e}") from e

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A Redis failure (connection lost, timeout, out of memory) as one StoreError line."""
        try:
            yield
        except redis.RedisError as e:
            raise StoreError(f"Redis at {self.url}: {type(e).__name__}: {e}") from e

    @contextmanager
    def transaction(self, ns: str) -> Iterator[_RedisTxn]:
        with self._errors(), self._transaction(ns) as txn:
            yield txn

    @contextmanager
    def _transaction(self, ns: str) -> Iterator[_RedisTxn]:
        lock, token = _key(self.prefix, ns, "lock"), secrets.token_hex(8)
        deadline, delay = time.monotonic() + self.lock_wait, 0.005
        while not self.r.set(lock, token, nx=True, px=int(self.lock_ttl * 1000)):
            if time.monotonic() + delay > deadline:
                raise StoreBusyError(f"store busy, retry: namespace {ns!r} stayed locked by "
                                     f"other writers for {self.lock_wait:g} s")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, 0.25)
        try:
            with self.r.pipeline() as pipe:
                gen_key = _key(self.prefix, ns, "gen")
                pipe.watch(gen_key)
                txn = _RedisTxn(self.r, self.prefix, ns, int(pipe.get(gen_key) or 0))
                yield txn
                pipe.multi()
                for op, kind, key, value in txn.ops:
                    if op == "put":
                        pipe.hset(_key(self.prefix, ns, kind), key, value)
                    else:
                        pipe.hdel(_key(self.prefix, ns, kind), key)
                pipe.incr(gen_key)
                pipe.sadd(f"{self.prefix}:namespaces", ns)
                pause_before_commit()
                try:
                    pipe.execute()
                except redis.WatchError as e:
                    raise StoreConflict(ns) from e
        finally:
            self.r.eval(_RELEASE, 1, lock, token)

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
