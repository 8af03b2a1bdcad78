"""`seqkv store put | get | delete | stats | nearest | compact`: the PLT store from the command
line.

``--db PATH`` is a SQLite file (created on first put); ``--db redis://HOST:PORT/N`` a Redis one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..blob import write_atomic
from .codec import read_text
from .common import ModelOption, friendly_errors, print_json

store_app = typer.Typer(help="A store of many sessions: shared prefixes stored once (PLT).",
                        no_args_is_help=True)

DbOption = Annotated[str, typer.Option("--db", help="SQLite file, or redis://HOST:PORT/N")]
NsOption = Annotated[str, typer.Option("--namespace", help="dedup happens only within one")]
SessionOption = Annotated[str, typer.Option("--session", help="session id")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]


def _open(db: str, namespace: str, model: str | None, need_model: bool = True):
    from ..store import Store

    lm = None
    if need_model:
        from ..models import load_model

        lm = load_model(model)
    return Store(db, lm, namespace)


ExactOption = Annotated[bool, typer.Option(
    "--exact", help="the exact tier: INPUT / the output is a KV cache file (safetensors), "
    "restored bit for bit")]


@store_app.command()
@friendly_errors
def put(
    input: Annotated[Path, typer.Argument(help="UTF-8 text file (with --exact: a cache file)")],
    db: DbOption,
    session: SessionOption,
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
    """Store a text as a session (its tokens, coded under the model, deduplicated); with
    --exact, a KV cache file: its tokens as a session, its tensors as residuals."""
    if exact:
        from ..delta import load_cachefile

        kv = load_cachefile(input)
    else:
        text = read_text(input)
    with _open(db, namespace, model) as s:
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
    else:
        extra = f", {info['exact_bytes']} bytes of exact residuals" if exact else ""
        typer.echo(f"{r.session}: {r.tokens} tokens: {r.shared_tokens} shared with stored "
                   f"sessions, {r.new_tokens} new (written raw, coded at the next compaction); "
                   f"{r.split_edges} stored edge(s) split; {r.record_bytes} bytes written"
                   f"{extra}", err=True)


@store_app.command()
@friendly_errors
def get(
    db: DbOption,
    session: SessionOption,
    output: Annotated[Path, typer.Option("--output", "-o", help="output file (atomic)")],
    namespace: NsOption = "default",
    model: ModelOption = None,
    exact: ExactOption = False,
) -> None:
    """Write a session's text back, byte for byte (with --exact: its cache file, bit for bit)."""
    with _open(db, namespace, model) as s:
        if exact:
            from ..delta import save_cachefile

            save_cachefile(output, s.get_exact(session))
        else:
            write_atomic(output, s.get_text(session).encode("utf-8"))


@store_app.command()
@friendly_errors
def delete(db: DbOption, session: SessionOption, namespace: NsOption = "default",
           model: ModelOption = None) -> None:
    """Delete a session; edges no other session uses are freed."""
    with _open(db, namespace, model) as s:
        s.delete(session)


@store_app.command()
@friendly_errors
def stats(db: DbOption, namespace: NsOption = "default", json_: JsonOption = False) -> None:
    """Sessions, tokens (total and unique) and coded bits of a namespace (no model needed)."""
    with _open(db, namespace, None, need_model=False) as s:
        info = s.stats()
    if json_:
        print_json(info)
    else:
        for k, v in info.items():
            typer.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


@store_app.command()
@friendly_errors
def nearest(
    input: Annotated[Path, typer.Argument(help="UTF-8 text file (the new prompt)")],
    db: DbOption,
    namespace: NsOption = "default",
    model: ModelOption = None,
    k: Annotated[int, typer.Option("-k", help="how many sessions")] = 10,
    json_: JsonOption = False,
) -> None:
    """Stored sessions nearest to a prompt by d_T = -log2 P_M(common prefix), most shared first."""
    with _open(db, namespace, model) as s:
        rows = s.nearest(read_text(input), k=k)
    if json_:
        print_json(rows)
    else:
        for r in rows:
            typer.echo(f"{r['session']}\t{r['shared_tokens']} tokens\t{r['d_T_bits']:.1f} bits")


@store_app.command()
@friendly_errors
def compact(
    db: DbOption,
    namespace: NsOption = "default",
    model: ModelOption = None,
    batch: Annotated[int, typer.Option(help="edges coded per round (one transaction each)",
                                       min=1)] = 64,
    json_: JsonOption = False,
) -> None:
    """Code the sessions' pending raw edges under the model (swapped in atomically; safe to
    interrupt, the next run continues)."""
    with _open(db, namespace, model) as s:
        r = s.compact(batch=batch)
    if json_:
        print_json(r.to_dict())
    else:
        typer.echo(f"coded {r.edges} edges ({r.tokens} tokens): {r.raw_bits} raw bits -> "
                   f"{r.coded_bits} coded bits; {r.skipped} changed meanwhile and left for "
                   f"the next run; {r.pending} still pending", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")
