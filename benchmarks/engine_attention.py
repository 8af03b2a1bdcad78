"""The engine's decode attention: the fused Triton kernel against the float64 GEMM path.

    python benchmarks/engine_attention.py [--groups 1,16,64,256,1024] [--tokens 128] [--out DIR]

Runs on a CUDA GPU with SmolLM2-135M's shapes and random weights (speed does not depend on the
weights' values; exactness is checked here and on the real model by engine_tokens.py). First
checks that both paths give the same logits at every step for streams at mixed positions,
then decodes random token streams at each group size, compiled (``IntModel.compile()``), with
either attention path, side by side. Writes DIR/engine_attention.json.
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


def smollm2_shaped() -> IntModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                      vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                      max_position_embeddings=8192, rms_norm_eps=1e-5)
    return IntModel(integerize(LlamaForCausalLM(cfg).eval()), "cuda")


def same_logits(m: IntModel, streams: int = 48, steps: int = 100) -> bool:
    """Step both attention paths over one token sequence per stream, from mixed positions."""
    ids = torch.randint(0, m.spec.vocab, (streams, 40 + steps), device="cuda")
    start = torch.randint(0, 40, (streams,), device="cuda")
    caches = []
    for limit in (streams, 0):  # the fused kernel, then the float64 GEMMs
        m.fused_attention_streams = limit
        caches.append(m.new_cache(streams, 40 + steps))
        m.prefill_hidden(ids[:, :40], cache=caches[-1])
    assert [c.dtype for c in caches] == [torch.int32, torch.float64]
    same = True
    for t in range(steps):
        pos = start + t
        tok = ids.gather(1, pos.unsqueeze(1)).squeeze(1)
        same &= torch.equal(*(m.step_logits(c, tok, pos) for c in caches))
    return bool(same)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", default="1,16,64,256,1024")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    m = smollm2_shaped().compile()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "tokens": args.tokens,
                 "same_logits_every_step": same_logits(m), "groups": {}}
    print(json.dumps(res), flush=True)
    codec = EngineCodec(m, 1)
    n = args.tokens
    for group in (int(g) for g in args.groups.split(",")):
        streams = torch.randint(0, m.spec.vocab, (group, n)).tolist()
        words = codec.encode(streams)
        row = {}
        for fused in (True, False, True, False):  # the second pass of each is the measured one
            m.fused_attention_streams = group if fused else 0
            out, dt = timed(lambda: codec.decode(words, [n] * group))  # noqa: B023
            row["fused" if fused else "gemm"] = {"tok_s": group * n / dt,
                                                 "steps_s": n / dt, "exact": out == streams}
        res["groups"][group] = row
        print(group, json.dumps(row), flush=True)
        Path(args.out, "engine_attention.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
