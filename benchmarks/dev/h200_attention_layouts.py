"""Two layouts of the large groups' decode attention, probed (dev; CUDA): each kernel of
decode_attention against a variant, one layer's time at 256 and 1,024 streams.

- scores over keys stored transposed ([B, Hkv, d, capacity]: a key's 64 values 4 bytes x
  capacity apart), so the d-sum of a tile [d, keys] runs down each thread's registers and a
  few lanes, not across 16 lanes per key as in [keys, d];
- weights that accumulate p v in a [keys, d] tile across the loop and reduce it once at the
  end, instead of summing over the keys every iteration;
- both over an int16 cache (the values the int32 cache would hold if they fitted), to see
  what a 16-bit cache would buy.

Every variant's output is checked integer for integer against decode_attention on the same
values (SmolLM2's 3 key heads x 3 query heads of 64, capacity 320, queries given rotated as in
groups above ROTATE_MAX_STREAMS).

    python3 benchmarks/dev/h200_attention_layouts.py          # from the repository root
    TRITON_INTERPRET=1 python3 benchmarks/dev/h200_attention_layouts.py --check   # CPU

Output of 2026-12-01 19:55 UTC: benchmarks/results/engine_dev_h200.txt (timed then as the mean
of five replays of a 20-call graph; benchmarks/timing.graph_us, used since, takes the best of
three). What shipped from it: cuda_attention._key_major_scores_kernel (this file's
_scores_kv_t_kernel), replaced on 2026-12-02 by _key_head_attention_kernel.
"""

import itertools
import sys
from functools import partial

import torch

sys.path.insert(0, "benchmarks/dev")
sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
import triton.language as tl  # noqa: E402
from h200_digit_attention import case  # noqa: E402
from timing import graph_us  # noqa: E402

from seqkv.engine import cuda_attention  # noqa: E402
from seqkv.engine.cuda_ops import triton  # noqa: E402
from seqkv.engine.intops import ACT_BITS  # noqa: E402
from seqkv.engine.model import FRAC, QKV_FRAC  # noqa: E402


@triton.jit
def _scores_t_kernel(q_ptr, kt_ptr, pos_ptr, scores_ptr, best_ptr, n_heads, rep, capacity,
                     D: tl.constexpr, BLOCK: tl.constexpr):
    """_scores_kernel's scores (one split, no window, no rotation) over kt [B Hkv, d, cap]."""
    head = tl.program_id(0)
    pos = tl.load(pos_ptr + head // n_heads)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    base = (head // rep).to(tl.int64) * capacity * D
    q = tl.load(q_ptr + head * D + d).to(tl.float64)
    row = head.to(tl.int64) * capacity
    best = tl.full([BLOCK], float("-inf"), tl.float64)
    for first in range(0, pos + 1, BLOCK):
        keys = first + s
        valid = keys <= pos
        k = tl.load(kt_ptr + base + d[:, None] * capacity + keys[None, :], mask=valid[None, :],
                    other=0)
        scores = tl.sum(k.to(tl.float64) * q[:, None], axis=0)
        tl.store(scores_ptr + row + keys, scores, mask=valid)
        best = tl.maximum(best, tl.where(valid, scores, float("-inf")))
    tl.store(best_ptr + head, tl.max(best, axis=0))


@triton.jit
def _weights_2d_kernel(v_ptr, pos_ptr, table_ptr, scale_ptr, scores_ptr, best_ptr, total_ptr,
                       acc_ptr, n_heads, rep, capacity, table_last, D: tl.constexpr,
                       BLOCK: tl.constexpr):
    """_weights_kernel (one split, no window) with p v summed over the keys once, at the end."""
    head = tl.program_id(0)
    pos = tl.load(pos_ptr + head // n_heads)
    top = tl.load(best_ptr + head)
    index_scale = tl.load(scale_ptr)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    v_base = (head // rep).to(tl.int64) * capacity * D
    row = head.to(tl.int64) * capacity
    total = tl.zeros([BLOCK], tl.float64)
    acc = tl.zeros([BLOCK, D], tl.float64)
    for first in range(0, pos + 1, BLOCK):
        keys = first + s
        valid = keys <= pos
        scores = tl.load(scores_ptr + row + keys, mask=valid, other=0.0)
        idx = tl.minimum(tl.floor((top - scores) * index_scale), table_last)
        p = tl.load(table_ptr + idx.to(tl.int64), mask=valid, other=0.0)
        v = tl.load(v_ptr + v_base + keys[:, None] * D + d[None, :], mask=valid[:, None],
                    other=0).to(tl.float64)
        total += p
        acc += p[:, None] * v  # integers below 2**53: exact in any order
    tl.store(total_ptr + head, tl.sum(total, axis=0))
    tl.store(acc_ptr + head * D + d, tl.sum(acc, axis=0))


@triton.jit
def _scores_kv_t_kernel(q_ptr, kt_ptr, pos_ptr, scores_ptr, best_ptr, n_kv, capacity,
                        REP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """_scores_t_kernel for the REP query heads of one key head: each key tile read once."""
    kv = tl.program_id(0)  # b * n_kv + key head
    pos = tl.load(pos_ptr + kv // n_kv)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    base = kv.to(tl.int64) * capacity * D
    for r in tl.static_range(REP):
        tl.store(best_ptr + kv * REP + r, float("-inf"))
    for first in range(0, pos + 1, BLOCK):
        keys = first + s
        valid = keys <= pos
        k = tl.load(kt_ptr + base + d[:, None] * capacity + keys[None, :], mask=valid[None, :],
                    other=0).to(tl.float64)
        for r in tl.static_range(REP):
            head = kv * REP + r
            q = tl.load(q_ptr + head * D + d).to(tl.float64)
            scores = tl.sum(k * q[:, None], axis=0)
            tl.store(scores_ptr + head.to(tl.int64) * capacity + keys, scores, mask=valid)
            top = tl.max(tl.where(valid, scores, float("-inf")), axis=0)
            tl.store(best_ptr + head, tl.maximum(tl.load(best_ptr + head), top))


@triton.jit
def _weights_kv_kernel(v_ptr, pos_ptr, table_ptr, scale_ptr, scores_ptr, best_ptr, total_ptr,
                       acc_ptr, n_kv, capacity, table_last, REP: tl.constexpr,
                       D: tl.constexpr, BLOCK: tl.constexpr):
    """_weights_kernel for the REP query heads of one key head: each value tile read once."""
    kv = tl.program_id(0)
    pos = tl.load(pos_ptr + kv // n_kv)
    index_scale = tl.load(scale_ptr)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    v_base = kv.to(tl.int64) * capacity * D
    for r in tl.static_range(REP):
        tl.store(total_ptr + kv * REP + r, 0.0)
        tl.store(acc_ptr + (kv * REP + r) * D + d, tl.zeros([D], tl.float64))
    for first in range(0, pos + 1, BLOCK):
        keys = first + s
        valid = keys <= pos
        v = tl.load(v_ptr + v_base + keys[:, None] * D + d[None, :], mask=valid[:, None],
                    other=0).to(tl.float64)
        for r in tl.static_range(REP):
            head = kv * REP + r
            top = tl.load(best_ptr + head)
            scores = tl.load(scores_ptr + head.to(tl.int64) * capacity + keys, mask=valid,
                             other=0.0)
            idx = tl.minimum(tl.floor((top - scores) * index_scale), table_last)
            p = tl.load(table_ptr + idx.to(tl.int64), mask=valid, other=0.0)
            tl.store(total_ptr + head, tl.load(total_ptr + head) + tl.sum(p, axis=0))
            a = acc_ptr + head * D + d
            tl.store(a, tl.load(a) + tl.sum(p[:, None] * v, axis=0))


@triton.jit
def _scores_kv3_kernel(q_ptr, kt_ptr, pos_ptr, scores_ptr, best_ptr, n_kv, capacity,
                       REP: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
                       BLOCK: tl.constexpr):
    """_scores_kv_t_kernel with the REP heads as one [RP, d, keys] product (registers)."""
    kv = tl.program_id(0)
    pos = tl.load(pos_ptr + kv // n_kv)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    r = tl.arange(0, RP)
    base = kv.to(tl.int64) * capacity * D
    heads = kv * REP + r
    q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=(r < REP)[:, None],
                other=0).to(tl.float64)
    best = tl.full([RP, BLOCK], float("-inf"), tl.float64)
    for first in range(0, pos + 1, BLOCK):
        keys = first + s
        valid = keys <= pos
        k = tl.load(kt_ptr + base + d[:, None] * capacity + keys[None, :], mask=valid[None, :],
                    other=0).to(tl.float64)
        scores = tl.sum(q[:, :, None] * k[None, :, :], axis=1)  # [RP, BLOCK]
        tl.store(scores_ptr + heads[:, None].to(tl.int64) * capacity + keys[None, :], scores,
                 mask=(r < REP)[:, None] & valid[None, :])
        best = tl.maximum(best, tl.where(valid[None, :], scores, float("-inf")))
    tl.store(best_ptr + heads, tl.max(best, axis=1), mask=r < REP)


@triton.jit
def _weights_kv3_kernel(v_ptr, pos_ptr, table_ptr, scale_ptr, scores_ptr, best_ptr,
                        total_ptr, acc_ptr, n_kv, capacity, table_last, REP: tl.constexpr,
                        RP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """_weights_kv_kernel with the REP heads as one [RP, keys, d] product (registers)."""
    kv = tl.program_id(0)
    pos = tl.load(pos_ptr + kv // n_kv)
    index_scale = tl.load(scale_ptr)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    r = tl.arange(0, RP)
    heads = kv * REP + r
    live = r < REP
    top = tl.load(best_ptr + heads, mask=live, other=0.0)
    v_base = kv.to(tl.int64) * capacity * D
    total = tl.zeros([RP, BLOCK], tl.float64)
    acc = tl.zeros([RP, D], tl.float64)
    for first in range(0, pos + 1, BLOCK):
        keys = first + s
        valid = keys <= pos
        ok = live[:, None] & valid[None, :]
        scores = tl.load(scores_ptr + heads[:, None].to(tl.int64) * capacity + keys[None, :],
                         mask=ok, other=0.0)
        idx = tl.minimum(tl.floor((top[:, None] - scores) * index_scale), table_last)
        p = tl.load(table_ptr + idx.to(tl.int64), mask=ok, other=0.0)
        v = tl.load(v_ptr + v_base + keys[:, None] * D + d[None, :], mask=valid[:, None],
                    other=0).to(tl.float64)
        total += p
        acc += tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    tl.store(total_ptr + heads, tl.sum(total, axis=1), mask=live)
    tl.store(acc_ptr + heads[:, None] * D + d[None, :], acc, mask=live[:, None])


class Layer:
    """One layer's decode attention, kernel by kernel, for one (q, cache, pos) case."""

    def __init__(self, model, q, k, v, pos):
        self.b, self.n_kv, self.capacity, self.d = k.shape
        self.rep = q.shape[2]
        self.n_heads = self.rep * self.n_kv
        self.heads = self.b * self.n_heads
        self.q, self.k, self.v, self.pos = q.contiguous(), k, v, pos
        self.kt = k.transpose(-1, -2).contiguous()
        self.table, self.index = model.exp_attn_f, model._index_scale_t
        dev = q.device
        self.scores = torch.empty((self.heads, self.capacity), dtype=torch.float64, device=dev)
        self.best = torch.empty((self.heads, 1), dtype=torch.float64, device=dev)
        self.total = torch.empty((self.heads, 1), dtype=torch.float64, device=dev)
        self.acc = torch.empty((self.heads, 1, self.d), dtype=torch.float64, device=dev)

    def scores_plain(self, block=32, warps=4):
        split = triton.cdiv(self.capacity, block) * block
        cuda_attention._scores_kernel[(self.heads, 1)](
            self.q, self.k, self.v, self.pos, self.q, self.q, self.scores, self.best,
            self.n_heads, self.rep, self.n_kv, self.capacity, 0, 1, 1, ROTATE=False,
            ROPE_SHIFT=1, V_SHIFT=1, D=self.d, SPLIT=split, BLOCK=block, num_warps=warps,
            PDL=False)

    def scores_t(self, block=32, warps=4):
        _scores_t_kernel[(self.heads,)](self.q, self.kt, self.pos, self.scores, self.best,
                                        self.n_heads, self.rep, self.capacity, D=self.d,
                                        BLOCK=block, num_warps=warps)

    def scores_kv_t(self, block=32, warps=4):
        _scores_kv_t_kernel[(self.b * self.n_kv,)](
            self.q, self.kt, self.pos, self.scores, self.best, self.n_kv, self.capacity,
            REP=self.rep, D=self.d, BLOCK=block, num_warps=warps)

    def weights_kv(self, block=32, warps=1):
        _weights_kv_kernel[(self.b * self.n_kv,)](
            self.v, self.pos, self.table, self.index, self.scores, self.best, self.total,
            self.acc, self.n_kv, self.capacity, self.table.shape[0] - 1, REP=self.rep,
            D=self.d, BLOCK=block, num_warps=warps)

    def scores_kv3(self, block=16, warps=4):
        _scores_kv3_kernel[(self.b * self.n_kv,)](
            self.q, self.kt, self.pos, self.scores, self.best, self.n_kv, self.capacity,
            REP=self.rep, RP=triton.next_power_of_2(self.rep), D=self.d, BLOCK=block,
            num_warps=warps)

    def weights_kv3(self, block=16, warps=4):
        _weights_kv3_kernel[(self.b * self.n_kv,)](
            self.v, self.pos, self.table, self.index, self.scores, self.best, self.total,
            self.acc, self.n_kv, self.capacity, self.table.shape[0] - 1, REP=self.rep,
            RP=triton.next_power_of_2(self.rep), D=self.d, BLOCK=block, num_warps=warps)

    def weights_plain(self, block=32, warps=1):
        split = triton.cdiv(self.capacity, block) * block
        cuda_attention._weights_kernel[(self.heads, 1)](
            self.v, self.pos, self.table, self.index, self.scores, self.best, self.total,
            self.acc, self.n_heads, self.rep, self.capacity, 0, self.table.shape[0] - 1, 1,
            D=self.d, SPLIT=split, BLOCK=block, SPLITS_P=1, num_warps=warps, PDL=False)

    def weights_2d(self, block=32, warps=1):
        _weights_2d_kernel[(self.heads,)](
            self.v, self.pos, self.table, self.index, self.scores, self.best, self.total,
            self.acc, self.n_heads, self.rep, self.capacity, self.table.shape[0] - 1,
            D=self.d, BLOCK=block, num_warps=warps)

    def finish(self):
        hi = torch.empty((self.b, self.n_heads * self.d), dtype=torch.int8, device=self.q.device)
        lo, shift = torch.empty_like(hi), torch.empty((self.b, 1), dtype=torch.int64,
                                                       device=self.q.device)
        cuda_attention._finish_kernel[(self.b,)](
            self.total, self.acc, hi, lo, shift, self.n_heads, N_SPLITS=1,
            OUT_SCALE=1 << (FRAC - QKV_FRAC), ACT_BITS=ACT_BITS, D=self.d,
            HP=triton.next_power_of_2(self.n_heads), num_warps=4, PDL=False)
        return hi, lo, shift

    def run(self, scores, weights):
        scores()
        weights()
        return self.finish()


def reference(model, q, k, v, pos):
    return cuda_attention.decode_attention(q, k, v, pos, 0, model.exp_attn_f,
                                           model._index_scale_t, 1 << (FRAC - QKV_FRAC))


# (method, keys a loop iteration, warps) of every variant probed
GRIDS = (("scores_t", (32, 64), (1, 2)), ("scores_kv_t", (16, 32, 64), (1, 2, 4)),
         ("weights_kv", (16, 32, 64), (1, 2, 4)), ("scores_kv3", (8, 16, 32), (2, 4, 8)),
         ("weights_kv3", (8, 16, 32), (2, 4, 8)), ("weights_2d", (16, 32), (1, 2)))


def variants(layer):
    """(name, scores call, weights call) of every configuration probed: each variant of one
    kernel runs with the other kernel's plain version."""
    out = [("plain 32/4 + plain 32/1", partial(layer.scores_plain), partial(layer.weights_plain))]
    for method, blocks, warps_list in GRIDS:
        for block, warps in itertools.product(blocks, warps_list):
            name, call = f"{method} {block}/{warps}", partial(getattr(layer, method), block, warps)
            if method.startswith("weights"):
                out.append((name, layer.scores_plain, call))
            else:
                out.append((name, call, layer.weights_plain))
    return out


def check(b, pos, device, cache16=False):
    model, (q, k, v, p) = case(b, 3, 3, 64, 320, pos, device, seed=b)
    if cache16:  # the values an int16 cache can hold
        k, v = (k >> 8).to(torch.int16), (v >> 8).to(torch.int16)
    want = reference(model, q, k.to(torch.int32), v.to(torch.int32), p)
    layer = Layer(model, q, k, v, p)
    bad = []
    for name, scores, weights in variants(layer):
        got = layer.run(scores, weights)
        if not all(torch.equal(x, y) for x, y in zip(got, want, strict=True)):
            bad.append(name)
    return layer, bad


def main() -> None:
    if "--check" in sys.argv:
        for shape in ((2, [69, 5]), (3, [39, 0, 17])):
            for cache16 in (False, True):
                _, bad = check(shape[0], shape[1], "cpu", cache16)
                print(shape, "int16" if cache16 else "int32", "exact" if not bad else bad,
                      flush=True)
        return
    for b, pos in ((1024, 125), (1024, 250), (256, 125), (64, 125), (1024, 125)):
        for cache16 in (False, True):
            layer, bad = check(b, [pos], "cuda", cache16)
            print(f"== {b} streams at {pos}, {'int16' if cache16 else 'int32'} cache:"
                  f" {'exact' if not bad else 'MISMATCH ' + str(bad)}", flush=True)
            rows = []
            for name, scores, weights in variants(layer):
                part = weights if "weights" in name.split()[0] else scores
                rows.append((graph_us(part), name))
            base_s = graph_us(layer.scores_plain)
            base_w = graph_us(layer.weights_plain)
            print(f"   plain scores 32/4 {base_s:.1f} us, plain weights 32/1 {base_w:.1f} us")
            for us, name in sorted(rows):
                print(f"   {us:7.1f} us  {name}")


if __name__ == "__main__":
    main()
