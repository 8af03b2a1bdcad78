"""Is a CPU prefill repeatable? Hash the KV cache of the same 512 tokens computed several times
in each of several fresh processes, under each environment variant.

    python benchmarks/cpu_repeatability.py [--processes 3] [--runs 4] [--threads 16] [--json F]

The model has SmolLM2-135M's shapes with random weights (no download or model file needed;
repeatability depends on shapes and kernels, not on weight values). A delta-tier blob made
with a CPU `recompute` predictor restores only if the restoring prefill hashes the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import hashlib, sys, torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                  max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
ids = torch.arange(100, 612).reshape(1, -1)
out = []
junk = []
for i in range(int(sys.argv[2])):
    junk.append(torch.empty(1000 + 4097 * i, dtype=torch.uint8))  # shift later allocations
    with torch.inference_mode():
        cache = DynamicCache(config=cfg)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    h = hashlib.blake2b(digest_size=8)
    for layer in cache.layers:
        h.update(layer.keys.numpy().tobytes()); h.update(layer.values.numpy().tobytes())
    out.append(h.hexdigest())
print(" ".join(out))
"""

VARIANTS = {"default": {}, "MKL_CBWR=AUTO,STRICT": {"MKL_CBWR": "AUTO,STRICT"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="*", default=[os.cpu_count() or 1])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for threads in args.threads:
        for name, env in VARIANTS.items():
            hashes = []
            for _ in range(args.processes):
                r = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(args.runs)],
                                   env={**os.environ, **env}, capture_output=True, text=True,
                                   check=True)
                hashes.append(r.stdout.split())
            flat = [h for p in hashes for h in p]
            row = {"threads": threads, "env": name, "prefills": len(flat),
                   "distinct": len(set(flat)), "hashes": hashes}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
