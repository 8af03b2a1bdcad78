"""Attention kernels of the engine (Triton): the same integers as ``IntModel._heads`` and
``IntModel._attend``.

``heads`` rotates queries and keys and shifts values (model._heads) in one pass, writing the
keys and values straight into a cache. ``prefill_attention`` is a whole prefill's attention per
layer: each block of queries finds its rows' exact maximum in one pass over the keys and
recomputes the scores for the table weights in a second, so no [T, T] tensor is written.
``decode_attention`` is one step's attention for every stream of a decode group, over each
stream's own keys only (its position, not the cache's capacity), so one CUDA graph serves every
step: the key range of each head is split across programs (scores and partial maxima, with
the step's rotation and cache write; weights and partial sums), then one program per stream
divides and splits the row for the output projection. Large groups also keep a key-major copy
of their keys (``major_keys``) and run a key head's scores, weights and weighted values in one
program, its query heads together.

Every operation is the one the torch path performs: float16's rounding of the new keys and
values (intops.round_kv; float16 caches keep that float16), float64 products and sums of
integers below 2**53 (exact in any order), one IEEE multiply and floor for the table index,
one correctly rounded division and a round-half-to-even, so the results are bit-identical
(tests/test_cuda_attention.py and test_cuda_ops.py, run on the H200).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cuda_ops import launch_options, triton
from .intops import ACT_BITS, KV_EXP, kv_integers

if triton is not None:
    import triton.language as tl

    from .cuda_ops import _await_inputs, _round_half_even
    from .cuda_rows import _halves, _row_shift

    _KV_DOWN = tl.constexpr(2.0**-KV_EXP)
    _KV_UP = tl.constexpr(2.0**KV_EXP)

    @triton.jit
    def _as_cached(x, ptr):
        """Keys or values x (int64 Q12, |x| <= 2**23) rounded to float16's precision, as the
        cache at ptr holds them (intops.round_kv: float16's rounding of x * 2**-KV_EXP, ties
        to even; a float16 cache keeps that float16, others its integer)."""
        h = (x.to(tl.float32) * _KV_DOWN).to(tl.float16)
        if ptr.dtype.element_ty == tl.float16:
            return h
        else:
            return (h.to(tl.float32) * _KV_UP).to(ptr.dtype.element_ty)

    @triton.jit
    def _kv_float64(x):
        """Cached keys or values as float64 integers (intops.kv_float64)."""
        if x.dtype == tl.float16:
            return x.to(tl.float32).to(tl.float64) * _KV_UP
        else:
            return x.to(tl.float64)

    @triton.jit
    def _first_key(pos, window):
        """The first key a query at pos sees: 0, or the window's first (window > 0)."""
        return tl.where(window > 0, tl.maximum(pos - window + 1, 0), pos * 0)

    @triton.jit
    def _key_range(pos_ptr, head, split, n_heads, window, SPLIT: tl.constexpr):
        """Keys [start, end) of this program: its split of the head's keys lo..pos."""
        pos = tl.load(pos_ptr + head // n_heads)
        start = tl.maximum(_first_key(pos, window), split * SPLIT)
        end = tl.minimum(pos + 1, (split + 1) * SPLIT)
        return start, end

    @triton.jit
    def _rotated(row_ptr, d, mask, cos, sin, limit, ROPE_SHIFT: tl.constexpr, D: tl.constexpr):
        """model._rotate of heads' Q16 rows (rotate-half form; row_ptr + d addresses them)
        into Q12."""
        x = tl.load(row_ptr + d, mask=mask, other=0).to(tl.int64)  # int32 or int64 rows
        x = tl.minimum(tl.maximum(x, -(1 << 40)), 1 << 40)
        swapped = tl.load(row_ptr + (d + D // 2) % D, mask=mask, other=0).to(tl.int64)
        swapped = tl.minimum(tl.maximum(swapped, -(1 << 40)), 1 << 40)
        out = (x * cos + swapped * sin + (1 << (ROPE_SHIFT - 1))) >> ROPE_SHIFT
        return tl.minimum(tl.maximum(out, -limit), limit)

    @triton.jit
    def _shifted(row_ptr, d, mask, limit, V_SHIFT: tl.constexpr):
        """model._heads' values: rshift_round of Q16 rows into Q12, clamped."""
        v = tl.load(row_ptr + d, mask=mask, other=0).to(tl.int64)
        return tl.minimum(tl.maximum((v + (1 << (V_SHIFT - 1))) >> V_SHIFT, -limit), limit)

    @triton.jit
    def _heads_kernel(qkv_ptr, start_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, T, rows,
                      n_heads, n_kv, capacity, limit, ROPE_SHIFT: tl.constexpr,
                      V_SHIFT: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                      PDL: tl.constexpr):
        """model._heads of rows [B, T] of qkv at positions start[b] + t, without q/k norms:
        head j of BT rows (b, t) of the B T (a block may span streams: a decode step's
        rows are one per stream) rotated (queries and keys) or shifted (values) into Q12,
        queries into q [B, H, T, d], keys and values into the cache [B, Hkv, capacity, d] at
        their positions."""
        _await_inputs(PDL)
        blk, j = tl.program_id(0), tl.program_id(1)
        r = blk * BT + tl.arange(0, BT)
        ok = r < rows
        b, t = r // T, r % T
        d = tl.arange(0, D)[None, :]
        p = (tl.load(start_ptr + b, mask=ok, other=0) + t)[:, None]
        ok = ok[:, None]
        row = qkv_ptr + r[:, None].to(tl.int64) * ((n_heads + 2 * n_kv) * D) + j * D
        slot = ((b * n_kv).to(tl.int64)[:, None] * capacity + p) * D  # + head * capacity * D
        if j < n_heads + n_kv:
            cos = tl.load(cos_ptr + p * D + d, mask=ok, other=0)
            sin = tl.load(sin_ptr + p * D + d, mask=ok, other=0)
            out = _rotated(row, d, ok, cos, sin, limit, ROPE_SHIFT, D)
            if j < n_heads:
                tl.store(q_ptr + ((b * n_heads + j).to(tl.int64)[:, None] * T + t[:, None]) * D
                         + d, out.to(q_ptr.dtype.element_ty), mask=ok)
            else:
                kv = (j - n_heads).to(tl.int64)
                tl.store(k_ptr + slot + kv * capacity * D + d, _as_cached(out, k_ptr), mask=ok)
        else:
            out = _shifted(row, d, ok, limit, V_SHIFT)
            kv = (j - n_heads - n_kv).to(tl.int64)
            tl.store(v_ptr + slot + kv * capacity * D + d, _as_cached(out, v_ptr), mask=ok)

    @triton.jit
    def _scores_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, scores_ptr, best_ptr,
                       n_heads, rep, n_kv, capacity, window, n_splits, limit,
                       ROTATE: tl.constexpr, ROPE_SHIFT: tl.constexpr, V_SHIFT: tl.constexpr,
                       D: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
        """Scores and their maximum over this program's keys. ROTATE: q_ptr holds the step's
        qkv rows [B, (H + 2 Hkv) d]; the program rotates its query and its head's new key
        (model._heads), uses that key at the stream's position, and the first query head of
        each key head writes the new key and value into the cache (for the next kernels and
        steps). Else q_ptr holds rotated queries [B, H, d] and the cache the new keys."""
        _await_inputs(PDL)
        head, split = tl.program_id(0), tl.program_id(1)  # head: b * n_heads + h
        start, end = _key_range(pos_ptr, head, split, n_heads, window, SPLIT)
        d = tl.arange(0, D)
        s = tl.arange(0, BLOCK)
        kv_head = (head // rep).to(tl.int64)  # b * n_kv + h // rep
        k_base = kv_head * capacity * D
        pos = tl.load(pos_ptr + head // n_heads)
        if ROTATE:
            b, h = head // n_heads, head % n_heads
            row = q_ptr + b.to(tl.int64) * (n_heads + 2 * n_kv) * D
            cos = tl.load(cos_ptr + pos * D + d)
            sin = tl.load(sin_ptr + pos * D + d)
            whole = d < D
            q = _rotated(row + h * D, d, whole, cos, sin, limit, ROPE_SHIFT, D).to(tl.float64)
            kv = h // rep
            new_key = _as_cached(_rotated(row + (n_heads + kv) * D, d, whole, cos, sin, limit,
                                          ROPE_SHIFT, D), k_ptr)
            if (h % rep == 0) & (split == pos // SPLIT):
                v = _shifted(row + (n_heads + n_kv + kv) * D, d, whole, limit, V_SHIFT)
                tl.store(k_ptr + k_base + pos * D + d, new_key)
                tl.store(v_ptr + k_base + pos * D + d, _as_cached(v, v_ptr))
        else:
            q = tl.load(q_ptr + head * D + d).to(tl.float64)
        row = head.to(tl.int64) * capacity
        best = tl.full([BLOCK], float("-inf"), tl.float64)
        for first in range(start, end, BLOCK):
            keys = first + s
            valid = keys < end
            k = tl.load(k_ptr + k_base + keys[:, None] * D + d[None, :],
                        mask=valid[:, None], other=0)
            if ROTATE:  # this step's key, which another program may be writing
                k = tl.where((keys == pos)[:, None], new_key[None, :], k)
            scores = tl.sum(_kv_float64(k) * q[None, :], axis=1)  # exact: below 2**53
            tl.store(scores_ptr + row + keys, scores, mask=valid)
            best = tl.maximum(best, tl.where(valid, scores, float("-inf")))
        tl.store(best_ptr + head * n_splits + split, tl.max(best, axis=0))

    @triton.jit
    def _lane_scores(q_ptr, heads, live, key_ptr, d_stride, ok, D: tl.constexpr,
                     DEPTH: tl.constexpr):
        """Scores [RP, N] of the query heads ``heads`` (float64 queries [., d]; ``live``: the
        real ones) over N keys, each lane its own keys: key element d at key_ptr + d *
        d_stride (float16, as intops.kv_float16 holds them). A lane sums its keys' products
        down d in its own registers (no lane exchanges), the queries' elements the same for
        every lane. float16's value times 2**KV_EXP is the cached integer, so the sums are
        scaled once at the end (exact: a power of two)."""
        acc = tl.zeros([heads.shape[0], key_ptr.shape[0]], tl.float64)
        for first in range(0, D, DEPTH):  # DEPTH elements' loads in flight, not all D's
            for j in tl.static_range(DEPTH):
                d = first + j
                k = tl.load(key_ptr + d * d_stride, mask=ok, other=0).to(tl.float64)
                q = tl.load(q_ptr + heads * D + d, mask=live, other=0.0)
                acc += q[:, None] * k[None, :]  # integers below 2**53 (times 2**-KV_EXP)
        return _kv_scaled(acc, key_ptr)

    @triton.jit
    def _group_scores(q_ptr, heads, live, major_ptr, keys, capacity, ok, D: tl.constexpr):
        """_lane_scores over the key-major copy [d / 4, capacity, 4]: a lane loads 4 elements
        of a key in one 8-byte load (Triton does not vectorize _lane_scores' 2-byte loads down
        d), the queries' 4 the same way, and takes the columns apart with reshape and split,
        which keeps every tile 2-D (3-D tiles ran 4x slower)."""
        acc = tl.zeros([heads.shape[0], keys.shape[0]], tl.float64)
        e = tl.arange(0, 4)
        for g in range(D // 4):
            k = tl.load(major_ptr + (g * capacity + keys[:, None]) * 4 + e[None, :],
                        mask=ok[:, None], other=0).to(tl.float64)
            q = tl.load(q_ptr + heads[:, None] * D + g * 4 + e[None, :], mask=live[:, None],
                        other=0.0)
            k02, k13 = tl.split(tl.reshape(k, [keys.shape[0], 2, 2]))
            k0, k2 = tl.split(k02)
            k1, k3 = tl.split(k13)
            q02, q13 = tl.split(tl.reshape(q, [heads.shape[0], 2, 2]))
            q0, q2 = tl.split(q02)
            q1, q3 = tl.split(q13)
            acc += q0[:, None] * k0[None, :]  # integers below 2**53 (times 2**-KV_EXP)
            acc += q1[:, None] * k1[None, :]
            acc += q2[:, None] * k2[None, :]
            acc += q3[:, None] * k3[None, :]
        return _kv_scaled(acc, major_ptr)

    @triton.jit
    def _kv_scaled(acc, ptr):
        """Sums of products of cached values as float64 (``_kv_float64`` without its
        multiply) scaled to those of their integers: exact, a power of two."""
        if ptr.dtype.element_ty == tl.float16:
            return acc * _KV_UP
        else:
            return acc

    @triton.jit
    def _key_head_attention_kernel(q_ptr, k_ptr, v_ptr, major_ptr, pos_ptr, table_ptr,
                                   scale_ptr, scratch_ptr, total_ptr, acc_ptr, n_kv, capacity,
                                   window, table_last, REP: tl.constexpr, RP: tl.constexpr,
                                   D: tl.constexpr, KEYS: tl.constexpr, RUN: tl.constexpr,
                                   WKEYS: tl.constexpr, VKEYS: tl.constexpr,
                                   DEPTH: tl.constexpr, PDL: tl.constexpr):
        """The REP query heads of one key head over all its keys, in one program (groups
        with a key-major copy): scores, their exact maximum, the table weights and the
        weighted values, as _scores_kernel and _weights_kernel compute them, into the finish
        kernel's partial sums. Built for occupancy and few conversions, where the split
        kernels held 128-252 registers a thread (8-16 programs an SM, their loads' latency
        what the step waited on) and converted each value once per query head: the scores
        and weights run with keys across the lanes, the weighted values with elements across
        them, so no lane holds a tile and each key and value is converted once for all the
        query heads. The keys come from the key-major copy below the stream's last run of
        RUN positions, that run from the rows (copied over once whole). The scores, then the
        weights, go through ``scratch`` [B Hkv, RP, capacity]."""
        _await_inputs(PDL)
        kv = tl.program_id(0)  # b * n_kv + key head
        pos = tl.load(pos_ptr + kv // n_kv)
        start, end = _first_key(pos, window), pos + 1
        run = tl.multiple_of(pos - pos % RUN, RUN)  # the first key of the stream's last run
        r = tl.arange(0, RP)
        live = r < REP
        heads = (kv * REP + r).to(tl.int64)
        base = kv.to(tl.int64) * D * capacity  # of [capacity, d] rows and [d, capacity] alike
        weights = scratch_ptr + base // D * RP + r * capacity  # a head's keys: [RP]
        rows = weights[:, None]
        top = tl.full([RP], float("-inf"), tl.float64)
        below = tl.minimum(end, run)
        for first in range(start - start % KEYS, below, KEYS):
            keys = tl.multiple_of(first, KEYS) + tl.arange(0, KEYS)
            ok = (keys >= start) & (keys < below)
            s = _group_scores(q_ptr, heads, live, major_ptr + base, keys, capacity, ok, D)
            tl.store(rows + keys[None, :], s, mask=ok[None, :])
            top = tl.maximum(top, tl.max(tl.where(ok[None, :], s, float("-inf")), axis=1))
        last = run + tl.arange(0, RUN)
        seen = (last >= start) & (last <= pos)
        s_last = _lane_scores(q_ptr, heads, live, k_ptr + base + last * D, 1, last <= pos,
                              D, DEPTH)
        tl.store(rows + last[None, :], s_last, mask=seen[None, :])
        top = tl.maximum(top, tl.max(tl.where(seen[None, :], s_last, float("-inf")), axis=1))
        if pos % RUN == RUN - 1:  # the run is whole: into the copy, a run of each group
            e4 = tl.arange(0, 4)
            for g in tl.static_range(D // 4):
                tl.store(major_ptr + base + (g * capacity + last[:, None]) * 4 + e4[None, :],
                         tl.load(k_ptr + base + last[:, None] * D + g * 4 + e4[None, :]))
        tl.debug_barrier()  # the scores are read back in other lanes
        index_scale = tl.load(scale_ptr)  # float64: a Python float argument would be fp32
        total = tl.zeros([RP, WKEYS], tl.float64)
        for first in range(start - start % WKEYS, end, WKEYS):
            keys = tl.multiple_of(first, WKEYS) + tl.arange(0, WKEYS)
            used = live[:, None] & ((keys >= start) & (keys < end))[None, :]
            s = tl.load(rows + keys[None, :], mask=used, other=0.0)
            idx = tl.minimum(tl.floor((top[:, None] - s) * index_scale), table_last)
            p = tl.load(table_ptr + idx.to(tl.int64), mask=used, other=0.0)
            tl.store(rows + keys[None, :], p, mask=used)  # (padding heads: scores of 0)
            total += p
        tl.debug_barrier()  # the weights, likewise
        d = tl.arange(0, D)
        acc = tl.zeros([RP, D], tl.float64)
        values = v_ptr + base + d
        for first in range(start, end, VKEYS):
            for j in tl.static_range(VKEYS):
                key = first + j
                v = tl.load(values + key * D, mask=key < end, other=0).to(tl.float64)
                p = tl.load(weights + key, mask=key < end, other=0.0)
                acc += p[:, None] * v[None, :]  # integers below 2**53 (times 2**-KV_EXP)
        tl.store(total_ptr + heads, tl.sum(total, axis=1), mask=live)
        tl.store(acc_ptr + heads[:, None] * D + d[None, :], _kv_scaled(acc, v_ptr),
                 mask=live[:, None])

    @triton.jit
    def _weights_kernel(v_ptr, pos_ptr, table_ptr, scale_ptr, scores_ptr, best_ptr,
                        total_ptr, acc_ptr, n_heads, rep, capacity, window, table_last, n_splits,
                        D: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                        SPLITS_P: tl.constexpr, PDL: tl.constexpr):
        _await_inputs(PDL)
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
            v = _kv_float64(tl.load(v_ptr + v_base + keys[:, None] * D + d[None, :],
                                    mask=valid[:, None], other=0))
            total += p
            acc += tl.sum(p[:, None] * v, axis=0)
        part = head.to(tl.int64) * n_splits + split
        tl.store(total_ptr + part, tl.sum(total, axis=0))
        tl.store(acc_ptr + part * D + d, acc)

    @triton.jit
    def _finish_kernel(total_ptr, acc_ptr, hi_ptr, lo_ptr, shift_ptr, n_heads,
                       N_SPLITS: tl.constexpr, OUT_SCALE: tl.constexpr, ACT_BITS: tl.constexpr,
                       D: tl.constexpr, HP: tl.constexpr, PDL: tl.constexpr):
        """One stream's attention output (every head: the weighted values over the weights'
        sum, rounded half to even) as the o projection's input: intops.split_rows' int8
        halves and shift of the row (cuda_rows' helpers, the same integers). The splits'
        loop is unrolled so that their loads are in flight together (a loop over a runtime
        count took 7 us a call on the H200, one load after another)."""
        _await_inputs(PDL)
        b = tl.program_id(0)
        h = tl.arange(0, HP)
        d = tl.arange(0, D)
        ok = h < n_heads
        part = (b * n_heads + h).to(tl.int64) * N_SPLITS
        total = tl.zeros([HP], tl.float64)
        acc = tl.zeros([HP, D], tl.float64)
        for split in tl.static_range(N_SPLITS):  # integers below 2**53: exact in any order
            total += tl.load(total_ptr + part + split, mask=ok, other=0.0)
            acc += tl.load(acc_ptr + (part + split)[:, None] * D + d[None, :],
                           mask=ok[:, None], other=0.0)
        ratio = (acc * OUT_SCALE) / tl.where(ok, total, 1.0)[:, None]  # IEEE div.rn.f64
        out = tl.where(ok[:, None], _round_half_even(ratio), 0)
        shift = _row_shift(tl.max(tl.max(tl.abs(out), axis=1), axis=0), ACT_BITS)
        hi, lo = _halves(out, shift)
        where = b.to(tl.int64) * n_heads * D + h[:, None] * D + d[None, :]
        tl.store(hi_ptr + where, hi, mask=ok[:, None])
        tl.store(lo_ptr + where, lo, mask=ok[:, None])
        tl.store(shift_ptr + b, shift)

MAX_SPLITS = 16  # key ranges per head: parallelism across keys, bounded partial sums
# Splits per head so that a step launches about this many programs: few streams need the keys
# split for parallelism, many streams have it from their heads and pay per program. On the
# H200 (SmolLM2's shapes, positions 100-190 of 320 slots) 2,048 took a 256-stream step from
# 3.96 to 3.16 ms and a 1,024-stream one from 10.9 to 7.2 (4,096-16,384: 3.31-3.41 and
# 7.2-7.5; 1 and 16 streams alike). None: always MAX_SPLITS.
TARGET_PROGRAMS: int | None = 2048
BLOCK = 32  # keys per loop iteration
# ... in the split heads of groups of up to SMALL_GROUP streams: fewer, fuller splits. At one
# stream (SmolLM2's shapes, capacity 320) 64 took a whole decode step from 1.28-1.50 to
# 1.21-1.44 ms (5 splits, not 10, of one iteration each; the finish reads half the partial
# sums); 16 streams gained too. At 32 streams the longest positions lost 4% (a 64-key tile is
# twice the registers, and larger groups run more programs at once), so larger groups keep 32.
SPLIT_BLOCK = 64
SMALL_GROUP = 16
# Warps a program. One warp for the weights of groups above SMALL_GROUP: on the H200 (SmolLM2,
# positions 120-130) the kernel took 2.54 -> 1.39 ms a step at 1,024 streams and 0.80 -> 0.48
# at 256, more programs resident with their loads in flight; the scores kernel (which also
# rotates) got slower with one (2.75 -> 4.72 ms), so it keeps two
# (benchmarks/dev/h200_attention_sweep.py, h200_decode_positions.py --set). Where it does not
# rotate (ROTATE_MAX_STREAMS), four: 2.08 ms at 1,024 streams against 2.18 with two, 2.23 with one.
SCORES_WARPS = 2
PLAIN_SCORES_WARPS = 4
WEIGHTS_WARPS = 1
# Groups of up to this many streams rotate each step's queries and new keys inside the scores
# kernel, larger ones in ``heads`` first. The rotating kernel loads its query's and key's rows
# and rotary tables before its first keys, once per query head: a kernel less for small
# groups, but on the H200 (SmolLM2's shapes, whole 256-token decodes) a separate rotation took
# a 256-stream step from 3.54 to 3.23 ms on average and a 1,024-stream one from 7.54 to 7.15
# (scores 2.75 -> 2.08 ms at positions 120-130, plus 0.32 in ``heads``); 64 streams were level
# (1.91 / 1.90), and small groups keep the kernel fewer.
ROTATE_MAX_STREAMS = 64
# Groups of at least this many streams keep a key-major copy of their keys (``major_keys``),
# and their attention runs in one kernel, a program per key head over all its keys
# (_key_head_attention_kernel): keys across the lanes, each lane summing its keys' products
# down the copy, 4 elements a load (the copy holds a key's elements in groups of 4). On the
# H200 the groups of 4 took a layer from 83 / 126 us to 72 / 115 at 1,024 streams, positions
# 128 / 250, and from 59 to 50 at 512 streams (two groups loaded ahead: 90 / 147 and 46); in
# whole decodes, the attention from 2.15 to 1.93 ms a step at positions 120-130 (2026-12-02).
# The copy is written a run of positions at a time (MAJOR_RUN_BYTES of each element), from
# the cache's rows: a key's elements lie capacity apart there, and writing each step's key
# into it (a 4-byte store per element, when caches held int32) had cost 0.51 ms of a
# 1,024-stream step against 0.11 for the rows. On the H200 (SmolLM2's shapes, whole 256-token
# decodes, benchmarks/dev/h200_decode_positions.py) the int32 copy, then scored in a kernel of
# its own, took a 1,024-stream step from 6.74 to 6.17 ms on average, a 512-stream one from
# 4.39 to 4.11, a 256-stream one from 3.18 to 3.13. The copy adds the keys' bytes again (half
# a cache's), so groups small enough for the codec to keep (256 streams and fewer, for SmolLM2
# on the H200) go without it: at 256 streams the one kernel over the copy took 33 us a layer
# against 31 for the split kernels over the rows (benchmarks/dev/h200_key_head.py).
KEY_MAJOR_MIN_STREAMS = 512
MAJOR_RUN_BYTES = 32  # 16 positions of float16: whole sectors of each group of 4 elements
# _key_head_attention_kernel's blocks: keys an iteration of the scores (one warp: 4 a lane) and
# of the weights, keys an unrolled iteration of the weighted values, and key elements a lane
# loads ahead in the last run's scores (from the rows). Swept on the H200 before the groups of
# 4 (1,024 streams at positions 128 / 250, h200_key_head.py), when the kernel took 83 / 128 us
# a layer against 100 / 157 for the scores and weights kernels it replaced: 128 keys of
# weights a loop (168 registers a thread, not 80: fewer programs resident) 93 / 146, 8 elements
# ahead 87-92 / 136-146, 16 values an iteration 91-97 / 139-149, 64 or 256 keys of scores
# 93 / 146 and 119 / 152, two or four warps 124-155 / 184-204. With the groups: a program per
# one or two query heads (62-64 registers, two or three times the programs) 124 / 201 and
# 102 / 169 against 71 / 118, each key read again for every program.
KEY_HEAD_KEYS = 128
KEY_HEAD_WEIGHTS = 32
KEY_HEAD_VALUES = 8
KEY_HEAD_DEPTH = 4


def major_run(major: torch.Tensor) -> int:
    """Positions a key-major copy is written at a time: MAJOR_RUN_BYTES of each element."""
    return MAJOR_RUN_BYTES // major.element_size()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     pos: torch.Tensor, window: int, table: torch.Tensor,
                     index_scale: torch.Tensor, out_scale: int,
                     rotation: Rotation | None = None, major: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of one new query per stream over the cache [B, Hkv, capacity, d] (float16 as
    intops.kv_float16 holds keys and values, or integers) at slots 0..pos[b] (the last
    ``window`` of them if window > 0), returned as the o projection's input:
    intops.split_rows of the Q16 rows [B, H d] (int8 halves [B, H d], shifts [B, 1]).
    ``major``: the keys' key-major copy (``major_keys``) where the group keeps one.

    q: the rotated queries [B, Hkv, rep, 1, d] as integers (the cache holds the new keys;
    float64 where the group keeps a key-major copy, whose kernel reads them without
    converting: others are converted here); or, with ``rotation``, the step's qkv rows
    [B, (H + 2 Hkv) d], rotated here (model._heads for models without q/k norms), the new keys
    and values written into the cache at pos.
    ``table``: the float64 exp table (Q16); ``index_scale``: float64 [1], score units to table
    steps (a tensor: kernels take Python floats as float32)."""
    b, n_kv, capacity, d = keys.shape
    if major is not None and rotation is not None:
        raise ValueError("the rotating scores kernel writes the rows, not a key-major copy")
    n_heads = rotation.n_heads if rotation is not None else q.shape[2] * n_kv
    rep, heads = n_heads // n_kv, b * n_heads
    splits = (MAX_SPLITS if TARGET_PROGRAMS is None
              else min(MAX_SPLITS, max(1, triton.cdiv(TARGET_PROGRAMS, heads))))
    if major is not None:  # a program per key head, over all its keys
        splits = 1
    block = SPLIT_BLOCK if splits > 1 and b <= SMALL_GROUP else BLOCK
    split = max(block, triton.cdiv(triton.cdiv(capacity, splits), block) * block)
    n_splits = triton.cdiv(capacity, split)
    q = q.contiguous()
    dev = q.device
    total = torch.empty((heads, n_splits), dtype=torch.float64, device=dev)
    acc = torch.empty((heads, n_splits, d), dtype=torch.float64, device=dev)
    hi = torch.empty((b, n_heads * d), dtype=torch.int8, device=dev)
    lo = torch.empty((b, n_heads * d), dtype=torch.int8, device=dev)
    shift = torch.empty((b, 1), dtype=torch.int64, device=dev)
    launch = launch_options(dev, b)
    if major is not None:
        rp = triton.next_power_of_2(rep)
        scratch = torch.empty((b * n_kv, rp, capacity), dtype=torch.float64, device=dev)
        _key_head_attention_kernel[(b * n_kv,)](
            q.to(torch.float64), keys, values, major, pos, table, index_scale, scratch, total,
            acc, n_kv, capacity, window, table.shape[0] - 1, REP=rep, RP=rp, D=d,
            KEYS=KEY_HEAD_KEYS, RUN=major_run(major), WKEYS=KEY_HEAD_WEIGHTS,
            VKEYS=KEY_HEAD_VALUES, DEPTH=KEY_HEAD_DEPTH, num_warps=1, **launch)
    else:
        scores = torch.empty((heads, capacity), dtype=torch.float64, device=dev)
        best = torch.empty((heads, n_splits), dtype=torch.float64, device=dev)
        r = rotation or Rotation(n_heads, q, q, 0, 1, 1)  # cos, sin: unread without ROTATE
        grid = (heads, n_splits)
        _scores_kernel[grid](
            q, keys, values, pos, r.cos, r.sin, scores, best, n_heads, rep, n_kv, capacity,
            window, n_splits, r.limit, ROTATE=rotation is not None, ROPE_SHIFT=r.rope_shift,
            V_SHIFT=r.v_shift, D=d, SPLIT=split, BLOCK=block,
            num_warps=SCORES_WARPS if rotation is not None else PLAIN_SCORES_WARPS, **launch)
        _weights_kernel[grid](values, pos, table, index_scale, scores, best, total, acc,
                              n_heads, rep, capacity, window, table.shape[0] - 1, n_splits,
                              D=d, SPLIT=split, BLOCK=block,
                              SPLITS_P=triton.next_power_of_2(n_splits),
                              num_warps=WEIGHTS_WARPS if b > SMALL_GROUP else SCORES_WARPS,
                              **launch)
    _finish_kernel[(b,)](total, acc, hi, lo, shift, n_heads, N_SPLITS=n_splits,
                         OUT_SCALE=out_scale, ACT_BITS=ACT_BITS, D=d,
                         HP=triton.next_power_of_2(n_heads), num_warps=4, **launch)
    return hi, lo, shift


@dataclass(frozen=True)
class Rotation:
    """What decode_attention needs to rotate a step's qkv rows itself: the head count, the
    full-width rotary tables (IntModel.rope) and model._heads' bound and shifts."""

    n_heads: int
    cos: torch.Tensor
    sin: torch.Tensor
    limit: int
    rope_shift: int
    v_shift: int


def heads(qkv: torch.Tensor, start: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
          r: Rotation, q_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """model._heads of qkv rows [B, T, (H + 2 Hkv) d] at positions start[b] + t (models
    without q/k norms): returns the queries [B, Hkv, H / Hkv, T, d] as ``q_dtype`` (int32,
    or float64 for the kernels that multiply in float64 without converting); the keys and
    values, rounded to float16's precision, go straight into the cache [B, Hkv, capacity, d]
    (float16, or any dtype that holds their integers) at their positions. One pass, where the
    compiled torch composition took four (the rotation's concatenations, the values' shift and
    the copies into each layout)."""
    b, t = qkv.shape[:2]
    _, n_kv, capacity, d = keys.shape
    q = torch.empty((b, n_kv, r.n_heads // n_kv, t, d), dtype=q_dtype, device=qkv.device)
    bt = min(32, triton.next_power_of_2(b * t))
    _heads_kernel[(triton.cdiv(b * t, bt), r.n_heads + 2 * n_kv)](
        qkv.contiguous(), start.contiguous(), r.cos, r.sin, q, keys, values, t, b * t,
        r.n_heads, n_kv, capacity, r.limit, ROPE_SHIFT=r.rope_shift, V_SHIFT=r.v_shift, D=d,
        BT=bt, num_warps=1 if bt == 1 else 4, **launch_options(qkv.device, b * t))
    return q


def major_keys(b: int, n_kv: int, capacity: int, d: int, device: torch.device | str,
               dtype: torch.dtype) -> torch.Tensor:
    """A zero key-major copy of keys [B, Hkv, capacity, d] of ``dtype``: [B, Hkv, d / 4,
    capacity, 4] (a key's elements in groups of 4: one 8-byte load a lane), which
    decode_attention(major=) reads below each stream's last run of ``major_run`` positions and
    fills run by run; a prefill fills it with ``fill_major``."""
    return torch.zeros((b, n_kv, d // 4, capacity, 4), dtype=dtype, device=device)


def fill_major(major: torch.Tensor, keys: torch.Tensor) -> None:
    """Copy keys [B, Hkv, T, d] (positions 0..T-1 of the first B streams) into their
    key-major copy."""
    b, n_kv, t, d = keys.shape
    major[:b, :, :, :t] = keys.reshape(b, n_kv, t, d // 4, 4).transpose(2, 3)


if triton is not None:

    @triton.jit
    def _prefill_scores(q, k_ptr, k_base, kpos, qpos, S, window,
                        stride_ks, stride_kd, D: tl.constexpr):
        """Scores q.k [BM, BN] (float64, exact) of a query block over keys kpos, and which of
        them the queries at qpos may see (causal, within ``window`` if > 0)."""
        d = tl.arange(0, D)
        k = tl.load(k_ptr + k_base + kpos[None, :].to(tl.int64) * stride_ks
                    + d[:, None] * stride_kd, mask=(kpos < S)[None, :], other=0)
        scores = tl.dot(q, k.to(tl.float64))  # integers below 2**53: exact in any order
        near = (qpos[:, None] - kpos[None, :] < window) | (window <= 0)
        return scores, (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < S) & near

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, scale_ptr, T, S, n_heads, rep,
                        n_kv, window, table_last, n_blocks,
                        stride_kb, stride_kh, stride_ks, stride_kd,
                        stride_vb, stride_vh, stride_vs, stride_vd,
                        OUT_SCALE: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, PDL: tl.constexpr):
        """One block of BM query rows of one head: the exact maximum over the keys it sees
        (first pass), then the table weights, their sum and the weighted values (second)."""
        _await_inputs(PDL)
        # one grid axis: the second stops at 65,535 programs, which b * n_heads passes at
        # ~7,300 short streams of SmolLM2 in one prefill
        pid = tl.program_id(0)
        blk, bh = pid % n_blocks, pid // n_blocks  # bh: b * n_heads + head
        b, head = bh // n_heads, bh % n_heads
        kv = head // rep
        qpos = blk * BM + tl.arange(0, BM)  # query i sits at position i (S - T before it)
        row_ok = qpos < T
        qpos_abs = qpos + (S - T)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (bh.to(tl.int64) * T + qpos[:, None]) * D + d[None, :],
                    mask=row_ok[:, None], other=0).to(tl.float64)
        k_base = b.to(tl.int64) * stride_kb + kv * stride_kh
        v_base = b.to(tl.int64) * stride_vb + kv * stride_vh
        last = tl.minimum(blk * BM + BM + (S - T), S)  # keys past the block's last query unseen
        first = tl.where(window > 0, tl.maximum(blk * BM + (S - T) - window + 1, 0), 0)
        first = (first // BN) * BN
        top = tl.full([BM], float("-inf"), tl.float64)
        for start in range(first, last, BN):
            kpos = start + tl.arange(0, BN)
            scores, seen = _prefill_scores(q, k_ptr, k_base, kpos, qpos_abs, S, window,
                                           stride_ks, stride_kd, D)
            top = tl.maximum(top, tl.max(tl.where(seen, scores, float("-inf")), axis=1))
        index_scale = tl.load(scale_ptr)  # float64: a Python float argument would be fp32
        top = tl.where(row_ok, top, 0.0)  # padding rows: no -inf - -inf
        total = tl.zeros([BM], tl.float64)
        acc = tl.zeros([BM, D], tl.float64)
        for start in range(first, last, BN):
            kpos = start + tl.arange(0, BN)
            scores, seen = _prefill_scores(q, k_ptr, k_base, kpos, qpos_abs, S, window,
                                           stride_ks, stride_kd, D)
            seen = seen & row_ok[:, None]
            idx = tl.minimum(tl.floor((top[:, None] - scores) * index_scale), table_last)
            idx = tl.where(seen, idx, table_last).to(tl.int64)  # the table ends with its 0
            p = tl.load(table_ptr + idx)
            v = tl.load(v_ptr + v_base + kpos[:, None].to(tl.int64) * stride_vs
                        + d[None, :] * stride_vd, mask=(kpos < S)[:, None], other=0)
            total += tl.sum(p, axis=1)
            acc += tl.dot(p, v.to(tl.float64))  # p.v sums below 2**53: exact
        total = tl.where(row_ok, total, 1.0)  # padding rows: no 0 / 0
        ratio = (acc * OUT_SCALE) / total[:, None]  # float64 division: IEEE div.rn.f64
        out = (b.to(tl.int64) * T + qpos[:, None]) * (n_heads * D) + head * D + d[None, :]
        tl.store(out_ptr + out, _round_half_even(ratio), mask=row_ok[:, None])


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int,
                      table: torch.Tensor, index_scale: torch.Tensor,
                      out_scale: int) -> torch.Tensor:
    """``IntModel._attend`` of a prefill in one kernel: queries q int64 [B, Hkv, rep, T, d] at
    positions S - T .. S - 1 over keys and values [B, Hkv, S, d] (float16 as
    intops.kv_float16 holds them, or any integer or float64 dtype; any strides) at positions
    0 .. S - 1, causal (and the last ``window`` positions if window > 0). The scores never
    leave the chip: one pass finds each row's exact maximum, a second recomputes them for
    the weights. Returns Q16 int64 [B, T, Hkv * rep * d]."""
    b, n_kv, rep, t, d = q.shape
    s = keys.shape[2]
    n_heads = n_kv * rep
    out = torch.empty((b, t, n_heads * d), dtype=torch.int64, device=q.device)
    if keys.dtype == torch.float16:  # Triton 3.6 fails to lower 16-bit operands of this
        # kernel's float64 dots (H200): a float16 cache's integers as int32
        keys, values = kv_integers(keys, torch.int32), kv_integers(values, torch.int32)
    # 32 x 32 blocks unpipelined: on the H200 at SmolLM2's shapes (64 x 256 tokens, 9 heads
    # of 64) 367 us a layer, against 395-541 for 64-row blocks or pipelined loads
    bm = 32 if d <= 128 else 16
    n_blocks = triton.cdiv(t, bm)
    _prefill_kernel[(n_blocks * b * n_heads,)](
        q.contiguous(), keys, values, out, table, index_scale, t, s, n_heads, rep, n_kv, window,
        table.shape[0] - 1, n_blocks, *keys.stride(), *values.stride(), OUT_SCALE=out_scale,
        D=d, BM=bm, BN=32, num_warps=4, num_stages=1, **launch_options(q.device, b * t))
    return out
