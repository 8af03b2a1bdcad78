"""Token tier on the CPU: bits per token against the model's cross-entropy, and speed.

    python benchmarks/cpu_tokens.py [--out benchmarks/results]

Texts: the three bundled excerpts, plus three texts of 1,000+ tokens (Brown news ca01,
Brown fiction ck01, the Python tutorial's control-flow chapter) fetched through npm / apt.
Writes cpu_tokens.json and cpu_tokens.png (bits per token, log scale: fp16 KV, 3-bit
TurboQuant KV, seqkv tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from corpora import brown, python_docs  # noqa: E402

from seqkv import compress_tokens, decompress_tokens, inspect_blob  # noqa: E402
from seqkv.core.models import load_model  # noqa: E402
from seqkv.demo import BUNDLED, bundled_text  # noqa: E402


def long_texts(tokenizer, min_tokens: int = 1000, max_tokens: int = 1500) -> dict[str, list[int]]:
    control = next(t for t in python_docs(40) if "More Control Flow Tools" in t[:300])
    out = {}
    for name, text in (("brown_news_ca01", brown("a")[0]), ("brown_fiction_ck01", brown("k")[0]),
                       ("python_controlflow", control)):
        ids = tokenizer(text).input_ids
        assert len(ids) >= min_tokens, name
        out[name] = ids[:max_tokens]
    return out


def measure(lm, name: str, ids: list[int], chunk: int, batch: int) -> dict:
    t0 = time.perf_counter()
    blob = compress_tokens(lm, ids, chunk_size=chunk, batch=batch)
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert decompress_tokens(lm, blob) == ids
    dec = time.perf_counter() - t0
    info = inspect_blob(blob)
    return {
        "text": name, "tokens": len(ids), "chunk": chunk, "batch": batch,
        "chunks": info["chunks"], "bits_per_token": info["bits_per_token"],
        "model_bits_per_token": info["model_bits"] / len(ids),
        "coder_overhead_pct": 100 * info["coder_overhead"],
        "blob_bytes": info["bytes"], "header_bytes": info["bytes"] - info["bits"] // 8,
        "fp16_kv_bits_per_token": info["fp16_kv_bits"] / len(ids),
        "turboquant3_kv_bits_per_token": info["turboquant3_kv_bits"] / len(ids),
        "encode_tok_s": len(ids) / enc, "decode_tok_s": len(ids) / dec,
        "perplexity": 2 ** (info["model_bits"] / len(ids)),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["text"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for k, (key, label) in enumerate([("fp16_kv_bits_per_token", "fp16 KV"),
                                      ("turboquant3_kv_bits_per_token", "TurboQuant 3-bit KV"),
                                      ("bits_per_token", "seqkv tokens")]):
        ax.bar([i + (k - 1) * width for i in x], [r[key] for r in rows], width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel("bits per token (log)")
    ax.set_title("SmolLM2-135M: what one token of KV cache costs to store")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    lm = load_model()
    rows = []
    for name in BUNDLED:
        ids = lm.tokenizer(bundled_text(name)).input_ids
        rows.append(measure(lm, name, ids, 2048, 16))
        print(json.dumps(rows[-1]), flush=True)
    for name, ids in long_texts(lm.tokenizer).items():
        for chunk in (2048, 256):
            rows.append(measure(lm, name, ids, chunk, 16))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "cpu_tokens.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot([r for r in rows if r["chunk"] == 2048], out / "cpu_tokens.png")


if __name__ == "__main__":
    main()
