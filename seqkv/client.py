"""A client of `seqkv serve` (standard library only: no torch, no HTTP package).

    from seqkv.client import Client
    c = Client("http://127.0.0.1:8765", api_key="...")   # or $SEQKV_API_KEY
    c.put("s1", text="...")          # {"session", "tokens", ...} once durable
    c.get("s1")                      # {"session", "ids", "text"}
    c.get_cache("s1")                # bytes of a safetensors cache file (seqkv kv-dump format)
    c.delete("s1"); c.stats(); c.nearest(text="..."); c.compact()
    c.rebalance()                    # the namespace's tiers under the server's --tier-budget

    proc, url = start_server("store.db", "--model", "DIR")   # `seqkv serve` on a free
                                     # loopback port, once it answers /healthz (wait_healthy)

Every failure is a :class:`ServerError` (a SeqkvError) with the server's one-line message and
the HTTP status (``NotFound`` for 404), or "cannot reach" when nothing answers.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any

from .core.errors import SeqkvError

API_KEY_ENV = "SEQKV_API_KEY"
KEEP_ALIVE_S = 4.0  # reuse a connection idle for less than this (uvicorn closes them at 5 s)
# how a kept-alive connection the server has closed fails on its next request
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class ServerError(SeqkvError):
    """The server refused a request (or could not be reached: status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class NotFound(ServerError):
    """404: no such session in the key's namespace (or no such route)."""


class Client:
    """A client of one server. It keeps one HTTP/1.1 connection per thread open between
    requests (keep-alive), so a request costs no TCP handshake; a connection the server closed
    while idle is replaced, and a request it refused that way is sent once more. A Client may
    be shared by threads."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SeqkvError(f"not a server URL (http://HOST:PORT): {url}")
        self.url = url.rstrip("/")
        self._parts = parts
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout
        self._local = threading.local()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it was used before (it may have gone stale)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and time.monotonic() - self._local.used < KEEP_ALIVE_S:
            return conn, True
        self.close()
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else \
            http.client.HTTPConnection
        conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout)
        self._local.conn = conn
        return conn, False

    def close(self) -> None:
        """Close this thread's connection (the next request opens another)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        prefix = self._parts.path.rstrip("/")
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, prefix + path, body=data, headers=headers)
                r = conn.getresponse()
                status, raw = r.status, r.read()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if reused and isinstance(e, _STALE):
                    continue  # the server had closed the idle connection: a fresh one
                # refused, reset, or cut off mid-answer (IncompleteRead, RemoteDisconnected)
                raise ServerError(f"cannot reach seqkv server at {self.url}: "
                                  f"{type(e).__name__}: {e}") from None
            self._local.used = time.monotonic()
            if r.will_close:
                self.close()
            break
        if status >= 400:
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace")[:200] or r.reason
            cls = NotFound if status == 404 else ServerError
            raise cls(f"server: {message} (HTTP {status})", status)
        return status, raw

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self._request(method, path, body)[1])

    @staticmethod
    def _sid(session: str) -> str:
        return "/v1/sessions/" + urllib.parse.quote(session, safe="")

    @staticmethod
    def _tokens(text: str | None, ids: list[int] | None) -> dict:
        if (text is None) == (ids is None):
            raise SeqkvError("give exactly one of text and ids")
        return {"text": text} if text is not None else {"ids": [int(i) for i in ids]}

    def healthz(self) -> bool:
        return self._json("GET", "/healthz").get("status") == "ok"

    def health(self) -> dict:
        """/healthz's fields: status, model (loading, ready, failed), compactor, device."""
        return self._json("GET", "/healthz")

    def put(self, session: str, text: str | None = None, ids: list[int] | None = None,
            replace: bool = True) -> dict:
        """Store a session (replacing one of that id, unless ``replace=False``: then an
        existing one is a 409); returns once it is durable."""
        query = "" if replace else "?replace=false"
        return self._json("PUT", self._sid(session) + query, self._tokens(text, ids))

    def get(self, session: str) -> dict:
        return self._json("GET", self._sid(session))

    def get_ids(self, session: str) -> list[int]:
        return self.get(session)["ids"]

    def get_text(self, session: str) -> str:
        text = self.get(session)["text"]
        if text is None:
            raise SeqkvError(f"session {session!r} holds token ids, not text")
        return text

    def get_cache(self, session: str) -> bytes:
        """The restored KV cache as a safetensors file (``seqkv.delta.parse_cachefile``)."""
        return self._request("GET", self._sid(session) + "/cache")[1]

    def delete(self, session: str) -> dict:
        return self._json("DELETE", self._sid(session))

    def stats(self) -> dict:
        return self._json("GET", "/v1/stats")

    def nearest(self, text: str | None = None, ids: list[int] | None = None,
                k: int = 10) -> list[dict]:
        return self._json("POST", "/v1/nearest", {**self._tokens(text, ids), "k": k})

    def compact(self) -> dict:
        """Code what is pending in the key's namespace; returns when done."""
        return self._json("POST", "/v1/compact")

    def rebalance(self) -> dict:
        """Rebalance the key's namespace's tiers (KV checkpoints, edges kept raw, coded) under
        the server's --tier-budget now; returns the summary (``seqkv store rebalance --json``'s
        fields) when done. A server without --tier-budget answers 400."""
        return self._json("POST", "/v1/rebalance")


def wait_healthy(url: str, timeout: float = 300.0, proc=None, model: bool = False) -> float:
    """Wait until the server at ``url`` answers ``GET /healthz`` (with ``model``: until its
    model has loaded too; the server takes requests before that); returns the seconds
    waited. ``proc`` (a ``subprocess.Popen`` of ``seqkv serve``): fail at once if it exits
    first. ServerError if it is not healthy within ``timeout`` seconds."""
    c, t0 = Client(url, timeout=2.0), time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-3000:] if proc.stderr else ""
            raise ServerError(f"the server exited with code {proc.returncode} before it "
                              f"answered: {err}")
        try:
            state = c._json("GET", "/healthz")
        except ServerError:
            state = {}
        if state.get("status") == "ok" and (not model or state.get("model") != "loading"):
            c.close()
            if model and state.get("model") == "failed":
                raise ServerError(f"the server at {url} could not load its model")
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise ServerError(f"no healthy seqkv server at {url} after {timeout:g} s")
        time.sleep(0.05)


def start_server(db: str, *args: str, port: int | None = None, timeout: float = 300.0,
                 model: bool = False, **popen) -> tuple[subprocess.Popen, str]:
    """Start ``seqkv serve --db DB [ARGS]`` on a loopback port (a free one unless ``port``)
    and wait until it is healthy (``model``: and its model loaded, see ``wait_healthy``):
    (the process, its URL). ``popen``: subprocess.Popen's keywords (stderr is a pipe unless
    given). The caller stops it (``stop_server``, or a kill)."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "seqkv", "serve", "--db", db, "--port", str(port), *args]
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(cmd, **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout, proc, model)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop a server ``start_server`` started: SIGTERM, then SIGKILL if it has not exited
    within ``timeout`` seconds; its stderr pipe is closed."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
