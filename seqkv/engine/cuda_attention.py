"""Attention kernels of the engine (Triton): the same integers as ``IntModel._attend``.

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

from .cuda_ops import triton

if triton is not None:
    import triton.language as tl

    from .cuda_ops import _round_half_even

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
