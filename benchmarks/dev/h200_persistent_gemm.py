"""Development probe (H200): cuda_ops.int8_linear against persistent-grid variants of the same
GEMM, and torch._int_mm's two raw products as a yardstick, at the encoder's and the 1,024-stream
decode's shapes (SmolLM2). Every variant's output is checked integer for integer against
int8_linear's.

    python3 benchmarks/dev/h200_persistent_gemm.py [M ...]      # from the repository root

Why: the GEMMs run at ~300 int8 TOPS where the H200 peaks near 2,000. Their K is short (576 or
1,536: 5-12 loop iterations of 128), so each 64 x 64 program spends much of its life filling
its pipeline and in its float64 epilogue. A persistent grid with the loops flattened
(tl.range(flatten=True)) lets a program load the next tile's first blocks during the last
one's epilogue.
"""
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from timing import graph_us  # noqa: E402

from seqkv.engine import cuda_ops  # noqa: E402
from seqkv.engine.cuda_ops import _round_half_even, _rows_tile, _weights_tile  # noqa: E402


@triton.jit
def _persistent_kernel(hi_ptr, lo_ptr, k_ptr, w_ptr, scale_ptr, out_ptr, M, N, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       N_PROGS: tl.constexpr, FLATTEN: tl.constexpr, N_FAST: tl.constexpr):
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    rk = tl.arange(0, BK)
    for tile in tl.range(tl.program_id(0), n_m * n_n, N_PROGS, flatten=FLATTEN):
        if N_FAST:
            pid_m, pid_n = tile // n_n, tile % n_n
        else:
            pid_m, pid_n = tile % n_m, tile // n_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        row_ok, col_ok = rm < M, rn < N
        ha = tl.zeros([BM, BN], tl.int32)
        la = tl.zeros([BM, BN], tl.int32)
        for ki in range(k_tiles):
            hi, lo = _rows_tile(hi_ptr, lo_ptr, rm, ki * BK + rk, row_ok, K)
            wa = _weights_tile(w_ptr, rn, ki * BK + rk, col_ok, K)
            ha += tl.dot(hi, wa, out_dtype=tl.int32)
            la += tl.dot(lo, wa, out_dtype=tl.int32)
        acc = (ha.to(tl.int64) * 256 + la.to(tl.int64) * 2).to(tl.float64)
        shift = tl.load(k_ptr + rm, mask=row_ok, other=0)
        pow2 = ((shift + 1023) << 52).to(tl.float64, bitcast=True)
        scale = tl.load(scale_ptr + rn, mask=col_ok, other=0.0)
        out = _round_half_even((acc * scale[None, :]) * pow2[:, None])
        tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], out,
                 mask=row_ok[:, None] & col_ok[None, :])


SMS = torch.cuda.get_device_properties(0).multi_processor_count


def persistent(bm, bn, bk, warps, stages, per_sm, flatten=True, n_fast=True):
    def run(hi, lo, k, w, scale):
        m, kdim = hi.shape
        n = w.shape[0]
        out = torch.empty((m, n), dtype=torch.int64, device=hi.device)
        progs = min(SMS * per_sm, triton.cdiv(m, bm) * triton.cdiv(n, bn))
        run.compiled = _persistent_kernel[(progs,)](
            hi, lo, k, w, scale, out, m, n, kdim, BM=bm, BN=bn, BK=bk, N_PROGS=progs,
            FLATTEN=flatten, N_FAST=n_fast, num_warps=warps, num_stages=stages)
        return out
    run.compiled = None
    return run


def tiles(bm, bn, bk, warps, stages):
    """int8_linear's own kernel at other tiles."""
    def run(hi, lo, k, w, scale):
        m, kdim = hi.shape
        n = w.shape[0]
        out = torch.empty((m, n), dtype=torch.int64, device=hi.device)
        run.compiled = cuda_ops._linear_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            hi, lo, k, w, scale, scale, out, m, n, kdim, HAS_BIAS=False, BM=bm, BN=bn, BK=bk,
            N_FAST=False, PDL=False, num_warps=warps, num_stages=stages)
        return out
    run.compiled = None
    return run


VARIANTS = {
    "p64x64x128w4s3x3": persistent(64, 64, 128, 4, 3, 3),
    "p64x64x128w4s3x2": persistent(64, 64, 128, 4, 3, 2),
    "p64x64x64w4s4x3": persistent(64, 64, 64, 4, 4, 3),
    "p128x64x64w4s4x2": persistent(128, 64, 64, 4, 4, 2),
    "p128x64x128w8s3x2": persistent(128, 64, 128, 8, 3, 2),
    "p128x128x64w8s4x1": persistent(128, 128, 64, 8, 4, 1),
    "p128x128x128w8s3x1": persistent(128, 128, 128, 8, 3, 1),
    "p64x128x128w4s3x2": persistent(64, 128, 128, 4, 3, 2),
    "p64x64x128w4s3x3-nf": persistent(64, 64, 128, 4, 3, 3, flatten=False),
    "p64x64x128w4s3x3-mfast": persistent(64, 64, 128, 4, 3, 3, n_fast=False),
    "t64x64x128w4s3": tiles(64, 64, 128, 4, 3),
    "t128x128x64w8s4": tiles(128, 128, 64, 8, 4),
    "t128x256x64w8s3": tiles(128, 256, 64, 8, 3),
}
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
          "head": (576, 49152)}

torch.manual_seed(0)
for M in [int(a) for a in sys.argv[1:]] or [1024, 16384, 65536]:
    total = {}
    for name, (K, N) in SHAPES.items():
        m = min(M, 4096) if name == "head" else M  # the encoder's head runs in 4,096-row blocks
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        scale = torch.rand(N, dtype=torch.float64, device="cuda") * 2**-20
        hi = torch.randint(-128, 128, (m, K), dtype=torch.int8, device="cuda")
        lo = torch.randint(-64, 64, (m, K), dtype=torch.int8, device="cuda")
        k = torch.randint(0, 8, (m,), dtype=torch.int64, device="cuda")
        ref = cuda_ops.int8_linear(hi, lo, k, w, scale, None)
        t_ref = graph_us(lambda: cuda_ops.int8_linear(hi, lo, k, w, scale, None))
        wt = w.t()
        t_mm = graph_us(lambda: (torch._int_mm(hi, wt), torch._int_mm(lo, wt)))
        line = [f"{name:8s} M={m:6d}: int8_linear {t_ref:8.1f} us  _int_mm x2 {t_mm:8.1f}"]
        total.setdefault("int8_linear", 0.0)
        total["int8_linear"] += t_ref
        for vname, fn in VARIANTS.items():
            try:
                out = fn(hi, lo, k, w, scale)
                ok = torch.equal(out, ref)
                t = graph_us(lambda fn=fn: fn(hi, lo, k, w, scale))
                line.append(f"{vname} {t:.1f}{'' if ok else ' WRONG'}")
                total[vname] = total.get(vname, 0.0) + t
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                line.append(f"{vname} failed ({type(e).__name__}: {str(e)[:80]})")
        print("  ".join(line), flush=True)
    print(f"== M={M} sum over the five GEMMs (us): " + ", ".join(
        f"{k} {v:.0f}" for k, v in sorted(total.items(), key=lambda kv: kv[1])), flush=True)

for vname, fn in VARIANTS.items():
    c = fn.compiled
    if c is None:
        continue
    ptx = c.asm.get("ptx", "")
    print(vname, "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no mma",
          "registers", getattr(c, "n_regs", "?"), "spills", getattr(c, "n_spills", "?"))
