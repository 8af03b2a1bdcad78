"""The engine's Triton kernels (seqkv/engine/cuda_ops.py) against the torch paths they replace.

    python benchmarks/engine_kernels.py attention [--groups 1,64,1024] [--tokens 128] [--out DIR]
    python benchmarks/engine_kernels.py linear [--groups 1,1024] [--tokens 128] [--out DIR]
    python benchmarks/engine_kernels.py locate [--groups 1,1024] [--tokens 128] [--out DIR]
    python benchmarks/engine_kernels.py heads [--groups 1,256,1024] [--tokens 128] [--out DIR]
    python benchmarks/engine_kernels.py all [--groups 1,64,256,1024] [--tokens 128] [--out DIR]

Runs on a CUDA GPU with SmolLM2-135M's shapes and random weights (speed does not depend on the
weights' values; exactness on the real model is checked by engine_tokens.py), compiled
(``IntModel.compile()``). ``all`` is the engine as it ships (each kernel where it is used by
default) against every torch path. First checks that both give the same integers (the logits of
every step for streams at mixed positions; for linear also the prefill's hidden states), then
times both side by side: decode at each group size (every token checked), and for ``linear``
and ``all`` also the encoder's prefill of 64 x 256 tokens. Writes DIR/engine_<what>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from timing import timed  # benchmarks/timing.py, beside these scripts
from transformers import LlamaConfig, LlamaForCausalLM

from seqkv.engine import EngineCodec, IntModel, integerize
from seqkv.engine.model import FUSED_ATTENTION_MAX_STREAMS


def smollm2_shaped() -> IntModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                      vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                      max_position_embeddings=8192, rms_norm_eps=1e-5)
    return IntModel(integerize(LlamaForCausalLM(cfg).eval()), "cuda")


def use(m: IntModel, what: str, kernel: bool, group: int) -> None:
    if what == "attention":
        m.fused_attention_streams = group if kernel else 0
    if what == "all":
        m.fused_attention_streams = FUSED_ATTENTION_MAX_STREAMS if kernel else 0
    if what in ("linear", "all"):
        m.triton_linear = kernel
    if what in ("locate", "all"):
        m.fused_locate = kernel
    if what in ("heads", "all"):  # the rotation writing keys and values into the cache
        m.fused_heads = kernel
    if what in ("rows", "all"):  # the norms', activation's and splits' row kernels
        m.row_kernels = kernel


def same_logits(m: IntModel, what: str, streams: int = 48, steps: int = 100) -> bool:
    """Step both paths over one token sequence per stream, from mixed positions."""
    ids = torch.randint(0, m.spec.vocab, (streams, 40 + steps), device="cuda")
    start = torch.randint(0, 40, (streams,), device="cuda")
    caches = []
    for kernel in (True, False):
        use(m, what, kernel, streams)
        caches.append(m.new_cache(streams, 40 + steps))
        m.prefill_hidden(ids[:, :40], cache=caches[-1])
    same = True
    for t in range(steps):
        pos = start + t
        tok = ids.gather(1, pos.unsqueeze(1)).squeeze(1)
        logits = []
        for kernel, cache in zip((True, False), caches, strict=True):
            use(m, what, kernel, streams)
            logits.append(m.step_logits(cache, tok, pos))
        same &= torch.equal(*logits)
    return bool(same)


def same_hidden(m: IntModel) -> bool:
    ids = torch.randint(0, m.spec.vocab, (8, 200), device="cuda")
    hidden = []
    for kernel in (True, False):
        use(m, "linear", kernel, 8)
        hidden.append(m.prefill_hidden(ids))
    return torch.equal(*hidden)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["attention", "linear", "locate", "heads", "rows", "all"])
    ap.add_argument("--groups", default="1,64,1024")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    m = smollm2_shaped().compile()
    check = same_logits(m, args.what) if args.what != "linear" else same_hidden(m)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "tokens": args.tokens,
                 "same_integers": check, "groups": {}}
    print(json.dumps(res), flush=True)
    path = Path(args.out, f"engine_{args.what}.json")
    # No kept decode groups: a group kept from one configuration's decode would be replayed,
    # graphs and all, by the next (the 256-stream A/B of 2026-12-01 03:25 timed one twice).
    codec = EngineCodec(m, 1, pool_bytes=0)
    n = args.tokens
    if args.what in ("linear", "all"):
        streams = torch.randint(0, m.spec.vocab, (64, 256)).tolist()
        res["encode_64x256"] = {}
        for kernel in (True, False, True, False):  # the second pass of each is the measured one
            use(m, args.what, kernel, 64)
            _, dt = timed(lambda: codec.intervals(streams))  # noqa: B023
            res["encode_64x256"]["kernel" if kernel else "torch"] = {"tok_s": 64 * 256 / dt}
        print(json.dumps(res["encode_64x256"]), flush=True)
    for group in (int(g) for g in args.groups.split(",")):
        streams = torch.randint(0, m.spec.vocab, (group, n)).tolist()
        words = codec.encode(streams)
        row = {}
        for kernel in (True, False, True, False):
            use(m, args.what, kernel, group)
            out, dt = timed(lambda: codec.decode(words, [n] * group))  # noqa: B023
            row["kernel" if kernel else "torch"] = {"tok_s": group * n / dt,
                                                    "steps_s": n / dt, "exact": out == streams}
        res["groups"][group] = row
        print(group, json.dumps(row), flush=True)
        path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
