"""Adversarial namespace test of `seqkv serve` (loopback): a tenant's sessions against another
tenant's key, no key, wrong keys, and path tricks. Counts reads (an answer carrying the
victim's data) and existence leaks (an answer about a victim's session id that differs from
the answer about an id that never existed, after the id is substituted).

    python benchmarks/store_adversarial.py [--model tiny|default|PATH] [--db sqlite|redis://...]
        [--out benchmarks/results/store_adversarial.json]

Tenant A stores sessions (text and ids); the attacker holds key B (or none, or forged ones)
and, for every victim id and a never-existed twin of the same length, sends GET, GET /cache,
DELETE, and PUT ?replace=false, with each path trick: the id as is, percent-encoded (once and
twice), with ``..`` segments (plain and %2e%2e), encoded slashes, a namespace prefix
(``tenant-a/``, ``tenant-a:``), NUL and backslash suffixes, overlong (257 and 10,000
characters), query strings and headers naming the victim's namespace. Also POST /v1/nearest
with the victim's text and GET /v1/stats. The victim's data is checked untouched at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from store_loadtest import Server  # noqa: E402

from seqkv.client import Client, NotFound  # noqa: E402
from seqkv.testing import tiny_model_dir  # noqa: E402


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def tricks(sid: str) -> list[str]:
    q = urllib.parse.quote(sid, safe="")
    qq = urllib.parse.quote(q, safe="")
    return [f"/v1/sessions/{q}", f"/v1/sessions/{qq}", f"/v1/sessions/..%2F{q}",
            f"/v1/sessions/%2e%2e/{q}", f"/v1/sessions/%2E%2E%2F{q}",
            f"/v1/sessions/{q}/../{q}", f"/v1/../v1/sessions/{q}",
            f"/v1/sessions/tenant-a%2F{q}", f"/v1/sessions/tenant-a/{q}",
            f"/v1/sessions/tenant-a:{q}", f"/v1/sessions/{q}%00", f"/v1/sessions/{q}%5C",
            f"/v1/sessions/%5C..%5Ctenant-a%5C{q}", f"/v1/sessions/{q}?namespace=tenant-a",
            f"/v1/sessions/{q}?ns=tenant-a&key=x", f"/v1/sessions/{q}{'x' * 240}",
            f"/v1/sessions/{q}{'y' * 10000}", f"/v1/sessions/{q}%20", f"/v1/sessions/%20{q}"]


def _path(p: str, method: str, suffix: str) -> str:
    base, _, query = p.partition("?")
    if method == "PUT":
        query = (query + "&" if query else "") + "replace=false"
    return base + suffix + ("?" + query if query else "")


def _masked(body: bytes, sid: str) -> bytes:
    """An answer with the session id it names taken out (the id is the request's own)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "session" in data:
        return json.dumps({k: v for k, v in data.items() if k != "session"}).encode()
    return body.replace(urllib.parse.quote(sid, safe="").encode(), b"ID").replace(
        sid.encode(), b"ID")


def probe(url: str, victims: list[str], auths: dict, needles: list[bytes]
          ) -> tuple[int, int, int, list[str]]:
    """Every (victim id, auth, trick, method) next to its never-existed twin."""
    requests = reads = leaks = 0
    examples: list[str] = []
    calls = (("GET", "", None), ("GET", "/cache", None), ("DELETE", "", None),
             ("PUT", "", b'{"ids": [5]}'))
    for sid in victims:
        twin = ("n" + uuid.uuid4().hex * 8)[: len(sid)] if len(sid) > 1 else "q"
        for auth_name, headers in auths.items():
            h = {**headers, "Content-Type": "application/json"}
            for t_victim, t_twin in zip(tricks(sid), tricks(twin), strict=True):
                for method, suffix, body in calls:
                    p1, p2 = _path(t_victim, method, suffix), _path(t_twin, method, suffix)
                    r1 = request(url, method, p1, body, h)
                    if method == "PUT" and r1[0] < 300:  # made in the attacker's namespace
                        request(url, "DELETE", p1.split("?")[0], None, h)
                    r2 = request(url, method, p2, body, h)
                    if method == "PUT" and r2[0] < 300:
                        request(url, "DELETE", p2.split("?")[0], None, h)
                    requests += 2
                    if any(n in r1[1] for n in needles):
                        reads += 1
                        examples.append(f"read: {auth_name} {method} {p1[:80]}")
                    if r1[0] != r2[0] or _masked(r1[1], sid) != _masked(r2[1], twin):
                        leaks += 1
                        examples.append(f"leak: {auth_name} {method} {p1[:80]} -> {r1[0]} "
                                        f"vs {r2[0]}")
    return requests, reads, leaks, examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--db", default="sqlite")
    ap.add_argument("--out", default="benchmarks/results/store_adversarial.json")
    a = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = {"tiny": None, "default": None}.get(a.model, a.model)
        if a.model == "tiny":
            model = str(tiny_model_dir(Path(tmp) / "tiny"))
        db = str(Path(tmp) / "adv.db") if a.db == "sqlite" else f"{a.db}#adv-{uuid.uuid4().hex}"
        ka, kb = "key-a-" + uuid.uuid4().hex, "key-b-" + uuid.uuid4().hex
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps({ka: "tenant-a", kb: "tenant-b"}))
        srv = Server(db, model, "--keys", str(keys), "--compact-interval", "0.2")
        try:
            victim, attacker = Client(srv.url, ka), Client(srv.url, kb)
            secrets = {"secret": "The quick brown fox jumps over the lazy dog.",
                       "a/b": "The quick brown cat sleeps.", "..": "You are a careful assistant.",
                       "%2e": "The lazy dog.", "x" * 256: "The fox."}
            unroutable = []
            for sid, text in list(secrets.items()):
                try:
                    victim.put(sid, text=text)
                except NotFound:  # "/" in an id: the route cannot carry it (%2F is decoded)
                    unroutable.append(sid)
                    del secrets[sid]
            victim.put("ids-only", ids=[5, 6, 7, 8, 9])
            attacker.put("mine", text="The quick brown dog.")
            victim.compact()
            stored = {sid: victim.get(sid) for sid in [*secrets, "ids-only"]}
            needles = [t.encode() for t in secrets.values()] + [b"[5,6,7,8,9]", b"[5, 6, 7, 8, 9]"]
            auths = {"key B": {"Authorization": f"Bearer {kb}"}, "no key": {},
                     "wrong key": {"Authorization": "Bearer nope"},
                     "key A, no Bearer": {"Authorization": ka},
                     "key A as Basic": {"Authorization": f"Basic {ka}"},
                     "key A truncated": {"Authorization": f"Bearer {ka[:-1]}"},
                     "key B + X-Namespace": {"Authorization": f"Bearer {kb}",
                                             "X-Namespace": "tenant-a"},
                     "key B, key A appended": {"Authorization": f"Bearer {kb} {ka}"}}
            requests, reads, leaks, examples = probe(srv.url, list(stored), auths, needles)
            for text in secrets.values():  # nearest and stats see B's namespace only
                rows = attacker.nearest(text=text, k=100)
                requests += 1
                if any(r["session"] != "mine" for r in rows):
                    reads += 1
                    examples.append("read: nearest lists a victim session")
            st = attacker.stats()
            requests += 1
            if st["sessions"] != 1:
                leaks += 1
                examples.append(f"leak: stats shows {st['sessions']} sessions")
            untouched = all(victim.get(sid) == v for sid, v in stored.items())
        finally:
            srv.stop()
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "db": a.db,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": a.model,
           "victim_sessions": len(stored), "victim_ids_the_api_cannot_store": unroutable,
           "auth_variants": len(auths),
           "path_tricks": len(tricks("x")), "requests": requests, "reads": reads,
           "existence_leaks": leaks, "victim_untouched": untouched,
           "examples": examples[:20], "seconds": time.perf_counter() - t_start}
    print(json.dumps(out, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
