"""Delta tier on real SmolLM2 caches "computed elsewhere": bits per component and per token.

The cache comes from a serving-engine-like computation: the model in bf16, a batched prefill
of several texts of different lengths, right-padded with an attention mask (or, with
--source fp32, an fp32 prefill cast to bf16). It is then compressed with each predictor and
mode and restored, here, by the fp32 CPU model, whose prefill cast to bf16 is the
"recompute" prediction. Every exact restore is checked bit for bit.

    python benchmarks/delta.py --tokens 512 --texts 3 [--source bf16-batched|fp32]
    python benchmarks/delta.py --cache-file CACHE.safetensors --texts 0  # a cache made elsewhere
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
from transformers import DynamicCache

from seqkv.core.cache import KVCache, load_cachefile
from seqkv.core.errors import SeqkvError
from seqkv.core.models import load_model
from seqkv.core.stepper import cache_kwarg
from seqkv.delta import compress_kv, decompress_kv, inspect_delta_blob
from seqkv.tokens.api import compress_tokens

CONFIGS = [  # (predictor, params, lossy bound)
    ("none", {}, {}),
    ("neighbour", {}, {}),
    ("quantized", {"method": "int8"}, {}),
    ("recompute", {}, {}),  # the default: numerics searched on the first layers
    ("recompute", {"dtype": "fp32"}, {}),
    ("recompute", {"dtype": "bf16", "attn": "sdpa"}, {}),
    ("recompute", {"dtype": "bf16", "attn": "eager"}, {}),
    ("recompute", {"dtype": "fp32"}, {"max_abs_error": 1e-2}),
    ("recompute", {"dtype": "fp32"}, {"max_abs_error": 1e-1}),
    ("none", {}, {"max_abs_error": 1e-2}),
    ("recompute", {"dtype": "fp32"}, {"rel_mse": 1e-3}),
    ("none", {}, {"rel_mse": 1e-3}),
    ("none", {}, {"rel_mse": 1e-2}),
]


def texts_ids(lm, n_texts: int, n_tokens: int) -> list[list[int]]:
    from corpora import brown, python_docs

    pool = brown("a", 2) + brown("k", 2) + python_docs(4)
    order = [pool[0], pool[2], pool[4], pool[1], pool[3], pool[5], pool[6], pool[7]]
    out = []
    for text in order:
        ids = list(lm.tokenizer(text).input_ids)
        if len(ids) >= n_tokens:
            out.append(ids[:n_tokens])
    return out[: n_texts + 3]


@torch.inference_mode()
def batched_cache(model, target: list[int], others: list[list[int]]) -> KVCache:
    """Row 0 of a right-padded batched prefill: the target with shorter companions."""
    device = next(model.parameters()).device
    rows = [target] + others
    T = len(target)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    cache = DynamicCache(config=model.config)
    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
          logits_to_keep=1, **{cache_kwarg(model): cache})
    keys = [layer.keys[:1].detach().cpu().clone() for layer in cache.layers]
    values = [layer.values[:1].detach().cpu().clone() for layer in cache.layers]
    return KVCache(list(target), keys, values)


@torch.inference_mode()
def fp32_cast_cache(model, target: list[int]) -> KVCache:
    from seqkv.core.cache import prefill_cache

    return KVCache.from_dynamic(prefill_cache(model, target).cache, target, torch.bfloat16)


def measure_one(kv: KVCache, lm, predictor: str, params: dict, bound: dict) -> dict:
    """Compress and restore one cache with one predictor and mode; check the restore (bit for
    bit, or against the bound) and report bits, times and the worst error. A predictor that
    refuses (e.g. not repeatable on this device) gives a row with its error."""
    row = {"predictor": predictor, **params, **bound}
    try:
        t0 = time.perf_counter()
        blob = compress_kv(kv, lm, predictor, tokens="raw", **bound, **params)
        t1 = time.perf_counter()
        back = decompress_kv(blob, lm)
        t2 = time.perf_counter()
    except SeqkvError as e:
        return {**row, "error": str(e)}
    info = inspect_delta_blob(blob)
    pairs = list(zip(back.tensors, kv.tensors, strict=True))
    if not bound:
        ok = back.equal_bits(kv)
    elif "max_abs_error" in bound:
        row["worst_abs_error"] = max((float((a.float() - b.float()).abs().max())
                                      for a, b in pairs), default=0.0)
        ok = all(bool(((a.float() - b.float()).abs() <= bound["max_abs_error"]).all())
                 for a, b in pairs)
    else:
        row["worst_rel_mse"] = max((float((a.double() - b.double()).pow(2).sum()
                                          / b.double().pow(2).sum().clamp_min(1e-30))
                                    for a, b in pairs), default=0.0)
        ok = all(float((a.double() - b.double()).pow(2).sum())
                 <= bound["rel_mse"] * float(b.double().pow(2).sum()) for a, b in pairs)
    r = info["residual"]
    width = torch.empty((), dtype=kv.keys[0].dtype).element_size() * 8
    row.update(mode=info["mode"], compute=info["predictor"]["compute"],
               numerics=info["predictor"].get("numerics"),
               bits_per_component=r["bits_per_component"], bits_per_token=r["bits_per_token"],
               ratio=width / r["bits_per_component"] if r["bits"] else None,
               compress_s=t1 - t0, restore_s=t2 - t1, verified=ok)
    return row


def measure(kv: KVCache, lm, configs=CONFIGS) -> list[dict]:
    return [measure_one(kv, lm, predictor, params, bound) for predictor, params, bound in configs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--texts", type=int, default=3)
    ap.add_argument("--source", choices=["bf16-batched", "fp32"], default="bf16-batched")
    ap.add_argument("--coded-tokens", action="store_true", help="also time the token codec")
    ap.add_argument("--engine-attn", default=None, help="e.g. eager: the engine's attention")
    ap.add_argument("--cache-file", default=None,
                    help="measure this exported cache (e.g. one made on the H200) instead")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model()  # fp32, CPU: the restoring machine's predictor
    engine = copy.deepcopy(lm.model).to(torch.bfloat16)
    if args.engine_attn:
        engine.set_attn_implementation(args.engine_attn)
    print("predictor attention:", lm.config._attn_implementation, "engine attention:",
          engine.config._attn_implementation, flush=True)
    results = []
    if args.cache_file:
        kv = load_cachefile(args.cache_file)
        for row in measure(kv, lm):
            row.update(source=args.cache_file, tokens=kv.n_tokens)
            results.append(row)
            print(json.dumps(row), flush=True)
        args.texts = 0
    all_ids = texts_ids(lm, args.texts, args.tokens) if args.texts else []

    for k in range(args.texts):
        target = all_ids[k]
        others = [ids[: args.tokens * (j + 1) // 5] for j, ids in enumerate(all_ids[-3:])]
        kv = (batched_cache(engine, target, others) if args.source == "bf16-batched"
              else fp32_cast_cache(lm.model, target))
        token_bits = None
        if args.coded_tokens:
            t0 = time.perf_counter()
            token_bits = 8 * len(compress_tokens(lm, target))
            print(f"text {k}: tokens coded in {time.perf_counter() - t0:.1f} s", flush=True)
        for row in measure(kv, lm):
            row.update(text=k, tokens=len(target), source=args.source,
                       token_bits_per_token=token_bits / len(target) if token_bits else None)
            if token_bits:
                total = row["bits_per_component"] * kv.numel + token_bits
                row["ratio_with_tokens"] = 16.0 * kv.numel / total
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {"machine": platform.machine(), "torch": torch.__version__, "rows": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
