"""decode_attention of large groups over a float16 cache (dev; CUDA): the one-kernel
_key_head_attention_kernel over the key-major copy against the scores and weights kernels
over the rows (``rows`` in a variant: no copy), us a layer (CUDA graphs of 20 calls, best of
3), every variant checked integer for integer against the first; NAME=V sets a
cuda_attention constant. SmolLM2's 3 key heads x 3 query heads of 64, capacity 320, keys and
values over the engine's whole range, rounded as the cache holds them; positions pos, pos - 1
and pos - 2 across the streams.

    python3 benchmarks/dev/h200_key_head.py STREAMS:POS ... [--variant "NAME=V ... [rows]"]
    python3 benchmarks/dev/h200_key_head.py 1024:128 --once    # one call each, for ncu

Output of 2026-12-02 (with an earlier switch to the replaced key-major scores kernel):
benchmarks/results/engine_dev_h200.txt.
"""

import sys
from functools import partial

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from timing import graph_us  # noqa: E402

from seqkv.engine import IntModel, cuda_attention, integerize  # noqa: E402
from seqkv.engine.intops import kv_float16  # noqa: E402
from seqkv.engine.model import FRAC, QKV_FRAC  # noqa: E402
from tests.test_engine import MODELS  # noqa: E402


def case(b: int, pos: int, device: str = "cuda", seed: int = 0):
    model = IntModel(integerize(MODELS["llama"]().model), device)
    lim = min(model._qkv_limit, (1 << 23) - 1)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-lim, lim + 1, (b, 3, 3, 1, 64), generator=g).to(torch.float64)
    k, v = (kv_float16(torch.randint(-lim, lim + 1, (b, 3, 320, 64), generator=g))
            for _ in range(2))
    major = cuda_attention.major_keys(b, 3, 320, 64, "cpu", torch.float16)
    cuda_attention.fill_major(major, k)
    p = torch.full((b,), pos) - torch.arange(b) % 3
    return model, [x.to(device) for x in (q, k, v, p, major)]


def main() -> None:
    args = sys.argv[1:]
    variants = [[]]
    while "--variant" in args:
        at = args.index("--variant")
        variants.append(args[at + 1].split())
        del args[at: at + 2]
    once = "--once" in args
    if once:
        args.remove("--once")
    defaults = {n: getattr(cuda_attention, n) for n in dir(cuda_attention) if n.isupper()}
    for b, pos in (map(int, a.split(":")) for a in args):
        model, (q, k, v, p, major) = case(b, pos)
        want = None
        for variant in variants:
            for name, value in defaults.items():
                setattr(cuda_attention, name, value)
            for setting in variant:
                if "=" in setting:
                    name, value = setting.split("=")
                    setattr(cuda_attention, name, int(value))
            call = partial(cuda_attention.decode_attention, q, k, v, p, 0, model.exp_attn_f,
                           model._index_scale_t, 1 << (FRAC - QKV_FRAC),
                           major=None if "rows" in variant else major.clone())
            got = call()
            torch.cuda.synchronize()
            if once:
                continue
            want = want or got
            exact = all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
            print(f"{b:5d} streams at {pos:4d}  {graph_us(call):7.1f} us  "
                  f"{' '.join(variant) or 'default'}{'' if exact else '  MISMATCH'}", flush=True)


if __name__ == "__main__":
    main()
