"""Fused GPU kernels of the engine (Triton), computing the same integers as model.py's torch code.

``int8_linear`` (each GEMM with its rescaling), ``rope_heads`` (a step's rotation, its keys and
values written into the cache in the same kernel), ``locate`` (the next-token distribution and
the rANS symbol search without the [B, V] table) and ``intervals`` (the encoder's side of it).
The attention kernels are in cuda_attention.py, the row passes before each GEMM in cuda_rows.py.
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


    # -- the next-token distribution and the decoder's symbol search, without the table -----
    # model.pmf's integers (freq = floor((total + p budget) / total), the argmax gets what the
    # floors leave, a dummy 1 at either end) and VectorRansDecoder's search (the first symbol
    # whose cumulative frequency exceeds the quantile), in four passes over blocks of the
    # vocabulary: the logits' maximum; the weights' sum; the frequencies' block sums; per
    # stream, the block holding the quantile and the symbol inside it.
    @triton.jit
    def _weights(logits_ptr, row, cols, valid, top, table_ptr, table_last, SHIFT: tl.constexpr):
        """The exp table's weight of each logit at its distance from the maximum."""
        x = tl.load(logits_ptr + row + cols, mask=valid, other=0)
        idx = tl.minimum((top + (1 << (SHIFT - 1)) - x) >> SHIFT, table_last)
        return tl.load(table_ptr + idx, mask=valid, other=0)

    @triton.jit
    def _max_kernel(logits_ptr, best_ptr, arg_ptr, vocab, n_blocks, BV: tl.constexpr):
        b, blk = tl.program_id(0), tl.program_id(1)
        cols = blk * BV + tl.arange(0, BV)
        valid = cols < vocab
        x = tl.load(logits_ptr + b.to(tl.int64) * vocab + cols, mask=valid,
                    other=-(1 << 62))
        best, arg = tl.max(x, axis=0, return_indices=True)  # the first of equal maxima
        tl.store(best_ptr + b * n_blocks + blk, best)
        tl.store(arg_ptr + b * n_blocks + blk, blk * BV + arg)

    @triton.jit
    def _top(best_ptr, b, n_blocks, NB: tl.constexpr):
        parts = tl.arange(0, NB)
        return tl.max(tl.load(best_ptr + b * n_blocks + parts, mask=parts < n_blocks,
                              other=-(1 << 62)), axis=0)

    @triton.jit
    def _weight_sum_kernel(logits_ptr, best_ptr, table_ptr, psum_ptr, vocab, n_blocks,
                           table_last, SHIFT: tl.constexpr, BV: tl.constexpr,
                           NB: tl.constexpr):
        b, blk = tl.program_id(0), tl.program_id(1)
        top = _top(best_ptr, b, n_blocks, NB)
        cols = blk * BV + tl.arange(0, BV)
        p = _weights(logits_ptr, b.to(tl.int64) * vocab, cols, cols < vocab, top, table_ptr,
                     table_last, SHIFT)
        tl.store(psum_ptr + b * n_blocks + blk, tl.sum(p, axis=0))

    @triton.jit
    def _block_freqs(logits_ptr, psum_ptr, best_ptr, table_ptr, b, blk, vocab, n_blocks,
                     table_last, budget, SHIFT: tl.constexpr, BV: tl.constexpr,
                     NB: tl.constexpr):
        """floor(p budget / total) + 1 for one block's tokens (0 past the vocabulary)."""
        parts = tl.arange(0, NB)
        total = tl.sum(tl.load(psum_ptr + b * n_blocks + parts, mask=parts < n_blocks,
                               other=0), axis=0)
        top = _top(best_ptr, b, n_blocks, NB)
        cols = blk * BV + tl.arange(0, BV)
        valid = cols < vocab
        p = _weights(logits_ptr, b.to(tl.int64) * vocab, cols, valid, top, table_ptr,
                     table_last, SHIFT)
        return tl.where(valid, (total + p * budget) // total, 0), cols

    @triton.jit
    def _freq_sum_kernel(logits_ptr, psum_ptr, best_ptr, table_ptr, fsum_ptr, vocab,
                         n_blocks, table_last, budget, SHIFT: tl.constexpr,
                         BV: tl.constexpr, NB: tl.constexpr):
        b, blk = tl.program_id(0), tl.program_id(1)
        f, _ = _block_freqs(logits_ptr, psum_ptr, best_ptr, table_ptr, b, blk, vocab,
                            n_blocks, table_last, budget, SHIFT, BV, NB)
        tl.store(fsum_ptr + b * n_blocks + blk, tl.sum(f, axis=0))

    @triton.jit
    def _row_blocks(best_ptr, arg_ptr, fsum_ptr, b, n_blocks, TOTAL: tl.constexpr,
                    NB: tl.constexpr):
        """Per row: each block's frequency sum, the argmax's block credited with what the
        floors leave (the remainder), the remainder, and the argmax (the first of equal
        maxima, as torch.argmax)."""
        parts = tl.arange(0, NB)
        in_range = parts < n_blocks
        best = tl.load(best_ptr + b * n_blocks + parts, mask=in_range, other=-(1 << 62))
        first = tl.min(tl.where(best == tl.max(best, axis=0), parts, NB), axis=0)
        top_arg = tl.load(arg_ptr + b * n_blocks + first)
        sums = tl.load(fsum_ptr + b * n_blocks + parts, mask=in_range, other=0)
        remainder = (TOTAL - 2) - tl.sum(sums, axis=0)
        sums = tl.where(parts == first, sums + remainder, sums)
        return parts, in_range, sums, remainder, top_arg

    @triton.jit
    def _block_cdf(logits_ptr, psum_ptr, best_ptr, table_ptr, b, blk, vocab, n_blocks,
                   table_last, budget, parts, sums, remainder, top_arg, SHIFT: tl.constexpr,
                   BV: tl.constexpr, NB: tl.constexpr):
        """One block's frequencies (the argmax's with the remainder) and the cumulative
        frequency after each of its tokens (the leading dummy's 1 and the blocks before)."""
        f, cols = _block_freqs(logits_ptr, psum_ptr, best_ptr, table_ptr, b, blk, vocab,
                               n_blocks, table_last, budget, SHIFT, BV, NB)
        f = tl.where(cols == top_arg, f + remainder, f)
        base = 1 + tl.sum(tl.where(parts < blk, sums, 0), axis=0)
        return f, cols, base + tl.cumsum(f, axis=0)

    @triton.jit
    def _find_kernel(logits_ptr, psum_ptr, best_ptr, arg_ptr, table_ptr, fsum_ptr,
                     quantile_ptr, out_ptr, vocab, n_blocks, table_last, budget,
                     TOTAL: tl.constexpr, SHIFT: tl.constexpr, BV: tl.constexpr,
                     NB: tl.constexpr):
        b = tl.program_id(0)
        parts, in_range, sums, remainder, top_arg = _row_blocks(best_ptr, arg_ptr, fsum_ptr, b,
                                                                n_blocks, TOTAL, NB)
        ends = 1 + tl.cumsum(sums, axis=0)  # cumulative frequency after each block
        q = tl.load(quantile_ptr + b)
        blk = tl.minimum(tl.sum((in_range & (ends <= q)).to(tl.int32), axis=0), n_blocks - 1)
        f, cols, cum = _block_cdf(logits_ptr, psum_ptr, best_ptr, table_ptr, b, blk, vocab,
                                  n_blocks, table_last, budget, parts, sums, remainder, top_arg,
                                  SHIFT, BV, NB)  # cum: the cdf at symbols cols + 1
        j = tl.sum(((cum <= q) & (cols < vocab)).to(tl.int32), axis=0)  # tokens before it
        pick = tl.arange(0, BV) == j
        freq = tl.sum(tl.where(pick, f, 0), axis=0)
        upto = tl.sum(tl.where(pick, cum, 0), axis=0)
        symbol = 1 + blk * BV + j
        # quantile below the leading dummy's 1, or at/after the last token: the dummies
        low, high = q < 1, symbol > vocab
        freq = tl.where(low | high, 1, freq)
        start = tl.where(low, 0, tl.where(high, TOTAL - 1, upto - freq))
        symbol = tl.where(low, 0, tl.where(high, vocab + 1, symbol))
        tl.store(out_ptr + b * 3, symbol)
        tl.store(out_ptr + b * 3 + 1, start)
        tl.store(out_ptr + b * 3 + 2, freq)

    @triton.jit
    def _interval_kernel(logits_ptr, psum_ptr, best_ptr, arg_ptr, table_ptr, fsum_ptr,
                         token_ptr, out_ptr, vocab, n_blocks, table_last, budget,
                         TOTAL: tl.constexpr, SHIFT: tl.constexpr, BV: tl.constexpr,
                         NB: tl.constexpr):
        """The encoder's side of _find_kernel: the (start, freq) of a known token."""
        b = tl.program_id(0)
        parts, in_range, sums, remainder, top_arg = _row_blocks(best_ptr, arg_ptr, fsum_ptr, b,
                                                                n_blocks, TOTAL, NB)
        t = tl.load(token_ptr + b)
        blk = t // BV
        f, cols, cum = _block_cdf(logits_ptr, psum_ptr, best_ptr, table_ptr, b, blk, vocab,
                                  n_blocks, table_last, budget, parts, sums, remainder, top_arg,
                                  SHIFT, BV, NB)
        pick = cols == t
        freq = tl.sum(tl.where(pick, f, 0), axis=0)
        tl.store(out_ptr + b * 2, tl.sum(tl.where(pick, cum, 0), axis=0) - freq)
        tl.store(out_ptr + b * 2 + 1, freq)

    # -- a decode step's queries, and its keys and values written into the cache ------------
    @triton.jit
    def _rope_heads_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, n_heads,
                           n_kv, capacity, limit, ROPE_SHIFT: tl.constexpr,
                           V_SHIFT: tl.constexpr, D: tl.constexpr):
        """model._heads for one token per stream, without q_norm/k_norm: head j of stream b
        rotated (queries and keys) or shifted (values) into Q12, queries into q, keys and
        values into the cache at the stream's position."""
        b, j = tl.program_id(0), tl.program_id(1)
        width = (n_heads + 2 * n_kv) * D
        d = tl.arange(0, D)
        row = qkv_ptr + b.to(tl.int64) * width + j * D
        x = tl.load(row + d)
        p = tl.load(pos_ptr + b)
        slot = ((b * n_kv).to(tl.int64) * capacity + p) * D  # + head * capacity * D
        if j < n_heads + n_kv:
            x = tl.minimum(tl.maximum(x, -(1 << 40)), 1 << 40)
            swapped = tl.load(row + (d + D // 2) % D)
            swapped = tl.minimum(tl.maximum(swapped, -(1 << 40)), 1 << 40)
            cos = tl.load(cos_ptr + p * D + d)
            sin = tl.load(sin_ptr + p * D + d)
            out = (x * cos + swapped * sin + (1 << (ROPE_SHIFT - 1))) >> ROPE_SHIFT
            out = tl.minimum(tl.maximum(out, -limit), limit)
            if j < n_heads:
                tl.store(q_ptr + (b * n_heads + j).to(tl.int64) * D + d, out)
            else:
                kv = (j - n_heads).to(tl.int64)
                tl.store(k_ptr + slot + kv * capacity * D + d,
                         out.to(k_ptr.dtype.element_ty))
        else:
            out = (x + (1 << (V_SHIFT - 1))) >> V_SHIFT
            out = tl.minimum(tl.maximum(out, -limit), limit)
            kv = (j - n_heads - n_kv).to(tl.int64)
            tl.store(v_ptr + slot + kv * capacity * D + d, out.to(v_ptr.dtype.element_ty))


VOCAB_BLOCK = 4096  # tokens per program in the distribution's passes


def _distribution(logits: torch.Tensor, table: torch.Tensor, shift: int, total: int):
    """The three passes over blocks of the vocabulary that locate and intervals share: each
    row's block maxima (and where), weight sums and frequency sums."""
    b, vocab = logits.shape
    n_blocks = triton.cdiv(vocab, VOCAB_BLOCK)
    nb = triton.next_power_of_2(n_blocks)
    dev = logits.device
    best = torch.empty((b, n_blocks), dtype=torch.int64, device=dev)
    arg = torch.empty((b, n_blocks), dtype=torch.int64, device=dev)
    psum = torch.empty((b, n_blocks), dtype=torch.int64, device=dev)
    fsum = torch.empty((b, n_blocks), dtype=torch.int64, device=dev)
    last, budget = table.shape[0] - 1, total - (vocab + 2)
    grid = (b, n_blocks)
    _max_kernel[grid](logits, best, arg, vocab, n_blocks, BV=VOCAB_BLOCK, num_warps=4)
    _weight_sum_kernel[grid](logits, best, table, psum, vocab, n_blocks, last, SHIFT=shift,
                             BV=VOCAB_BLOCK, NB=nb, num_warps=4)
    _freq_sum_kernel[grid](logits, psum, best, table, fsum, vocab, n_blocks, last, budget,
                           SHIFT=shift, BV=VOCAB_BLOCK, NB=nb, num_warps=4)
    return dict(psum_ptr=psum, best_ptr=best, arg_ptr=arg, table_ptr=table, fsum_ptr=fsum,
                vocab=vocab, n_blocks=n_blocks, table_last=last, budget=budget, TOTAL=total,
                SHIFT=shift, BV=VOCAB_BLOCK, NB=nb)


def locate(logits: torch.Tensor, quantile: torch.Tensor, table: torch.Tensor, shift: int,
           total: int) -> torch.Tensor:
    """(symbol, start, freq) [B, 3] (int64) of the quantile [B] under model.pmf's frequencies
    of the Q16 logits [B, V] (weights from the int64 exp ``table`` at distance >> shift): the
    symbol VectorRansDecoder's search finds in the cumulative table, without building it."""
    logits = logits.contiguous()
    out = torch.empty((logits.shape[0], 3), dtype=torch.int64, device=logits.device)
    _find_kernel[(logits.shape[0],)](logits, quantile_ptr=quantile.contiguous(), out_ptr=out,
                                     num_warps=8, **_distribution(logits, table, shift, total))
    return out


def intervals(logits: torch.Tensor, tokens: torch.Tensor, table: torch.Tensor, shift: int,
              total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, freq) [B] each of tokens [B] under model.pmf's frequencies of the Q16 logits
    [B, V], as model.IntModel.intervals computes them from the full table (the encoder's
    side of ``locate``)."""
    logits = logits.contiguous()
    out = torch.empty((logits.shape[0], 2), dtype=torch.int64, device=logits.device)
    _interval_kernel[(logits.shape[0],)](logits, token_ptr=tokens.contiguous(), out_ptr=out,
                                         num_warps=8,
                                         **_distribution(logits, table, shift, total))
    return out[:, 0], out[:, 1]


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
    bm, bn, bk = _linear_tiles(m, n)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _linear_kernel[grid](hi.contiguous(), lo.contiguous(), k.reshape(-1).contiguous(), w,
                         scale, bias if bias is not None else scale, out, m, n, kdim,
                         HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, num_warps=4,
                         num_stages=3)
    return out


def rope_heads(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, n_heads: int, limit: int,
               rope_shift: int, v_shift: int) -> torch.Tensor:
    """One decode step's qkv rows [B, (H + 2 Hkv) d] as model._heads makes them (for models
    without q/k norms): returns the queries, int64 [B, Hkv, H / Hkv, 1, d]; the keys and values
    go straight into the cache [B, Hkv, capacity, d] at slots pos [B]."""
    b, n_kv, capacity, d = keys.shape
    q = torch.empty((b, n_kv, n_heads // n_kv, 1, d), dtype=torch.int64, device=qkv.device)
    _rope_heads_kernel[(b, n_heads + 2 * n_kv)](
        qkv.contiguous(), pos.contiguous(), cos, sin, q, keys, values, n_heads, n_kv, capacity,
        limit, ROPE_SHIFT=rope_shift, V_SHIFT=v_shift, D=d, num_warps=1)
    return q


def _linear_tiles(m: int, n: int) -> tuple[int, int, int]:
    """Tile sizes (rows, columns, depth), from a sweep on the H200 with SmolLM2's shapes. Few
    rows make a GEMV bound by reading the weights: narrow column tiles give every SM some,
    except for the 49k-wide head (qkv projection at one row: 3.6 us instead of 8.6 with 128
    columns). At 1,024 rows 64 x 64 x 64 tiles took half the time of torch._int_mm plus the
    compiled rescaling (head: 394 us against 729)."""
    if m <= 64:
        wide = n > 8192
        return (16 if m <= 16 else 64), (128 if wide and m <= 16 else 64 if wide else 32), 128
    return 64, 64, 64
