"""decode_attention's launch knobs swept (dev; CUDA): warps (both kernels) and keys a loop
iteration, at 16 to 1,024 streams and positions 125 and 250 (SmolLM2's 3 key heads x 3 query
heads of 64, capacity 320, random int32 cache over the engine's whole range; queries given
rotated, so the scores kernel does not rotate as it does in a real step). Every
configuration's output is checked against the default's, integer for integer; us a layer
(mean of 20 calls). The first case warms the clocks up; single calls vary by up to 30% run to
run here, so whole decodes (h200_decode_positions.py --set) decide.

    python3 benchmarks/dev/h200_attention_sweep.py       # from the repository root

Output of 2026-12-01 13:20 UTC (with Triton's loop stages and a one-block-ahead prefetch,
since dropped): benchmarks/results/engine_dev_h200.txt.
"""

import itertools
import sys
from functools import partial

import torch

sys.path.insert(0, "benchmarks/dev")
from h200_digit_attention import case, timed  # noqa: E402

from seqkv.engine import cuda_attention  # noqa: E402
from seqkv.engine.model import FRAC, QKV_FRAC  # noqa: E402


def configure(warps: int, block: int) -> None:
    cuda_attention.SCORES_WARPS = cuda_attention.WEIGHTS_WARPS = warps
    cuda_attention.BLOCK = block


def main() -> None:
    out_scale = 1 << (FRAC - QKV_FRAC)
    configs = list(itertools.product((1, 2, 4), (16, 32, 64)))
    for b, pos in ((1024, 125), (16, 125), (64, 125), (256, 125), (256, 250), (1024, 125),
                   (1024, 250)):
        model, (q, k, v, p) = case(b, 3, 3, 64, 320, [pos], "cuda", seed=b)
        call = partial(cuda_attention.decode_attention, q, k, v, p, 0, model.exp_attn_f,
                       model._index_scale_t, out_scale)
        configure(2, 32)
        want = call()
        results = []
        for config in configs:
            configure(*config)
            try:
                exact = all(torch.equal(x, y) for x, y in zip(call(), want, strict=True))
                results.append((timed(call) * 1e3, config, exact))
            except Exception as e:  # noqa: BLE001 - a config Triton refuses
                print(f"   {config}: {type(e).__name__}: {str(e)[:80]}")
        configure(2, 32)
        base = timed(call) * 1e3
        print(f"== {b} streams at position {pos}: default (2 warps, 32 keys) {base:.1f} us")
        for us, (w, bl), exact in sorted(results):
            print(f"   {us:7.1f} us  warps {w} block {bl:2d}{'' if exact else '  MISMATCH'}")


if __name__ == "__main__":
    main()
