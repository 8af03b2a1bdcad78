"""`seqkv serve`: the PLT store over HTTP (JSON), for many clients and several server processes.

    GET    /healthz                      200 once the server takes requests (at once: the
                                         model loads in the background; "model" says
                                         whether it is loading, ready or failed;
                                         "device": where it runs, ``--device``)
    PUT    /v1/sessions/{id}             {"text"} or {"ids"} -> 201 new / 200 replaced, once durable
    GET    /v1/sessions/{id}             {"session", "ids", "text"} (text null for an ids session)
    GET    /v1/sessions/{id}/cache       the restored KV cache, a safetensors file in the
                                         interchange format of `seqkv kv-dump`
    DELETE /v1/sessions/{id}
    GET    /v1/stats                     the fields of `seqkv store stats --json`
    POST   /v1/nearest                   {"text"} or {"ids"}, optional "k"
    POST   /v1/compact                   codes what is pending; answers when done
    POST   /v1/rebalance                 gives each trie node its tier under --tier-budget now
                                         (KV checkpoint, edge kept raw, coded); the summary
    GET    /docs, /openapi.json          the API's OpenAPI description

Auth: with ``--keys KEYS.json`` ({"API key": "namespace", ...}) every /v1 request carries
``Authorization: Bearer KEY``; a missing or unknown key is 401, and a key sees its namespace
only: another namespace's session is 404, exactly as a session that never existed. Without
keys the server serves the default namespace and refuses to listen on anything but loopback.

Writes return once durable (a raw edge, no model work under the store's write lock). The
puts that arrive together are committed together by one writer thread per namespace (group
commit: one transaction, one fsync, each request answered after that commit). A child
process compacts pending edges in the background (``Store.compact``), on CPU time the server
leaves idle, as does ``POST /v1/compact`` in the server itself. Several server processes may
share one store (Redis, or one SQLite file): every write is a backend transaction and
compaction swaps edges by compare-and-swap.

Tiers (``--tier-budget BYTES``, ``--tier-policy``, ``--tier-quant``): each namespace's hot
tiers (KV checkpoints and edges kept raw, ``Store.rebalance``) are rebalanced in the
background by a thread of the server, every ``--tier-interval`` seconds for a namespace that
was written or read since, sooner once it served ``--tier-restores`` restores. It runs in the
server because that is where restores are counted (by the namespace's reading Store, handed
to the rebalancing one): the compactor child never sees a restore. It has its own Store and
lock, so puts and reads go on meanwhile (its model work is outside the write lock, its writes
are short transactions). Each rebalance adds the restores its server served to the store's
counts and ranks by all of them, so several server processes on one store agree.

The model loads in the background: the server answers at once (a restart takes the time of
the Python imports), and what needs no model is served meanwhile: puts of ids (checked
against the vocabulary size the store recorded), and reads of raw edges. A request that
needs the model (text, coded edges to decode, nearest, stats, the KV cache, compaction)
waits for it; if it cannot load (or does not match the store) those answer 500.

Errors are JSON ``{"error": "..."}``: 400 bad input, 401 no or unknown key, 404 no such
session (or route), 409 the session exists (a PUT with ``?replace=false``), 413 body too
large, 422 malformed body, 503 store busy (retry), 500 a corrupt stored record or an
unexpected failure (no traceback is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from .core.errors import BlobError, SeqkvError
from .store.backend import (
    ModelNeededError,
    NoSessionError,
    NoStoreError,
    SessionExistsError,
    StoreBusyError,
    StoreUnavailableError,
)

log = logging.getLogger("seqkv.server")
DEFAULT_NAMESPACE = "default"
MAX_BODY = 8 << 20  # bytes of a request body
SESSION_ID = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces, 1-256 chars
DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")  # where the engine runs: the CPU or a CUDA GPU


class ServerConfigError(SeqkvError):
    """The server cannot start as asked (keys file, host)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_keys(path: str | Path) -> dict[str, str]:
    """KEYS.json: {"API key": "namespace"}; each key and namespace a non-empty string."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ServerConfigError(f"cannot read keys file {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServerConfigError(f"keys file {path} is not JSON ({e})") from e
    if not isinstance(data, dict) or not data:
        raise ServerConfigError(f"keys file {path} must map API keys to namespaces")
    for key, ns in data.items():
        if not key or not isinstance(ns, str) or not ns:
            raise ServerConfigError(f"keys file {path}: every key needs a non-empty namespace")
    return dict(data)


# -- request bodies -------------------------------------------------------------------------


class _Tokens(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="UTF-8 text, tokenized by the store's model")
    ids: list[StrictInt] | None = Field(None, description="token ids")

    def data(self) -> str | list[int]:
        if (self.text is None) == (self.ids is None):
            raise SeqkvError('give exactly one of "text" and "ids"')
        return self.text if self.text is not None else list(self.ids)


class SessionBody(_Tokens):
    """A session's tokens."""


class NearestBody(_Tokens):
    """A prompt; the k stored sessions sharing the most information with it."""

    k: int = Field(10, ge=1, le=1000)


class RebalanceResult(BaseModel):
    """What one rebalance did: the fields of `seqkv store rebalance --json` (nodes by id)."""

    namespace: str
    budget: int = Field(description="bytes for the hot tiers, checkpoints and raw edges "
                        "together (--tier-budget)")
    policy: str = Field(description="prior or lru (--tier-policy)")
    quant: str | None = Field(description="the checkpoints' KV quantizer (null: raw)")
    kept: list[str] = Field(description="nodes that hold a KV checkpoint now")
    added: list[str] = Field(description="checkpoints written by this rebalance")
    dropped: list[str] = Field(description="checkpoints deleted by this rebalance")
    bytes: int = Field(description="bytes of the checkpoint records now")
    raw: list[str] = Field(description="edges kept raw now (compaction leaves them)")
    raw_added: list[str] = Field(description="edges newly kept raw")
    raw_dropped: list[str] = Field(description="edges released: the next compaction codes "
                                   "them")
    raw_swapped: int = Field(description="of raw_added, coded edges swapped back to raw")
    raw_skipped: int = Field(description="edges that changed meanwhile: the next rebalance")
    raw_bytes: int = Field(description="bytes of the edges kept raw (4 a token)")
    policy_bytes: int = Field(description="the bytes the policy budgeted for its choice")


# -- the service ----------------------------------------------------------------------------


class Batcher:
    """Group concurrent requests: one worker thread takes every request queued while it was
    busy (up to ``max_batch``) and runs them as one call of ``run`` (group commit for puts:
    one transaction and one fsync for many; one decode group for reads), then answers each
    caller its own result. No timer: an idle server answers a lone request at once. Callers
    block in ``submit`` (threads) or await ``submit_async`` (the event loop: no thread hop
    per request)."""

    def __init__(self, run: Callable[[list], list], max_batch: int = 64,
                 name: str = "seqkv-batch") -> None:
        self.run, self.max_batch, self.name = run, max_batch, name
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.batches = self.items = 0  # counters, for the benchmarks
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _enqueue(self, item: Any, answer: Callable[[str, Any], None]) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self.name,
                                                    daemon=True)
                    self._thread.start()
        self.queue.put((item, answer))

    def submit(self, item: Any) -> Any:
        done, slot = threading.Event(), {}

        def answer(key: str, value: Any) -> None:
            slot[key] = value
            done.set()

        self._enqueue(item, answer)
        done.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    async def submit_async(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(key: str, value: Any) -> None:
            if future.done():  # the request was cancelled (client gone): nobody to answer
                return
            if key == "error":
                future.set_exception(value)
            else:
                future.set_result(value)

        self._enqueue(item, lambda key, value: loop.call_soon_threadsafe(settle, key, value))
        return await future

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self.run([it for it, _ in batch])
                answers = [("error" if isinstance(r, BaseException) else "result", r)
                           for r in results]
            except BaseException as e:  # noqa: BLE001 - the whole batch failed (busy store)
                answers = [("error", e)] * len(batch)
            self.batches, self.items = self.batches + 1, self.items + len(batch)
            for (_, answer), (key, value) in zip(batch, answers, strict=True):
                try:
                    answer(key, value)
                except Exception as e:  # noqa: BLE001 - e.g. its event loop closed at shutdown:
                    log.warning("a request's answer could not be delivered: %r", e)  # go on


ROLES = ("writer", "reader", "compactor", "tiers")
# Restores decoded together at most: one lockstep group. On the H200 a step of 256 streams
# took 2.5-4.1 ms (positions 0-256), of 16 streams 1.1-1.4 ms: waiting restores finish sooner
# in one wide group than in several narrow ones in a row (BENCHMARKS.md: 256 sessions
# restored together at 72,000 tokens/s).
READ_BATCH = 256


class _Namespace:
    """One namespace's stores in this process: writes, reads and compaction each have their
    own Store (own connection, own lock), so a read decoding with the model never holds up a
    put. Concurrent puts are committed together (``Store.put_many``), concurrent reads
    decoded together (``Store.get_many``). A store is opened on first use, without the model
    while it loads (raw edges need none), and is given the model once it has loaded."""

    def __init__(self, service: Service, ns: str) -> None:
        self.service, self.ns = service, ns
        self.locks = {role: threading.Lock() for role in ROLES}
        self._stores: dict[str, Any] = {}
        self.puts = Batcher(lambda items: self.with_model("writer", _put_many, items),
                            name=f"seqkv-puts-{ns}")
        self.gets = Batcher(self._get_batch, max_batch=READ_BATCH, name=f"seqkv-gets-{ns}")
        # the background rebalance's cues: written or read since the last one (True at start:
        # a restarted server applies its budget once), restores served since, the latest one
        self.dirty, self.restores = True, 0
        self.last_restored: str | None = None

    def store(self, role: str, wait: bool = True):
        """The role's Store; call with ``self.locks[role]`` held."""
        s = self._stores.get(role)
        if s is None:
            s = self._stores[role] = self.service.open_store(self.ns, wait)
        lm = self.service.lm
        if s.lm is None and lm is not None:
            s.attach_model(lm)
        return s

    def call(self, role: str, method: str, *args, **kwargs):
        """``store.method(...)`` under the role's lock; where it needs the model and the model
        is still loading, wait for it (outside the lock) and call again."""
        for _ in range(2):
            with self.locks[role]:
                try:
                    return getattr(self.store(role), method)(*args, **kwargs)
                except ModelNeededError:
                    pass
            self.service.model()
        raise ModelNeededError("the model loaded but the store did not take it")

    def with_model(self, role: str, fn: Callable[[Any, list], list], items: list) -> list:
        """``fn(store, items)``, a batch whose items are answered one by one. Items answered
        ModelNeededError (or all, if the call raised it: then nothing was written) are run
        again if the model has loaded meanwhile, answered ModelUnavailable if it could not
        load, and otherwise keep ModelNeededError: the request waits for the model and
        submits again (``submit``), so the batch's thread, and the requests queued behind it
        that need no model, never wait for it; the others' answers stand."""
        out = self._try(role, fn, items)
        redo = [i for i, r in enumerate(out) if isinstance(r, ModelNeededError)]
        if redo and self.service.model_state != "loading":
            try:
                self.service.model()
            except ModelUnavailable as e:
                for i in redo:
                    out[i] = e
                return out
            again = self._try(role, fn, [items[i] for i in redo])
            for i, r in zip(redo, again, strict=True):
                out[i] = r
        return out

    async def submit(self, batcher: Batcher, item: Any) -> Any:
        """``batcher.submit_async(item)``; answered ModelNeededError (the model was loading),
        wait for the model off the event loop and submit once more."""
        try:
            return await batcher.submit_async(item)
        except ModelNeededError:
            await asyncio.to_thread(self.service.model)
            return await batcher.submit_async(item)

    def submit_blocking(self, batcher: Batcher, item: Any) -> Any:
        """``submit`` for a request handled on a worker thread."""
        try:
            return batcher.submit(item)
        except ModelNeededError:
            self.service.model()
            return batcher.submit(item)

    def _try(self, role: str, fn: Callable[[Any, list], list], items: list) -> list:
        with self.locks[role]:
            try:
                return list(fn(self.store(role), items))
            except ModelNeededError as e:
                return [e] * len(items)

    def _get_batch(self, items: list[tuple[str, bool]]) -> list:
        """Each (session, for a KV cache)'s (ids, text or None), or its error."""
        out = self.with_model("reader", _get_many, items)
        served = [name for (name, _), r in zip(items, out, strict=True)
                  if not isinstance(r, BaseException)]
        if served:
            self.dirty, self.restores = True, self.restores + len(served)
            self.last_restored = served[-1]
            self.service.restored(self.restores)
        return out

    def rebalance(self) -> dict:
        """One rebalance of the namespace's tiers, on its own Store and lock (puts and reads go
        on meanwhile), with the restores the reader's Store counted since the last one."""
        self.service.model()
        self.dirty, self.restores = False, 0  # what comes in meanwhile counts for the next one
        try:
            with self.locks["tiers"]:
                s = self.store("tiers")
                reader = self._stores.get("reader")
                if reader is not None:  # the restores it served, merged into the store's
                    s.checkpoints.absorb(reader.checkpoints)
                # LRU admits the latest restore's path (the prior policy ignores it)
                return s.rebalance(self.last_restored)
        except BaseException:
            self.dirty = True
            raise


def _put_many(store, items: list) -> list:
    return store.put_many(items)


def _get_many(store, items: list[tuple[str, bool]]) -> list:
    """Reads of (session, for a KV cache): one decode group for all; a cache read starts
    below the session's deepest checkpoint (its restore starts there) and needs no text."""
    sessions, for_cache = [n for n, _ in items], [c for _, c in items]
    out = []
    for name, cache, ids in zip(sessions, for_cache, store.get_many(sessions, for_cache),
                                strict=True):
        if isinstance(ids, BaseException):
            out.append(ids)
            continue
        try:
            text = store.text_of(name, ids) if store.is_text(name) and not cache else None
            out.append((ids, text))
        except SeqkvError as e:  # ModelNeededError among them: run again with the model
            out.append(e)
    return out


class Service:
    """The stores of every namespace, the model (loaded in the background: the server takes
    requests at once), and the background compactor (a child process)."""

    def __init__(self, db: str, model: str | None = None, keys: dict[str, str] | None = None,
                 compact_interval: float = 2.0, compact_batch: int = 16,
                 device: str = "cpu", tier_budget: int | None = None,
                 tier_policy: str = "prior", tier_quant: tuple[str, float | None] | None = None,
                 tier_interval: float = 30.0, tier_restores: int = 100) -> None:
        self.db, self.model_spec, self.keys, self.device = db, model, keys, device
        self.compact_interval, self.compact_batch = compact_interval, compact_batch
        # the hot tiers (None: no budget, every edge coded, no background rebalance)
        if tier_budget is not None and tier_budget < 0:
            raise ServerConfigError(f"bad tier budget {tier_budget}: bytes, 0 or more")
        if tier_policy not in ("prior", "lru", "prior-guided"):
            raise ServerConfigError(f"bad tier policy {tier_policy!r}: prior or lru")
        self.tier_budget, self.tier_policy, self.tier_quant = tier_budget, tier_policy, tier_quant
        self.tier_interval, self.tier_restores = tier_interval, tier_restores
        self._tiers_wake, self._tiers_stop = threading.Event(), threading.Event()
        self._tiers: threading.Thread | None = None
        self.rebalances = 0  # background rebalances done (healthz)
        self.lm = None  # the model, once loaded and checked against the store
        self.model_state = "loading"
        self._model_error: BaseException | None = None
        self._model_ready = threading.Event()
        self._ns: dict[str, _Namespace] = {}
        self._ns_lock = threading.Lock()
        self._compactor: subprocess.Popen | None = None
        # the compactor process: off (--compact-interval 0), starting (loading its model),
        # running, or exited (it failed: its error is in the server's stderr)
        self.compactor_state = "off"
        # open an existing store now (a bad URL or an unreachable Redis fails at startup); a
        # new one is created by the first write, once the model has loaded
        for ns in self.namespaces():
            n = self.namespace(ns)
            for role in ROLES:
                with n.locks[role]:
                    try:
                        n.store(role, wait=False)
                    except NoStoreError:
                        break

    def namespaces(self) -> list[str]:
        return sorted(set(self.keys.values())) if self.keys else [DEFAULT_NAMESPACE]

    def open_store(self, ns: str, wait: bool = True):
        """A Store of ``ns``, with the model if loaded; a store not created yet waits for the
        model (its meta records the model), or with ``wait=False`` raises NoStoreError."""
        from .store import Store

        tiers = {"checkpoint_budget": self.tier_budget or 0,
                 "checkpoint_policy": self.tier_policy, "checkpoint_quant": self.tier_quant}
        try:
            return Store(self.db, self.lm, ns, **tiers)
        except NoStoreError:
            if self.lm is not None or not wait:
                raise
        self.model()
        return Store(self.db, self.lm, ns, **tiers)

    def namespace(self, ns: str) -> _Namespace:
        n = self._ns.get(ns)
        if n is None:
            with self._ns_lock:
                n = self._ns.get(ns)
                if n is None:
                    n = self._ns[ns] = _Namespace(self, ns)
        return n

    # -- the model ---------------------------------------------------------------------------
    def _load_model(self) -> None:
        try:
            from .core.models import load_model
            from .store import Store

            lm = load_model(self.model_spec, device=self.device)
            Store(self.db, lm, self.namespaces()[0]).close()  # checked, or the store created
            self.lm, self.model_state = lm, "ready"
        except BaseException as e:  # noqa: BLE001 - answered to every request that needs it
            log.error("the model could not be loaded: %s", e)
            self._model_error, self.model_state = e, "failed"
        finally:
            self._model_ready.set()

    def model(self):
        """The model, waiting for it to load (ModelUnavailable if it could not)."""
        self._model_ready.wait()
        if self.lm is None:
            raise ModelUnavailable(f"the server's model could not be loaded: "
                                   f"{self._model_error}")
        return self.lm

    def namespace_of(self, authorization: str | None) -> str:
        if self.keys is None:
            return DEFAULT_NAMESPACE
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        found = None
        if scheme.lower() == "bearer" and token:
            for key, ns in self.keys.items():  # compare against every key: no early exit
                if hmac.compare_digest(key.encode(), token.encode()):
                    found = ns
        if found is None:
            raise _Unauthorized()
        return found

    # -- compaction -------------------------------------------------------------------------
    def compact(self, ns: str, max_rounds: int = 10_000) -> dict:
        n = self.namespace(ns)
        self.model()
        return n.call("compactor", "compact", batch=self.compact_batch,
                      max_rounds=max_rounds).to_dict()

    # -- tiers ------------------------------------------------------------------------------
    def rebalance(self, ns: str) -> dict:
        """Rebalance ``ns``'s tiers now under the server's budget: what `seqkv store rebalance
        --json` prints."""
        if self.tier_budget is None:
            raise SeqkvError("this server keeps no hot tiers: start it with --tier-budget BYTES")
        out = self.namespace(ns).rebalance()
        quant = None
        if self.tier_quant is not None:
            method, bits = self.tier_quant
            quant = method if bits is None else f"{method}:{bits:g}"
        return {"namespace": ns, "budget": self.tier_budget, "policy": self.tier_policy,
                "quant": quant, **out}

    def restored(self, restores: int) -> None:
        """A namespace served ``restores`` restores since its last rebalance."""
        if restores >= self.tier_restores:
            self._tiers_wake.set()

    def _rebalance_loop(self) -> None:
        """The background rebalance: each namespace written or read since its last one, every
        ``tier_interval`` seconds (sooner when one served ``tier_restores`` restores)."""
        try:
            self.model()
        except ModelUnavailable:
            return  # logged once by _load_model; POST /v1/rebalance answers 500 alike
        while True:
            self._tiers_wake.wait(self.tier_interval)
            self._tiers_wake.clear()
            if self._tiers_stop.is_set():
                return
            for ns in self.namespaces():
                n = self.namespace(ns)
                if not n.dirty:
                    continue
                try:
                    n.rebalance()
                    self.rebalances += 1
                except Exception as e:  # noqa: BLE001 - keep rebalancing; report and go on
                    log.warning("background rebalance of %r failed: %s", ns, e)

    def start(self) -> None:
        """Load the model in the background, start the compactor process and, with a tier
        budget, the background rebalance."""
        threading.Thread(target=self._load_model, name="seqkv-model", daemon=True).start()
        if self.tier_budget is not None and self._tiers is None:
            self._tiers_stop.clear()
            self._tiers = threading.Thread(target=self._rebalance_loop, name="seqkv-tiers",
                                           daemon=True)
            self._tiers.start()
        if self.compact_interval > 0 and self._compactor is None:
            self._compactor = subprocess.Popen(
                [sys.executable, "-c", "from seqkv.server import compactor_main as m; m()",
                 json.dumps(self.compactor_args())], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, close_fds=True)
            os.set_blocking(self._compactor.stdin.fileno(), False)
            self.compactor_state = "starting"
            threading.Thread(target=self._watch_compactor, args=(self._compactor,),
                             name="seqkv-compactor-watch", daemon=True).start()

    def compactor_args(self) -> dict:
        """What the compactor process is started with (compactor_main's argument)."""
        return {"db": self.db, "model": self.model_spec, "device": self.device,
                "namespaces": self.namespaces(), "interval": self.compact_interval,
                "batch": self.compact_batch, "parent": os.getpid()}

    def _watch_compactor(self, p: subprocess.Popen) -> None:
        """The compactor says "ready" once its model has loaded; its stdout closes when it
        exits."""
        for line in p.stdout:
            if line.strip() == b"ready":
                self.compactor_state = "running"
        if self._compactor is p:
            self.compactor_state = "exited"

    def stop(self) -> None:
        self._tiers_stop.set()  # the rebalance thread stops after its current round
        self._tiers_wake.set()
        self._tiers = None
        p, self._compactor = self._compactor, None
        if p is not None:
            self.compactor_state = "off"
        if p is not None:
            p.stdin.close()  # end of its input: the compactor stops after its current round
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                p.kill()  # compaction is crash-safe: a kill loses nothing
                p.wait()

    def wrote(self) -> None:
        """Wake the compactor: there is something to code."""
        if self._compactor is not None:
            try:
                os.write(self._compactor.stdin.fileno(), b"w")
            except (BlockingIOError, BrokenPipeError, ValueError):
                pass  # already woken (pipe full), or gone


def compactor_main() -> None:
    """The background compactor, a child process of the server: it codes pending raw edges
    under the model every ``interval`` seconds and when the server writes a byte to its
    stdin (a put happened), on CPU time the server leaves idle, so that model work
    never holds up a request (no shared interpreter lock, and the scheduler favours the
    server). It stops when its stdin closes, and dies with the server (SIGKILL included)."""
    args = json.loads(sys.argv[1])
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed stdin still stops it once the server is gone
    if os.getppid() != args["parent"]:
        return  # the server died before the line above
    # CPU time the server leaves idle (its threads inherit it), where it may come back to the
    # normal policy to hold the write lock; else the lowest nice value
    idle = _may_leave_idle() and _scheduling(idle=True)
    if not idle:
        with contextlib.suppress(OSError):
            os.nice(19)
    from .core.models import load_model
    from .store import Store

    logging.basicConfig(level=logging.WARNING, format="seqkv compactor: %(message)s")
    lm = load_model(args["model"], device=args["device"])
    print("ready", flush=True)  # to the server (healthz: "compactor": "running")
    stores: dict[str, Any] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], args["interval"])
        if ready and not os.read(sys.stdin.fileno(), 4096):
            return  # the server closed our stdin: stop
        for ns in args["namespaces"]:
            try:
                if ns not in stores:
                    stores[ns] = Store(args["db"], lm, ns)
                    if idle:
                        _normal_while_locked(stores[ns].backend)
                stores[ns].compact(batch=args["batch"], max_rounds=4)
            except NoStoreError:
                pass  # nothing written yet
            except Exception as e:  # noqa: BLE001 - keep compacting; report and go on
                log.warning("background compaction of %r failed: %s", ns, e)


def _scheduling(idle: bool) -> bool:
    """This thread to SCHED_IDLE (or back to the normal policy); False where not possible."""
    try:
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        os.sched_setscheduler(0, policy, os.sched_param(0))
        return True
    except (AttributeError, OSError):
        return False


def _may_leave_idle() -> bool:
    """Whether this process could return from SCHED_IDLE to the normal policy: an
    unprivileged one may only where RLIMIT_NICE allows its nice value (often it does not)."""
    if os.geteuid() == 0:
        return True
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return False
    return soft == resource.RLIM_INFINITY or 20 - soft <= os.nice(0)


def _normal_while_locked(backend) -> None:
    """The compactor takes the store's write lock only to swap coded edges in (no model
    work); it does so at the normal priority, so that a busy server cannot starve it of the
    CPU while its own writer waits for that lock (a priority inversion)."""
    transaction = backend.transaction

    @contextlib.contextmanager
    def at_normal_priority(*args, **kwargs):
        _scheduling(idle=False)
        try:
            with transaction(*args, **kwargs) as txn:
                yield txn
        finally:
            _scheduling(idle=True)

    backend.transaction = at_normal_priority


class ModelUnavailable(SeqkvError):
    """The server's model failed to load (or does not match the store)."""


class _Unauthorized(Exception):
    pass


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _session_id(session: str) -> str:
    if not SESSION_ID.match(session):
        raise SeqkvError("a session id is 1-256 printable ASCII characters without spaces")
    return session


def cache_file_bytes(restored) -> bytes:
    """A restored cache as `seqkv kv-dump` writes it (seqkv/delta/cachefile.py's format)."""
    import torch
    from safetensors.torch import save

    from .core.cache import KVCache

    kv = KVCache.from_dynamic(restored.cache, restored.input_ids)
    tensors = {"input_ids": torch.tensor([kv.input_ids], dtype=torch.int64).reshape(1, -1)}
    for i, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        tensors[f"layers.{i}.keys"] = k.contiguous()
        tensors[f"layers.{i}.values"] = v.contiguous()
    return save(tensors, metadata={"format": "seqkv-kv-cache-v1"})


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413, declared or streamed."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    return await _error(413, f"request body over {self.limit} bytes")(
                        scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a streamed (chunked) body: answered as an HTTP error
                    raise StarletteHTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


async def _namespace(request: Request,
                     authorization: Annotated[str | None, Header()] = None) -> str:
    """The namespace the request's API key opens (401 without a valid key)."""
    return request.app.state.service.namespace_of(authorization)


Ns = Annotated[str, Depends(_namespace)]


def create_app(service: Service, max_body: int = MAX_BODY) -> FastAPI:
    """The HTTP application over ``service``."""

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.stop()

    app = FastAPI(title="seqkv", version="1", lifespan=lifespan,
                  description="The PLT store of transformer KV caches as coded token sequences.")
    app.state.service = service
    _error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        """200 as soon as the server takes requests; ``model``: loading, ready or failed
        (puts and reads of raw edges need no model; coding, decoding and text wait for it);
        ``compactor``: the background compactor, off, starting, running or exited;
        ``device``: where the model runs (the compactor's too); ``tiers``: on with a
        --tier-budget, and ``rebalances`` the background rebalances done."""
        return {"status": "ok", "model": service.model_state,
                "compactor": service.compactor_state, "device": service.device,
                "tiers": "off" if service.tier_budget is None else "on",
                "rebalances": service.rebalances}

    @app.put("/v1/sessions/{session}", status_code=201,
             responses={200: {"description": "replaced an existing session"}})
    async def put_session(session: str, body: SessionBody, ns: Ns, replace: bool = True
                          ) -> JSONResponse:
        """Store a session; ``replace=false``: 409 if the id exists."""
        item = (_session_id(session), body.data(), replace)
        n = service.namespace(ns)
        r = await n.submit(n.puts, item)  # group commit
        service.wrote()
        n.dirty = True  # the next background rebalance sees the new session
        return JSONResponse({"session": r.session, "tokens": r.tokens,
                             "shared_tokens": r.shared_tokens, "new_tokens": r.new_tokens,
                             "created": not r.replaced},
                            status_code=200 if r.replaced else 201)

    @app.get("/v1/sessions/{session}")
    async def get_session(session: str, ns: Ns) -> dict:
        n = service.namespace(ns)
        ids, text = await n.submit(n.gets, (_session_id(session), False))
        return {"session": session, "ids": ids, "text": text}

    @app.get("/v1/sessions/{session}/cache", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}},
                              "description": "a safetensors cache file (seqkv kv-dump format)"}})
    def get_cache(session: str, ns: Ns) -> Response:
        n = service.namespace(ns)
        # decoded with concurrent requests, from the session's deepest checkpoint down
        n.submit_blocking(n.gets, (_session_id(session), True))
        service.model()
        # then a prefill of the decoded ids (the batched read counted this restore)
        restored = n.call("reader", "get_cache", session, count=False)
        return Response(cache_file_bytes(restored), media_type="application/octet-stream",
                        headers={"Content-Disposition":
                                 'attachment; filename="cache.safetensors"'})

    @app.delete("/v1/sessions/{session}")
    def delete_session(session: str, ns: Ns) -> dict:
        n = service.namespace(ns)
        n.call("writer", "delete", _session_id(session))
        n.dirty = True
        return {"session": session, "deleted": True}

    @app.get("/v1/stats")
    def stats(ns: Ns) -> dict:
        service.model()  # the figures of `store stats --json`, fp16 KV sizes included
        return service.namespace(ns).call("reader", "stats")

    @app.post("/v1/nearest")
    def nearest(body: NearestBody, ns: Ns) -> list[dict]:
        return service.namespace(ns).call("reader", "nearest", body.data(), k=body.k)

    @app.post("/v1/compact")
    def compact(ns: Ns) -> dict:
        return service.compact(ns)

    @app.post("/v1/rebalance", response_model=RebalanceResult)
    def rebalance(ns: Ns) -> dict:
        """Give each trie node of the key's namespace its tier now, under the server's
        --tier-budget (with --tier-policy and --tier-quant), from the restores this server
        served: KV checkpoints written and dropped, hot coded edges swapped back to raw, cooled
        ones left to the next compaction. Answers when done; 400 if the server was started
        without --tier-budget. The server also does this in the background."""
        return service.rebalance(ns)

    app.add_middleware(_BodyLimit, limit=max_body)
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized):
        return _error(401, "missing or unknown API key (Authorization: Bearer KEY)",
                      {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(NoSessionError)
    async def no_session(request: Request, exc: NoSessionError):
        return _error(404, "no such session")

    @app.exception_handler(SessionExistsError)
    async def exists(request: Request, exc: SessionExistsError):
        return _error(409, str(exc))

    @app.exception_handler(StoreBusyError)
    async def busy(request: Request, exc: StoreBusyError):
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(StoreUnavailableError)
    async def backend_down(request: Request, exc: StoreUnavailableError):
        log.error("store backend failed on %s %s: %s", request.method, request.url.path, exc)
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(BlobError)
    async def corrupt(request: Request, exc: BlobError):
        # the request was fine: a stored record failed its checksum (or another model's)
        log.error("corrupt store on %s %s: %s", request.method, request.url.path, exc)
        return _error(500, str(exc))

    @app.exception_handler(ModelUnavailable)
    async def no_model(request: Request, exc: ModelUnavailable):
        return _error(500, str(exc))

    @app.exception_handler(SeqkvError)
    async def bad_input(request: Request, exc: SeqkvError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"malformed request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
        return _error(500, f"internal error ({type(exc).__name__})")


def check_model_spec(model: str | None) -> None:
    """Refuse, before listening, a model that cannot be loaded at all (a missing path); the
    model itself loads in the background once the server takes requests."""
    from .core.packaged import NAMES

    if model is None or str(model) in ("default", *NAMES):
        return
    p = Path(model)
    if not p.exists():
        raise ServerConfigError(f"model path does not exist: {model}")
    if not ((p.is_file() and p.suffix == ".gguf") or (p / "config.json").is_file()):
        raise ServerConfigError(f"not a model directory or .gguf file: {model}")


def check_device(device: str) -> str:
    """Refuse, before listening, a device the model cannot be put on: not cpu, cuda or
    cuda:N, or a GPU this machine does not have. torch is imported only for a GPU (the
    server takes requests before the model, and torch, have loaded)."""
    if not DEVICE.match(device):
        raise ServerConfigError(f"bad --device {device!r}: give cpu, cuda or cuda:N")
    if device == "cpu":
        return device
    import torch

    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else ", a CPU-only build"
        raise ServerConfigError(f"--device {device}: no CUDA GPU is available here (torch "
                                f"{torch.__version__}{build})")
    count, index = torch.cuda.device_count(), int(device.partition(":")[2] or 0)
    if index >= count:
        raise ServerConfigError(f"--device {device}: this machine has {count} CUDA GPU(s), "
                                f"cuda:0 to cuda:{count - 1}")
    return device


def serve(db: str, host: str = "127.0.0.1", port: int = 8765, keys: str | None = None,
          model: str | None = None, max_body: int = MAX_BODY, compact_interval: float = 2.0,
          device: str = "cpu", tier_budget: int | None = None, tier_policy: str = "prior",
          tier_quant: tuple[str, float | None] | None = None, tier_interval: float = 30.0,
          tier_restores: int = 100) -> None:
    """Open the store and listen; the model loads in the background meanwhile (/healthz
    answers at once, and puts and reads of raw edges need no model). ``device``: where the
    model runs (cpu, cuda, cuda:N), in the server and its compactor process. ``tier_*``: the
    hot tiers' budget per namespace (None: none), policy, checkpoint quantizer, and when the
    background rebalance runs (see the module's docstring)."""
    import uvicorn

    key_map = load_keys(keys) if keys else None
    if key_map is None and not is_loopback(host):
        raise ServerConfigError(f"refusing to serve on non-loopback host {host} without "
                                "--keys (anyone who can reach it could read every session)")
    if not 0 < port < 65536:
        raise ServerConfigError(f"bad port {port}")
    from .store.registry import SQLITE, backend_kind
    from .store.sqlite import check_sqlite_file

    if backend_kind(db) == SQLITE:  # an unknown URL scheme is refused here too
        check_sqlite_file(db, create=True)  # refuse a non-store file before anything else
    check_model_spec(model)
    check_device(device)
    service = Service(db, model, key_map, compact_interval=compact_interval, device=device,
                      tier_budget=tier_budget, tier_policy=tier_policy, tier_quant=tier_quant,
                      tier_interval=tier_interval, tier_restores=tier_restores)
    app = create_app(service, max_body)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
