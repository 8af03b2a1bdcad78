"""`seqkv store put | get | delete | stats | nearest | compact | rebalance` and `seqkv serve`.

``--db PATH`` is a SQLite file (created by the first put; reading commands never create one);
``--db redis://HOST:PORT/N`` a Redis one; ``--server URL`` talks to a running `seqkv serve`
instead (with ``--api-key`` or $SEQKV_API_KEY). Everything heavy (torch, the model, the store,
the server) is imported inside the commands, after the cheap checks: `seqkv --help` stays
fast and a bad ``--db`` is refused before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.blob import write_atomic
from ..core.errors import SeqkvError
from .common import (
    Command,
    ModelOption,
    check_output,
    check_policy,
    fail,
    friendly_errors,
    parse_budget,
    parse_quant,
    print_json,
    quant_spec,
    read_text,
)

DbOption = Annotated[str | None, typer.Option(
    "--db", help="the store: a SQLite file, or redis://HOST:PORT/N (or use --server)")]
ServerOption = Annotated[str | None, typer.Option(
    "--server", help="a running `seqkv serve` (http://HOST:PORT) instead of --db")]
KeyOption = Annotated[str | None, typer.Option(
    "--api-key", help="--server: the API key (default: $SEQKV_API_KEY)")]
NsOption = Annotated[str, typer.Option(
    "--namespace", help="--db: the namespace (dedup happens only within one); "
    "over --server the API key picks it")]
SessionOption = Annotated[str, typer.Option("--session", help="session id")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
ExactOption = Annotated[bool, typer.Option(
    "--exact", help="the exact tier: INPUT / the output is a KV cache file (safetensors), "
    "restored bit for bit")]


def _client(db: str | None, server: str | None, api_key: str | None):
    """Exactly one of --db and --server; the Client for --server, None for --db."""
    if (db is None) == (server is None):
        raise SeqkvError("give exactly one of --db and --server")
    if server is None:
        if api_key is not None:
            raise SeqkvError("--api-key goes with --server")
        return None
    from ..client import Client

    return Client(server, api_key)


def _open(db: str, namespace: str, model: str | None, need_model: bool = True,
          create: bool = False, **tiers):
    """The store at ``db``: checked first (a missing store is refused unless ``create``, a file
    that is not a SQLite store always), and only then the model loaded. ``tiers``: Store's
    checkpoint_budget, checkpoint_policy and checkpoint_quant."""
    from ..store.backend import META_NS, StoreError
    from ..store.registry import open_backend

    backend = open_backend(db, create=create)
    try:
        if not create and backend.read(META_NS, "meta", "store") is None:
            raise StoreError(f"no seqkv store at {db} (put a session first)")
        lm = None
        if need_model:
            from .common import load

            lm = load(model)
        from ..store import Store

        return Store(backend, lm, namespace, create=create, **tiers)
    except BaseException:
        backend.close()
        raise


def _no_exact_over_server(exact: bool, client) -> None:
    if exact and client is not None:
        raise SeqkvError("--exact works with --db only (the server does not serve the exact "
                         "tier yet)")


def put(
    input: Annotated[Path, typer.Argument(metavar="INPUT",
                                          help="UTF-8 text file (with --exact: a cache file)")],
    session: SessionOption,
    db: DbOption = None,
    server: ServerOption = None,
    api_key: KeyOption = None,
    namespace: NsOption = "default",
    model: ModelOption = None,
    replace: Annotated[bool, typer.Option("--replace", help="overwrite the session")] = False,
    exact: ExactOption = False,
    predictor_dtype: Annotated[str | None, typer.Option(
        help="--exact: recompute in bf16, fp16 or fp32 (the engine's dtype predicts best)")] = None,
    predictor_attn: Annotated[str | None, typer.Option(
        help="--exact: recompute with eager or sdpa attention")] = None,
    json_: JsonOption = False,
) -> None:
    """Store a text as a session: durable at once, its new tokens written raw (coded under the
    model by `store compact` or a server's background compaction); shared prefixes are
    stored once. With --exact, a KV cache file: its tokens as a session, its tensors as
    residuals."""
    client = _client(db, server, api_key)
    _no_exact_over_server(exact, client)
    if exact:
        from ..core.cache import load_cachefile

        kv = load_cachefile(input)
    else:
        text = read_text(input, allow_empty=False)
    if client is not None:
        info = client.put(session, text=text, replace=replace)
    else:
        with _open(db, namespace, model, create=True) as s:
            if exact:
                r = s.put_exact(session, kv, replace=replace, dtype=predictor_dtype,
                                attn=predictor_attn)
            else:
                r = s.put(session, text, replace=replace)
            info = {"session": r.session, "tokens": r.tokens, "shared_tokens": r.shared_tokens,
                    "new_tokens": r.new_tokens, "split_edges": r.split_edges,
                    "record_bytes": r.record_bytes}
            if exact:
                info["exact_bytes"] = s.session_info[session]["exact_bytes"]
    if json_:
        print_json(info)
        return
    line = (f"{info['session']}: {info['tokens']} tokens = {info['shared_tokens']} shared with "
            f"stored sessions (stored once) + {info['new_tokens']} new (written raw, "
            "coded at the next compaction)")
    if "split_edges" in info:
        line += (f"; {info['split_edges']} stored edge(s) split; {info['record_bytes']} bytes "
                 "of records written")
    if exact:
        line += f"; {info['exact_bytes']} bytes of exact residuals"
    typer.echo(line, err=True)


def get(
    session: SessionOption,
    output: Annotated[Path, typer.Option("--output", "-o", help="output file (atomic)")],
    db: DbOption = None,
    server: ServerOption = None,
    api_key: KeyOption = None,
    namespace: NsOption = "default",
    model: ModelOption = None,
    exact: ExactOption = False,
) -> None:
    """Write a session's text back, byte for byte (with --exact: its cache file, bit for bit)."""
    client = _client(db, server, api_key)
    _no_exact_over_server(exact, client)
    check_output(output)
    if client is not None:
        write_atomic(output, client.get_text(session).encode("utf-8"))
        return
    with _open(db, namespace, model) as s:
        if exact:
            from ..core.cache import save_cachefile

            save_cachefile(output, s.get_exact(session))
        else:
            write_atomic(output, s.get_text(session).encode("utf-8"))


def delete(
    session: SessionOption,
    db: DbOption = None,
    server: ServerOption = None,
    api_key: KeyOption = None,
    namespace: NsOption = "default",
) -> None:
    """Delete a session (no model needed); edges no other session uses are freed."""
    client = _client(db, server, api_key)
    if client is not None:
        client.delete(session)
        return
    with _open(db, namespace, None, need_model=False) as s:
        s.delete(session)


def stats(
    db: DbOption = None,
    server: ServerOption = None,
    api_key: KeyOption = None,
    namespace: NsOption = "default",
    json_: JsonOption = False,
) -> None:
    """Sessions, tokens (total and unique), coded bits and raw (pending) edges of a namespace
    (no model needed)."""
    client = _client(db, server, api_key)
    if client is not None:
        info = client.stats()
    else:
        with _open(db, namespace, None, need_model=False) as s:
            info = s.stats()
    if json_:
        print_json(info)
    else:
        for k, v in info.items():
            typer.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


def nearest(
    input: Annotated[Path, typer.Argument(metavar="INPUT",
                                          help="UTF-8 text file (the new prompt)")],
    db: DbOption = None,
    server: ServerOption = None,
    api_key: KeyOption = None,
    namespace: NsOption = "default",
    model: ModelOption = None,
    k: Annotated[int, typer.Option("-k", help="how many sessions", min=1)] = 10,
    json_: JsonOption = False,
) -> None:
    """Stored sessions nearest to a prompt by d_T = -log2 P_M(common prefix), most shared first."""
    client = _client(db, server, api_key)
    text = read_text(input, allow_empty=False)
    if client is not None:
        rows = client.nearest(text=text, k=k)
    else:
        with _open(db, namespace, model) as s:
            rows = s.nearest(text, k=k)
    if json_:
        print_json(rows)
    else:
        for r in rows:
            typer.echo(f"{r['session']}\t{r['shared_tokens']} tokens\t{r['d_T_bits']:.1f} bits")


def compact(
    db: DbOption = None,
    server: ServerOption = None,
    api_key: KeyOption = None,
    namespace: NsOption = "default",
    model: ModelOption = None,
    batch: Annotated[int, typer.Option(help="--db: edges coded per round (one transaction "
                                       "each)", min=1)] = 64,
    json_: JsonOption = False,
) -> None:
    """Code the sessions' pending raw edges under the model (swapped in atomically; safe to
    interrupt, the next run continues)."""
    client = _client(db, server, api_key)
    if client is not None:
        info = client.compact()
    else:
        with _open(db, namespace, model) as s:
            info = s.compact(batch=batch).to_dict()
    if json_:
        print_json(info)
    else:
        typer.echo(f"coded {info['edges']} edges ({info['tokens']} tokens): {info['raw_bits']} "
                   f"raw bits -> {info['coded_bits']} coded bits; {info['skipped']} changed "
                   f"meanwhile and left for the next run; {info['pending']} still pending",
                   err=True)


def rebalance(
    db: DbOption = None,
    server: ServerOption = None,
    api_key: KeyOption = None,
    namespace: NsOption = "default",
    model: ModelOption = None,
    budget: Annotated[str | None, typer.Option(
        "--budget", metavar="BYTES",
        help="--db (required): bytes for the hot tiers, KV checkpoints and edges "
        "kept raw together (0: every edge coded, no checkpoint)")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", metavar="prior|lru",
        help="--db: prior (default: expected reuse from the trie's prior) or "
        "lru")] = None,
    quant: Annotated[str | None, typer.Option(
        "--quant", metavar="METHOD[:BITS]",
        help="--db: the checkpoints' KV quantizer, METHOD[:BITS] "
        "(turboquant-mse:4, int8, fp8, ...; default raw, the model's dtype)")] = None,
    session: Annotated[str | None, typer.Option(
        "--session", metavar="SESSION",
        help="--db: a session just restored (LRU admits its path as the most "
        "recent)")] = None,
    json_: JsonOption = False,
) -> None:
    """Give each trie node its tier under a byte budget (a KV checkpoint, its edge kept raw, or
    coded): checkpoints written and dropped, hot coded edges swapped back to raw, cooled ones
    left to the next compaction. With --db the policy sees the trie, its prior and the
    restores every process has recorded in the store (servers record theirs at each rebalance;
    --session counts as one more); a server (--server) rebalances under its own
    --tier-budget."""
    client = _client(db, server, api_key)
    if client is not None:
        given = [o for o, v in (("--budget", budget), ("--policy", policy), ("--quant", quant),
                                ("--session", session)) if v is not None]
        if given:
            fail(f"{', '.join(given)} go(es) with --db: a server rebalances under its own "
                 "--tier-budget, --tier-policy and --tier-quant", 2)
        info = client.rebalance()
    else:
        if budget is None:
            fail("rebalance --db needs --budget BYTES", 2)
        nbytes = parse_budget(budget)
        name = check_policy(policy or "prior")
        q = parse_quant(quant) if quant is not None else None
        with _open(db, namespace, model, checkpoint_budget=nbytes, checkpoint_policy=name,
                   checkpoint_quant=q) as s:
            if session is not None:
                # as a restore of it would: its path is the most recent (this process has
                # seen no other restore)
                s._session(session)  # (an unknown session: the store's one-line error)
                s.checkpoints.touch(session)
            out = s.rebalance(session)
            info = {"namespace": s.ns, "budget": nbytes, "policy": s.checkpoints.policy.name,
                    "quant": quant_spec(q), **out}
    if json_:
        print_json(info)
    else:
        _print_rebalance(info)


def _print_rebalance(info: dict) -> None:
    """The rebalance in a few lines: what each tier holds now and what changed."""
    from rich.console import Console
    from rich.table import Table

    used = info["bytes"] + info["raw_bytes"]
    table = Table(title=f"namespace {info['namespace']!r}: {used:,} of {info['budget']:,} "
                  f"bytes in the hot tiers ({info['policy']} policy)", title_justify="left")
    for col in ("tier", "nodes", "added", "dropped", "bytes", ""):
        table.add_column(col, justify="left" if col in ("tier", "") else "right")
    quant = info.get("quant") or "raw"
    table.add_row("KV checkpoints", str(len(info["kept"])), str(len(info["added"])),
                  str(len(info["dropped"])), f"{info['bytes']:,}", f"KV {quant}")
    note = f"{info['raw_swapped']} swapped back from coded"
    if info["raw_skipped"]:
        note += f", {info['raw_skipped']} changed meanwhile (next rebalance)"
    table.add_row("edges kept raw", str(len(info["raw"])), str(len(info["raw_added"])),
                  str(len(info["raw_dropped"])), f"{info['raw_bytes']:,}", note)
    Console().print(table)
    if info["raw_dropped"]:
        Console(stderr=True).print(f"{len(info['raw_dropped'])} edge(s) released: the next "
                                   "compaction codes them", highlight=False)


def serve(
    db: Annotated[str, typer.Option("--db", help="the store: a SQLite file (created if "
                                    "missing), or redis://HOST:PORT/N")],
    host: Annotated[str, typer.Option(help="address to listen on (without --keys: loopback "
                                      "only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8765,
    keys: Annotated[Path | None, typer.Option(
        "--keys", help="KEYS.json mapping each API key to its namespace; without it the "
        "default namespace is served, on loopback only")] = None,
    model: ModelOption = None,
    max_body: Annotated[int, typer.Option(help="largest request body, bytes", min=1)] = 8 << 20,
    compact_interval: Annotated[float, typer.Option(
        help="seconds between background compactions (0: only POST /v1/compact)",
        min=0)] = 2.0,
    device: Annotated[str, typer.Option(
        help="where the model runs, in the server and its background compactor: cpu, cuda "
        "or cuda:N")] = "cpu",
    tier_budget: Annotated[str | None, typer.Option(
        "--tier-budget", metavar="BYTES",
        help="bytes per namespace for the hot tiers (KV checkpoints, edges "
        "kept raw), rebalanced in the background from the restores served; without it every "
        "edge is coded")] = None,
    tier_policy: Annotated[str, typer.Option(
        "--tier-policy", metavar="prior|lru",
        help="--tier-budget: prior or lru")] = "prior",
    tier_quant: Annotated[str | None, typer.Option(
        "--tier-quant", metavar="METHOD[:BITS]",
        help="--tier-budget: the checkpoints' KV quantizer, METHOD[:BITS] "
        "(turboquant-mse:4, int8, fp8; default raw)")] = None,
    tier_interval: Annotated[float, typer.Option(
        help="--tier-budget: seconds between background rebalances of a namespace that "
        "changed", min=0.05)] = 30.0,
    tier_restores: Annotated[int, typer.Option(
        help="--tier-budget: rebalance sooner, once a namespace served this many restores",
        min=1)] = 100,
) -> None:
    """Serve the store over HTTP (JSON API, OpenAPI docs at /docs) until interrupted."""
    budget = parse_budget(tier_budget, "--tier-budget") if tier_budget is not None else None
    policy = check_policy(tier_policy, "--tier-policy")
    quant = parse_quant(tier_quant, "--tier-quant") if tier_quant is not None else None
    if budget is None and tier_quant is not None:
        fail("--tier-quant goes with --tier-budget", 2)
    from ..server import serve as run

    run(db, host=host, port=port, keys=str(keys) if keys else None, model=model,
        max_body=max_body, compact_interval=compact_interval, device=device,
        tier_budget=budget, tier_policy=policy, tier_quant=quant,
        tier_interval=tier_interval, tier_restores=tier_restores)


def register(app: typer.Typer) -> None:
    store_app = typer.Typer(help="A store of many sessions: shared prefixes stored once (PLT).",
                            no_args_is_help=True)
    for command in (put, get, delete, stats, nearest, compact, rebalance):
        store_app.command(cls=Command)(friendly_errors(command))
    app.add_typer(store_app, name="store")
    app.command("serve", cls=Command)(friendly_errors(serve))
