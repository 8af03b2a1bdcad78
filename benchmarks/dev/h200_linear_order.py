"""int8_linear's two program orders (rows first, columns first: cuda_ops.LINEAR_N_FAST_ROWS)
and, for the head, int64 against int32 outputs, at SmolLM2's shapes (dev; CUDA; us per call,
20 calls in a CUDA graph, best of 3).

    python3 benchmarks/dev/h200_linear_order.py [M ...]      # from the repository root
"""
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from timing import graph_us  # noqa: E402

from seqkv.engine import cuda_ops  # noqa: E402

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
          "head": (576, 49152)}


torch.manual_seed(0)
for M in [int(a) for a in sys.argv[1:]] or [1024, 4096, 16384, 65536]:
    for name, (K, N) in SHAPES.items():
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        scale = torch.rand(N, dtype=torch.float64, device="cuda") * 2**-24
        hi = torch.randint(-64, 65, (M, K), dtype=torch.int8, device="cuda")
        lo = torch.randint(-64, 64, (M, K), dtype=torch.int8, device="cuda")
        k = torch.randint(0, 4, (M,), dtype=torch.int64, device="cuda")
        line = []
        for dtype in (torch.int64, torch.int32) if name == "head" else (torch.int64,):
            for order, rows in (("rows first", 1 << 30), ("columns first", 0)):
                cuda_ops.LINEAR_N_FAST_ROWS = rows
                t = graph_us(lambda dtype=dtype: cuda_ops.int8_linear(hi, lo, k, w, scale, None,
                                                                   dtype))
                line.append(f"{str(dtype)[6:]} {order} {t:8.1f}")
        print(f"{name:8s} M={M:6d}: " + "  ".join(line), flush=True)
