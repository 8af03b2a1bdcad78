"""Delta tier on the H200: caches made in bf16 by a batched, padded GPU prefill, restored on
the GPU and on the CPU with each predictor. No network is needed: the model is a GGUF path,
the texts are files given on the command line (default: seqkv's bundled texts).

    python benchmarks/delta_gpu.py /path/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tokens 512 --batch 16 [--text-files a.txt b.txt ...] [--no-cpu] --json out.json

Rows: source (bf16, or the bf16 cache cast to fp8 e4m3), predictor, where it runs
(cuda: compress and restore on the GPU; cpu: on the CPU), bits per component and per token
of the residual, ratio to the stored dtype, times, and whether the restore was bit-exact.
Every restore is checked; a row whose predictor is not repeatable says so (verified false,
or the error) instead of failing the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from delta import batched_cache  # noqa: E402

from seqkv.delta import KVCache, compress_kv, decompress_kv, inspect_delta_blob  # noqa: E402
from seqkv.errors import SeqkvError  # noqa: E402
from seqkv.models import load_model  # noqa: E402
from seqkv.stepper import configure_determinism  # noqa: E402


def read_ids(tokenizer, files: list[str], n_tokens: int) -> list[list[int]]:
    if files:
        texts = [Path(f).read_text() for f in files]
    else:
        data = Path(__file__).parent.parent / "seqkv" / "data"
        texts = [p.read_text() for p in sorted(data.glob("*.txt"))]
    out = []
    for k, _ in enumerate(texts):
        # Rotate and concatenate so every sequence reaches n_tokens even from short files.
        ids: list[int] = []
        i = k
        while len(ids) < n_tokens:
            ids += list(tokenizer(texts[i % len(texts)]).input_ids)
            i += 1
        out.append(ids[:n_tokens])
    return out


def run(kv: KVCache, lm, where: str, predictor: str, params: dict, bound=None) -> dict:
    row = {"where": where, "predictor": predictor, **params, "max_abs_error": bound}
    try:
        t0 = time.perf_counter()
        blob = compress_kv(kv, lm, predictor, max_abs_error=bound, tokens="raw", **params)
        t1 = time.perf_counter()
        back = decompress_kv(blob, lm)
        t2 = time.perf_counter()
    except SeqkvError as e:
        return {**row, "error": str(e)}
    info = inspect_delta_blob(blob)
    r = info["residual"]
    width = torch.empty((), dtype=kv.keys[0].dtype).element_size() * 8
    return {**row, "compute": info["predictor"]["compute"],
            "numerics": info["predictor"].get("numerics"),
            "bits_per_component": r["bits_per_component"], "bits_per_token": r["bits_per_token"],
            "ratio": width / r["bits_per_component"] if r["bits"] else None,
            "compress_s": t1 - t0, "restore_s": t2 - t1,
            "verified": back.equal_bits(kv) if bound is None else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="sequences in the padded prefill")
    ap.add_argument("--text-files", nargs="*", default=[])
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU restores")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configure_determinism(torch.device("cuda"))
    gpu = load_model(args.gguf, device="cuda", dtype=torch.bfloat16)
    engine = copy.deepcopy(gpu.model)  # stays on SDPA; seqkv switches `gpu` to eager
    cpu = None if args.no_cpu else load_model(args.gguf, device="cpu", dtype=torch.float32)
    texts = read_ids(gpu.tokenizer, args.text_files, args.tokens)
    rows = []
    for k, target in enumerate(texts):
        others = [texts[(k + j + 1) % len(texts)][: max(1, args.tokens * (j + 1) // args.batch)]
                  for j in range(args.batch - 1)]
        # The engine: bf16, batched and padded, default (SDPA) attention.
        bf16 = batched_cache(engine, target, others)
        sources = {"bf16": bf16,
                   "fp8_e4m3": KVCache(bf16.input_ids,
                                       [t.to(torch.float8_e4m3fn) for t in bf16.keys],
                                       [t.to(torch.float8_e4m3fn) for t in bf16.values])}
        for source, kv in sources.items():
            configs = [("cuda", gpu, "none", {}), ("cuda", gpu, "recompute", {}),
                       ("cuda", gpu, "recompute", {"dtype": "float32"})]
            if cpu is not None:
                configs += [("cpu", cpu, "recompute", {}),
                            ("cpu", cpu, "recompute", {"dtype": "bfloat16"})]
            for where, lm, predictor, params in configs:
                row = run(kv, lm, where, predictor, params)
                row.update(text=k, tokens=len(target), source=source, batch=args.batch)
                rows.append(row)
                print(json.dumps(row), flush=True)
            row = run(kv, gpu, "cuda", "recompute", {}, bound=1e-2)
            row.update(text=k, tokens=len(target), source=source, batch=args.batch)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "machine": platform.machine(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
