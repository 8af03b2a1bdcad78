"""A client of `seqkv serve` (standard library only: no torch, no HTTP package).

    from seqkv.client import Client
    c = Client("http://127.0.0.1:8765", api_key="...")   # or $SEQKV_API_KEY
    c.put("s1", text="...")          # {"session", "tokens", ...} once durable
    c.get("s1")                      # {"session", "ids", "text"}
    c.get_cache("s1")                # bytes of a safetensors cache file (seqkv kv-dump format)
    c.delete("s1"); c.stats(); c.nearest(text="..."); c.compact()

Every failure is a :class:`ServerError` (a SeqkvError) with the server's one-line message and
the HTTP status (``NotFound`` for 404), or "cannot reach" when nothing answers.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .core.errors import SeqkvError

API_KEY_ENV = "SEQKV_API_KEY"


class ServerError(SeqkvError):
    """The server refused a request (or could not be reached: status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class NotFound(ServerError):
    """404: no such session in the key's namespace (or no such route)."""


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SeqkvError(f"not a server URL (http://HOST:PORT): {url}")
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace")[:200] or e.reason
            cls = NotFound if e.code == 404 else ServerError
            raise cls(f"server: {message} (HTTP {e.code})", e.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            # refused, reset, or cut off mid-answer (IncompleteRead, RemoteDisconnected)
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            raise ServerError(f"cannot reach seqkv server at {self.url}: {reason}") from None

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
