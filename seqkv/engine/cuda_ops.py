"""Fused GPU kernels of the engine (Triton), computing the same integers as model.py's torch code.

``decode_attention`` is one step's attention for every stream of a decode group: integer scores,
the table softmax and the weighted sum of values, over each stream's own keys only (its
position, not the cache's capacity), so one CUDA graph serves every step. The key range of each
head is split across programs (the table softmax needs the exact maximum before any weight, so
the work is three short kernels: scores and partial maxima; weights and partial sums; the
division), which keeps the GPU busy at any group size. Every operation is the one
``IntModel._attend`` performs: float64 products and sums of integers below 2**53 (exact in any
order), one IEEE multiply and floor for the table index, one correctly rounded division and a
round-half-to-even, so the result is bit-identical to the torch path (checked on the H200).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU machines never reach this module's kernels.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        """torch.round of float64 x, as int64, from exact pieces (floor, and x - floor(x))."""
        whole = tl.floor(x)
        frac = x - whole
        odd = (whole.to(tl.int64) & 1) == 1
        return whole.to(tl.int64) + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.int64)

    @triton.jit
    def _key_range(pos_ptr, head, split, n_heads, window, SPLIT: tl.constexpr):
        """Keys [start, end) of this program: its split of the head's keys lo..pos."""
        pos = tl.load(pos_ptr + head // n_heads)
        lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), pos * 0)
        start = tl.maximum(lo, split * SPLIT)
        end = tl.minimum(pos + 1, (split + 1) * SPLIT)
        return start, end

    @triton.jit
    def _scores_kernel(q_ptr, k_ptr, pos_ptr, scores_ptr, best_ptr,
                       n_heads, rep, capacity, window, n_splits,
                       D: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        head, split = tl.program_id(0), tl.program_id(1)  # head: b * n_heads + h
        start, end = _key_range(pos_ptr, head, split, n_heads, window, SPLIT)
        d = tl.arange(0, D)
        s = tl.arange(0, BLOCK)
        q = tl.load(q_ptr + head * D + d).to(tl.float64)
        k_base = (head // rep).to(tl.int64) * capacity * D  # its key head: b * n_kv + h // rep
        row = head.to(tl.int64) * capacity
        best = tl.full([BLOCK], float("-inf"), tl.float64)
        for first in range(start, end, BLOCK):
            keys = first + s
            valid = keys < end
            k = tl.load(k_ptr + k_base + keys[:, None] * D + d[None, :],
                        mask=valid[:, None], other=0).to(tl.float64)
            scores = tl.sum(k * q[None, :], axis=1)  # exact: integers below 2**53
            tl.store(scores_ptr + row + keys, scores, mask=valid)
            best = tl.maximum(best, tl.where(valid, scores, float("-inf")))
        tl.store(best_ptr + head * n_splits + split, tl.max(best, axis=0))

    @triton.jit
    def _weights_kernel(v_ptr, pos_ptr, table_ptr, scale_ptr, scores_ptr, best_ptr,
                        total_ptr, acc_ptr, n_heads, rep, capacity, window, table_last, n_splits,
                        D: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                        SPLITS_P: tl.constexpr):
        head, split = tl.program_id(0), tl.program_id(1)
        start, end = _key_range(pos_ptr, head, split, n_heads, window, SPLIT)
        parts = tl.arange(0, SPLITS_P)
        top = tl.max(tl.load(best_ptr + head * n_splits + parts, mask=parts < n_splits,
                             other=float("-inf")), axis=0)
        index_scale = tl.load(scale_ptr)  # float64: a Python float argument would be fp32
        d = tl.arange(0, D)
        s = tl.arange(0, BLOCK)
        v_base = (head // rep).to(tl.int64) * capacity * D
        row = head.to(tl.int64) * capacity
        total = tl.zeros([BLOCK], tl.float64)
        acc = tl.zeros([D], tl.float64)
        for first in range(start, end, BLOCK):
            keys = first + s
            valid = keys < end
            scores = tl.load(scores_ptr + row + keys, mask=valid, other=0.0)
            idx = tl.minimum(tl.floor((top - scores) * index_scale), table_last)
            p = tl.load(table_ptr + idx.to(tl.int64), mask=valid, other=0.0)
            v = tl.load(v_ptr + v_base + keys[:, None] * D + d[None, :],
                        mask=valid[:, None], other=0).to(tl.float64)
            total += p
            acc += tl.sum(p[:, None] * v, axis=0)
        part = head.to(tl.int64) * n_splits + split
        tl.store(total_ptr + part, tl.sum(total, axis=0))
        tl.store(acc_ptr + part * D + d, acc)

    @triton.jit
    def _finish_kernel(total_ptr, acc_ptr, out_ptr, n_splits,
                       OUT_SCALE: tl.constexpr, D: tl.constexpr, SPLITS_P: tl.constexpr):
        head = tl.program_id(0)
        parts = tl.arange(0, SPLITS_P)
        d = tl.arange(0, D)
        base = head.to(tl.int64) * n_splits
        total = tl.sum(tl.load(total_ptr + base + parts, mask=parts < n_splits, other=0.0),
                       axis=0)
        acc = tl.sum(tl.load(acc_ptr + (base + parts[:, None]) * D + d[None, :],
                             mask=(parts < n_splits)[:, None], other=0.0), axis=0)
        ratio = (acc * OUT_SCALE) / total  # float64 division: IEEE div.rn.f64
        tl.store(out_ptr + head * D + d, _round_half_even(ratio))

    @triton.jit
    def _linear_kernel(hi_ptr, lo_ptr, k_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
                       HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        row_ok, col_ok = rm < M, rn < N
        ha = tl.zeros([BM, BN], tl.int32)  # hi.A
        la = tl.zeros([BM, BN], tl.int32)  # lo.A
        hb = tl.zeros([BM, BN], tl.int32)  # hi.B (the residual weights, rows N..2N of w)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            k_ok = kk < K
            a_off = rm[:, None].to(tl.int64) * K + kk[None, :]
            hi = tl.load(hi_ptr + a_off, mask=row_ok[:, None] & k_ok[None, :], other=0)
            lo = tl.load(lo_ptr + a_off, mask=row_ok[:, None] & k_ok[None, :], other=0)
            w_off = rn[None, :].to(tl.int64) * K + kk[:, None]
            wa = tl.load(w_ptr + w_off, mask=col_ok[None, :] & k_ok[:, None], other=0)
            wb = tl.load(w_ptr + N * K + w_off, mask=col_ok[None, :] & k_ok[:, None], other=0)
            ha += tl.dot(hi, wa, out_dtype=tl.int32)
            la += tl.dot(lo, wa, out_dtype=tl.int32)
            hb += tl.dot(hi, wb, out_dtype=tl.int32)
        # 2 q.(A + B / 256) in step units: integers far below 2**53, exact in float64.
        acc = (ha.to(tl.int64) * 256 + la.to(tl.int64) * 2 + hb.to(tl.int64)).to(tl.float64)
        shift = tl.load(k_ptr + rm, mask=row_ok, other=0)
        pow2 = ((shift + 1023) << 52).to(tl.float64, bitcast=True)  # 2**k, exactly
        scale = tl.load(scale_ptr + rn, mask=col_ok, other=0.0)
        y = (acc * scale[None, :]) * pow2[:, None]  # the two IEEE products of model.linear
        out = _round_half_even(y)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=col_ok, other=0)[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], out,
                 mask=row_ok[:, None] & col_ok[None, :])


def int8_linear(hi: torch.Tensor, lo: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """model.linear's product and rescaling in one kernel: rows q = 128 hi + lo (int8 halves,
    [M, K]) at scale 2**k ([M] or [M, 1]) times w = [A; B] (int8 [2N, K]: weights and their
    rounding residuals x 256), rounded to Q16 int64 [M, N] plus ``bias``. The three int8
    products (hi.A, lo.A, hi.B) share one pass over the weights and never leave the chip.
    """
    m, kdim = hi.shape
    n = w.shape[0] // 2
    out = torch.empty((m, n), dtype=torch.int64, device=hi.device)
    bm = 16 if m <= 16 else 64 if m <= 512 else 128
    grid = (triton.cdiv(m, bm), triton.cdiv(n, 128))
    _linear_kernel[grid](hi.contiguous(), lo.contiguous(), k.reshape(-1).contiguous(), w,
                         scale, bias if bias is not None else scale, out, m, n, kdim,
                         HAS_BIAS=bias is not None, BM=bm, BN=128, BK=64, num_warps=4,
                         num_stages=3)
    return out


MAX_SPLITS = 16  # key ranges per head: parallelism across keys, bounded partial sums
BLOCK = 32  # keys per loop iteration within a split


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     pos: torch.Tensor, window: int, table: torch.Tensor,
                     index_scale: torch.Tensor, out_scale: int) -> torch.Tensor:
    """Attention of one new query per stream, q int64 [B, Hkv, rep, 1, d], over the int32
    cache [B, Hkv, capacity, d] at slots 0..pos[b] (the last ``window`` of them if window > 0).
    ``table``: the float64 exp table (Q16); ``index_scale``: float64 [1], score units to table
    steps (a tensor: kernels take Python floats as float32). Returns int64 [B, 1, Hkv * rep * d]
    in Q16."""
    b, n_kv, rep, _, d = q.shape
    capacity = keys.shape[2]
    n_heads, heads = n_kv * rep, b * n_kv * rep
    split = max(BLOCK, triton.cdiv(triton.cdiv(capacity, MAX_SPLITS), BLOCK) * BLOCK)
    n_splits = triton.cdiv(capacity, split)
    splits_p = triton.next_power_of_2(n_splits)
    q = q.contiguous()
    dev = q.device
    scores = torch.empty((heads, capacity), dtype=torch.float64, device=dev)
    best = torch.empty((heads, n_splits), dtype=torch.float64, device=dev)
    total = torch.empty((heads, n_splits), dtype=torch.float64, device=dev)
    acc = torch.empty((heads, n_splits, d), dtype=torch.float64, device=dev)
    out = torch.empty((heads, d), dtype=torch.int64, device=dev)
    grid = (heads, n_splits)
    _scores_kernel[grid](q, keys, pos, scores, best, n_heads, rep, capacity, window, n_splits,
                         D=d, SPLIT=split, BLOCK=BLOCK, num_warps=2)
    _weights_kernel[grid](values, pos, table, index_scale, scores, best, total, acc,
                          n_heads, rep, capacity, window, table.shape[0] - 1, n_splits,
                          D=d, SPLIT=split, BLOCK=BLOCK, SPLITS_P=splits_p, num_warps=2)
    _finish_kernel[(heads,)](total, acc, out, n_splits, OUT_SCALE=out_scale, D=d,
                             SPLITS_P=splits_p, num_warps=1)
    return out.reshape(b, 1, heads // b * d)
