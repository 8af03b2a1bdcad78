"""`seqkv serve`: the PLT store over HTTP (JSON), for many clients and several server processes.

    GET    /healthz                      200 once the model is loaded and the store open
    PUT    /v1/sessions/{id}             {"text"} or {"ids"} -> 201 new / 200 replaced, once durable
    GET    /v1/sessions/{id}             {"session", "ids", "text"} (text null for an ids session)
    GET    /v1/sessions/{id}/cache       the restored KV cache, a safetensors file in the
                                         interchange format of `seqkv kv-dump`
    DELETE /v1/sessions/{id}
    GET    /v1/stats                     the fields of `seqkv store stats --json`
    POST   /v1/nearest                   {"text"} or {"ids"}, optional "k"
    POST   /v1/compact                   codes what is pending; answers when done
    GET    /docs, /openapi.json          the API's OpenAPI description

Auth: with ``--keys KEYS.json`` ({"API key": "namespace", ...}) every /v1 request carries
``Authorization: Bearer KEY``; a missing or unknown key is 401, and a key sees its namespace
only: another namespace's session is 404, exactly as a session that never existed. Without
keys the server serves the default namespace and refuses to listen on anything but loopback.

Writes return once durable (a raw edge, no model work under the store's write lock); a
background thread compacts pending edges (``Store.compact``), as does ``POST /v1/compact``.
Several server processes may share one store (Redis, or one SQLite file): every write is a
backend transaction and compaction swaps edges by compare-and-swap.

Errors are JSON ``{"error": "..."}``: 400 bad input, 401 no or unknown key, 404 no such
session (or route), 409 the session exists (a PUT with ``?replace=false``), 413 body too
large, 422 malformed body, 503 store busy (retry), 500 a corrupt stored record or an
unexpected failure (no traceback is sent).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
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
from .store.backend import NoSessionError, SessionExistsError, StoreBusyError

log = logging.getLogger("seqkv.server")
DEFAULT_NAMESPACE = "default"
MAX_BODY = 8 << 20  # bytes of a request body
SESSION_ID = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces, 1-256 chars


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


# -- the service ----------------------------------------------------------------------------


class Batcher:
    """Group concurrent requests: the first caller to find no batch running takes every
    request queued so far (its own included) and runs them as one call of ``run``; the
    others wait for their result. No timer: an idle server answers a lone request at once,
    and under load the requests that arrive while one batch runs form the next (group
    commit for puts: one transaction and one fsync for many; one decode group for reads)."""

    def __init__(self, run: Callable[[list], list], max_batch: int = 64) -> None:
        self.run, self.max_batch = run, max_batch
        self.cv = threading.Condition()
        self.queue: list[tuple[Any, dict]] = []
        self.busy = False
        self.batches = self.items = 0  # counters, for the benchmarks

    def submit(self, item: Any) -> Any:
        slot: dict = {}  # gets "result" or "error"
        with self.cv:
            self.queue.append((item, slot))
        while True:
            with self.cv:
                while not slot and self.busy:
                    self.cv.wait()
                if slot:
                    return self._answer(slot)
                self.busy = True  # this caller runs the next batch
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            try:
                results = self.run([it for it, _ in batch])
                for (_, sl), r in zip(batch, results, strict=True):
                    sl["error" if isinstance(r, BaseException) else "result"] = r
            except BaseException as e:  # the whole batch failed (busy store, lost backend)
                for _, sl in batch:
                    sl["error"] = e
            finally:
                with self.cv:
                    self.busy = False
                    self.batches, self.items = self.batches + 1, self.items + len(batch)
                    self.cv.notify_all()

    @staticmethod
    def _answer(slot: dict) -> Any:
        if "error" in slot:
            raise slot["error"]
        return slot["result"]


class _Namespace:
    """One namespace's stores in this process: writes, reads and compaction each have their
    own Store (own connection, own lock), so a read decoding with the model or a compaction
    round never holds up a put. Concurrent puts are committed together (``Store.put_many``),
    concurrent reads decoded together (``Store.get_many``)."""

    def __init__(self, open_store: Callable[[], Any]) -> None:
        self.writer, self.reader, self.compactor = open_store(), open_store(), open_store()
        self.write_lock, self.read_lock = threading.Lock(), threading.Lock()
        self.compact_lock = threading.Lock()
        self.puts = Batcher(self._put_batch)
        self.gets = Batcher(self._get_batch)

    def _put_batch(self, items: list) -> list:
        with self.write_lock:
            return self.writer.put_many(items)

    def _get_batch(self, sessions: list[str]) -> list:
        with self.read_lock:
            out = []
            for name, ids in zip(sessions, self.reader.get_many(sessions), strict=True):
                if isinstance(ids, BaseException):
                    out.append(ids)
                    continue
                try:
                    text = self.reader.get_text(name) if self.reader.is_text(name) else None
                    out.append((ids, text))
                except SeqkvError as e:
                    out.append(e)
            return out


class Service:
    def __init__(self, db: str, lm, keys: dict[str, str] | None = None,
                 compact_interval: float = 2.0, compact_batch: int = 16) -> None:
        from .store import Store

        self.db, self.lm, self.keys = db, lm, keys
        self.model_lock = threading.Lock()  # one model, shared by every namespace's stores
        self.compact_interval, self.compact_batch = compact_interval, compact_batch
        self._store_cls = Store
        self._ns: dict[str, _Namespace] = {}
        self._ns_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # open (or create) the store now, so that /healthz answers only once it is usable
        for ns in sorted(set(keys.values())) if keys else [DEFAULT_NAMESPACE]:
            self.namespace(ns)

    def _open(self, ns: str):
        s = self._store_cls(self.db, self.lm, ns)
        s.model_lock = self.model_lock
        return s

    def namespace(self, ns: str) -> _Namespace:
        with self._ns_lock:
            if ns not in self._ns:
                self._ns[ns] = _Namespace(lambda: self._open(ns))
            return self._ns[ns]

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
        with n.compact_lock:
            return n.compactor.compact(batch=self.compact_batch, max_rounds=max_rounds).to_dict()

    def _compact_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.compact_interval)
            self._wake.clear()
            for ns in list(self._ns):
                if self._stop.is_set():
                    break
                try:
                    self.compact(ns, max_rounds=4)  # short rounds: shutdown stays prompt
                except Exception as e:  # noqa: BLE001 - keep compacting; report and go on
                    log.warning("background compaction of %r failed: %s", ns, e)

    def start(self) -> None:
        if self.compact_interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._compact_loop, name="seqkv-compact",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def wrote(self) -> None:
        self._wake.set()


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


def _namespace(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
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

    @app.exception_handler(BlobError)
    async def corrupt(request: Request, exc: BlobError):
        # the request was fine: a stored record failed its checksum (or another model's)
        log.error("corrupt store on %s %s: %s", request.method, request.url.path, exc)
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

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.put("/v1/sessions/{session}", status_code=201,
             responses={200: {"description": "replaced an existing session"}})
    def put_session(session: str, body: SessionBody, ns: Ns, replace: bool = True
                    ) -> JSONResponse:
        """Store a session; ``replace=false``: 409 if the id exists."""
        data = body.data()
        n = service.namespace(ns)
        r = n.puts.submit((_session_id(session), data, replace))
        service.wrote()
        return JSONResponse({"session": r.session, "tokens": r.tokens,
                             "shared_tokens": r.shared_tokens, "new_tokens": r.new_tokens,
                             "created": not r.replaced},
                            status_code=200 if r.replaced else 201)

    @app.get("/v1/sessions/{session}")
    def get_session(session: str, ns: Ns) -> dict:
        n = service.namespace(ns)
        ids, text = n.gets.submit(_session_id(session))
        return {"session": session, "ids": ids, "text": text}

    @app.get("/v1/sessions/{session}/cache", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}},
                              "description": "a safetensors cache file (seqkv kv-dump format)"}})
    def get_cache(session: str, ns: Ns) -> Response:
        n = service.namespace(ns)
        n.gets.submit(_session_id(session))  # decoded with concurrent requests, as one group
        with n.read_lock:
            restored = n.reader.get_cache(session)  # then a prefill of the decoded ids
        return Response(cache_file_bytes(restored), media_type="application/octet-stream",
                        headers={"Content-Disposition":
                                 'attachment; filename="cache.safetensors"'})

    @app.delete("/v1/sessions/{session}")
    def delete_session(session: str, ns: Ns) -> dict:
        n = service.namespace(ns)
        with n.write_lock:
            n.writer.delete(_session_id(session))
        return {"session": session, "deleted": True}

    @app.get("/v1/stats")
    def stats(ns: Ns) -> dict:
        n = service.namespace(ns)
        with n.read_lock:
            return n.reader.stats()

    @app.post("/v1/nearest")
    def nearest(body: NearestBody, ns: Ns) -> list[dict]:
        n = service.namespace(ns)
        with n.read_lock:
            return n.reader.nearest(body.data(), k=body.k)

    @app.post("/v1/compact")
    def compact(ns: Ns) -> dict:
        return service.compact(ns)

    app.add_middleware(_BodyLimit, limit=max_body)
    return app


def serve(db: str, host: str = "127.0.0.1", port: int = 8765, keys: str | None = None,
          model: str | None = None, max_body: int = MAX_BODY, compact_interval: float = 2.0,
          ready: Callable[[], None] | None = None) -> None:
    """Load the model, open the store, then listen (the port opens only once ready)."""
    import uvicorn

    key_map = load_keys(keys) if keys else None
    if key_map is None and not is_loopback(host):
        raise ServerConfigError(f"refusing to serve on non-loopback host {host} without "
                                "--keys (anyone who can reach it could read every session)")
    if not 0 < port < 65536:
        raise ServerConfigError(f"bad port {port}")
    from .core.models import load_model
    from .store.registry import SQLITE, backend_kind
    from .store.sqlite import check_sqlite_file

    if backend_kind(db) == SQLITE:  # an unknown URL scheme is refused here too
        check_sqlite_file(db, create=True)  # refuse a non-store file before the model loads
    lm = load_model(model)
    service = Service(db, lm, key_map, compact_interval=compact_interval)
    app = create_app(service, max_body)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
