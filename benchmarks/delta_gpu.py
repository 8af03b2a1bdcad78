"""Delta tier on the H200: caches made in bf16 by a batched, padded GPU prefill (SDPA, as a
serving engine computes them), compressed and restored on the GPU and on the host CPU with
each predictor and mode. No network is needed: the model is a GGUF path, the texts are files.

    python benchmarks/delta_gpu.py /path/SmolLM2-135M-Instruct.Q4_1.gguf --tokens 512 \\
        --batch 16 --text-files a.txt b.txt ... --out DIR [--texts 2] [--device cuda]

Writes DIR/delta_gpu.json after every row (a run cut short keeps what it measured) and
DIR/cache_bf16_text0.safetensors (the first engine cache, for restores on other machines).
Every exact restore is checked bit for bit; a predictor that is not repeatable on the
device is reported as the row's error instead of failing the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from delta import batched_cache, measure_one  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402
from seqkv.core.stepper import configure_determinism  # noqa: E402
from seqkv.delta import (  # noqa: E402
    KVCache,
    save_cachefile,
)

# (where, predictor, params, bound): in order of importance, so a cut run keeps the key rows.
BF16_ROWS = [
    ("gpu", "recompute", {"dtype": "bf16", "attn": "sdpa"}, {}),  # the engine's numerics
    ("gpu", "recompute", {"dtype": "bf16", "attn": "eager"}, {}),
    ("gpu", "recompute", {"dtype": "fp32", "attn": "eager"}, {}),
    ("gpu", "none", {}, {}),
    ("cpu", "recompute", {"dtype": "fp32"}, {}),
    ("cpu", "recompute", {"dtype": "bf16", "attn": "sdpa"}, {}),
    ("gpu", "neighbour", {}, {}),
    ("gpu", "quantized", {"method": "int8"}, {}),
    ("gpu", "recompute", {"dtype": "fp32", "attn": "eager"}, {"rel_mse": 1e-3}),
    ("gpu", "none", {}, {"rel_mse": 1e-3}),
    ("gpu", "recompute", {"dtype": "fp32", "attn": "eager"}, {"max_abs_error": 1e-2}),
]
FP8_ROWS = [
    ("gpu", "recompute", {"dtype": "bf16", "attn": "sdpa"}, {}),
    ("gpu", "recompute", {"dtype": "fp32", "attn": "eager"}, {}),
    ("gpu", "none", {}, {}),
]


def read_ids(tokenizer, files: list[str], n_tokens: int) -> list[list[int]]:
    if files:
        texts = [Path(f).read_text() for f in files]
    else:
        data = Path(__file__).parent.parent / "seqkv" / "data"
        texts = [p.read_text() for p in sorted(data.glob("*.txt"))]
    out = []
    for k, _ in enumerate(texts):
        ids: list[int] = []  # rotate and concatenate so short files reach n_tokens too
        i = k
        while len(ids) < n_tokens:
            ids += list(tokenizer(texts[i % len(texts)]).input_ids)
            i += 1
        out.append(ids[:n_tokens])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="sequences in the padded prefill")
    ap.add_argument("--texts", type=int, default=2)
    ap.add_argument("--text-files", nargs="*", default=[])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    configure_determinism(device)
    lms = {"gpu": load_model(args.gguf, device=device, dtype=torch.bfloat16),
           "cpu": load_model(args.gguf, device="cpu", dtype=torch.float32)}
    engine = copy.deepcopy(lms["gpu"].model)
    engine.set_attn_implementation("sdpa")
    texts = read_ids(lms["gpu"].tokenizer, args.text_files, args.tokens)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "machine": platform.machine(),
              "cpu_threads": torch.get_num_threads(), "tokens": args.tokens,
              "batch": args.batch, "rows": []}
    for k, target in enumerate(texts[: args.texts]):
        others = [texts[(k + j + 1) % len(texts)][: max(1, args.tokens * (j + 1) // args.batch)]
                  for j in range(args.batch - 1)]
        bf16 = batched_cache(engine, target, others)  # the engine: bf16, batched, padded, SDPA
        if k == 0:
            save_cachefile(out / "cache_bf16_text0.safetensors", bf16)
        fp8 = KVCache(bf16.input_ids, [t.to(torch.float8_e4m3fn) for t in bf16.keys],
                      [t.to(torch.float8_e4m3fn) for t in bf16.values])
        for source, kv, rows in (("bf16", bf16, BF16_ROWS), ("fp8_e4m3", fp8, FP8_ROWS)):
            for where, predictor, params, bound in rows:
                row = measure_one(kv, lms[where], predictor, params, bound)
                row.update(where=where, source=source, text=k, tokens=len(target))
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                (out / "delta_gpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
