"""Fused GPU kernels of the engine (Triton), computing the same integers as model.py's torch code.

``int8_linear`` (each GEMM with its rescaling), ``locate`` (the next-token distribution and the
rANS symbol search without the [B, V] table), ``decode_step`` (that search with the rANS
decoder's step and the decode loop's bookkeeping), ``intervals`` (the encoder's side) and
``embed_rows`` (the token embedding). The rotation and attention kernels are in
cuda_attention.py, the row passes before each GEMM in cuda_rows.py.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..core.decoders import VectorRansDecoder

try:  # Triton ships with CUDA builds of torch; CPU machines never reach this module's kernels.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
try:  # programmatic dependent launch, from Triton 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None


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
    def _rescale(acc, shift, scale):
        """model.linear's rescaling of acc = 2 q.w (int64; hi.w 256 + lo.w 2 for the int8
        halves): round(acc * scale * 2**shift), the same two IEEE products and rounding.
        acc is an integer far below 2**53, exact in float64; 2**shift is built exactly."""
        pow2 = ((shift + 1023) << 52).to(tl.float64, bitcast=True)
        return _round_half_even((acc.to(tl.float64) * scale) * pow2)

    @triton.jit
    def _await_inputs(PDL: tl.constexpr):
        """Programmatic dependent launch (PDL): wait until the previous kernel has finished and
        its writes are visible, then let the stream's next kernel launch, so that its programs
        are resident (and have loaded their constants) when this one ends. A kernel reads and
        writes the step's tensors only after the wait; transitively, every earlier kernel has
        finished too. Launching the next one only after the wait keeps one kernel ahead, not
        a chain of them holding the multiprocessors."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _rows_tile(hi_ptr, lo_ptr, rm, kk, row_ok, K):
        at = rm[:, None].to(tl.int64) * K + kk[None, :]
        ok = row_ok[:, None] & (kk < K)[None, :]
        return tl.load(hi_ptr + at, mask=ok, other=0), tl.load(lo_ptr + at, mask=ok, other=0)

    @triton.jit
    def _weights_tile(w_ptr, rn, kk, col_ok, K):
        at = rn[None, :].to(tl.int64) * K + kk[:, None]
        return tl.load(w_ptr + at, mask=col_ok[None, :] & (kk < K)[:, None], other=0)

    @triton.jit
    def _linear_kernel(hi_ptr, lo_ptr, k_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
                       HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, N_FAST: tl.constexpr, PDL: tl.constexpr):
        if N_FAST:  # consecutive programs share their rows (see int8_linear)
            pid_m, pid_n = tl.program_id(1), tl.program_id(0)
        else:
            pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        row_ok, col_ok = rm < M, rn < N
        # The weights are constants: their first tile loads while the last kernel ends. (No
        # engine kernel writes weights; torch's kernels, which might, never let their
        # dependents launch before they finish.)
        if PDL:
            wa = _weights_tile(w_ptr, rn, rk, col_ok, K)
            _await_inputs(PDL)
            hi, lo = _rows_tile(hi_ptr, lo_ptr, rm, rk, row_ok, K)
            ha = tl.dot(hi, wa, out_dtype=tl.int32)  # hi.A
            la = tl.dot(lo, wa, out_dtype=tl.int32)  # lo.A
            first = BK
        else:
            ha = tl.zeros([BM, BN], tl.int32)
            la = tl.zeros([BM, BN], tl.int32)
            first = 0
        for k0 in range(first, K, BK):
            hi, lo = _rows_tile(hi_ptr, lo_ptr, rm, k0 + rk, row_ok, K)
            wa = _weights_tile(w_ptr, rn, k0 + rk, col_ok, K)
            ha += tl.dot(hi, wa, out_dtype=tl.int32)
            la += tl.dot(lo, wa, out_dtype=tl.int32)
        shift = tl.load(k_ptr + rm, mask=row_ok, other=0)
        scale = tl.load(scale_ptr + rn, mask=col_ok, other=0.0)
        out = _rescale(ha.to(tl.int64) * 256 + la.to(tl.int64) * 2, shift[:, None],
                       scale[None, :])
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=col_ok, other=0)[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


    # -- the next-token distribution and the decoder's symbol search, without the table -----
    # model.pmf's integers (freq = floor((total + p budget) / total), the argmax gets what the
    # floors leave, a dummy 1 at either end) and VectorRansDecoder's search (the first symbol
    # whose cumulative frequency exceeds the quantile), in four passes over blocks of the
    # vocabulary: the logits' maximum; the weights' sum; the frequencies' block sums; per
    # stream, the block holding the quantile and the symbol inside it.
    @triton.jit
    def _weights(logits_ptr, row, cols, valid, top, table_ptr, table_last, SHIFT: tl.constexpr):
        """The exp table's weight of each logit at its distance from the maximum."""
        x = tl.load(logits_ptr + row + cols, mask=valid, other=0).to(tl.int64)
        idx = tl.minimum((top + (1 << (SHIFT - 1)) - x) >> SHIFT, table_last)
        return tl.load(table_ptr + idx, mask=valid, other=0)

    @triton.jit
    def _max_kernel(logits_ptr, best_ptr, arg_ptr, vocab, n_blocks, BV: tl.constexpr,
                    PDL: tl.constexpr):
        _await_inputs(PDL)
        b, blk = tl.program_id(0), tl.program_id(1)
        cols = blk * BV + tl.arange(0, BV)
        valid = cols < vocab
        x = tl.load(logits_ptr + b.to(tl.int64) * vocab + cols, mask=valid, other=0)
        x = tl.where(valid, x.to(tl.int64), -(1 << 62))
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
                           NB: tl.constexpr, PDL: tl.constexpr):
        _await_inputs(PDL)
        b, blk = tl.program_id(0), tl.program_id(1)
        top = _top(best_ptr, b, n_blocks, NB)
        cols = blk * BV + tl.arange(0, BV)
        p = _weights(logits_ptr, b.to(tl.int64) * vocab, cols, cols < vocab, top, table_ptr,
                     table_last, SHIFT)
        tl.store(psum_ptr + b * n_blocks + blk, tl.sum(p, axis=0))

    @triton.jit
    def _freq_plus_one(p, total, budget):
        """floor((total + p budget) / total) = floor(p budget / total) + 1, model.pmf's
        frequency of a token of weight p, without an int64 division per token (a software
        routine of ~100 instructions on GPUs: _freq_sum_kernel took 5.9 ms of a 72 ms encode
        on the H200, mostly in it).

        Bounds: 0 <= p <= 2**30 (the Q30 exp table's entries); total, the row's sum of p,
        holds the maximum's 2**30 and at most vocab of them: 2**30 <= total < 2**54 for
        vocabularies below 2**24 - 2 (then 0 < budget = 2**24 - vocab - 2 < 2**24; Gemma-3's
        262,144 gives total <= 2**48). So y = p budget / total has 0 <= y <= budget < 2**24,
        and p budget < 2**54. The estimate e = p * fl(budget / fl(total)) carries three
        relative roundings of at most 2**-53 each (a quotient a few ulps off would do too):
        |e - y| <= 2**24 * 3.01 * 2**-53 < 2**-27, so q0 = floor(e) (a truncation: e >= 0)
        is floor(y) or one off either way (off below where y is an integer, as when k tied
        maxima share a budget that k divides). r = p budget - q0 total is exact in int64
        (|r| <= p budget + total < 2**55): r < 0 means q0 is one above, r >= total one below.
        So the same integers as torch's division for every p, total and budget in range.
        """
        p32 = p.to(tl.int32)  # p <= 2**30; q0 < 2**25: int32, widening multiplies below
        q0 = (p32.to(tl.float64) * (budget / total.to(tl.float64))).to(tl.int32)
        r = p32.to(tl.int64) * budget - q0.to(tl.int64) * total
        return q0.to(tl.int64) + 1 - (r < 0).to(tl.int64) + (r >= total).to(tl.int64)

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
        return tl.where(valid, _freq_plus_one(p, total, budget), 0), cols

    @triton.jit
    def _freq_sum_kernel(logits_ptr, psum_ptr, best_ptr, table_ptr, fsum_ptr, vocab,
                         n_blocks, table_last, budget, SHIFT: tl.constexpr,
                         BV: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr):
        _await_inputs(PDL)
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
    def _find(logits_ptr, psum_ptr, best_ptr, arg_ptr, table_ptr, fsum_ptr, b, q, vocab,
              n_blocks, table_last, budget, TOTAL: tl.constexpr, SHIFT: tl.constexpr,
              BV: tl.constexpr, NB: tl.constexpr):
        """(symbol, start, freq) of the interval of row b's distribution that holds the
        quantile q: locate_in_pmf's search over the table it does not build."""
        parts, in_range, sums, remainder, top_arg = _row_blocks(best_ptr, arg_ptr, fsum_ptr, b,
                                                                n_blocks, TOTAL, NB)
        ends = 1 + tl.cumsum(sums, axis=0)  # cumulative frequency after each block
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
        return symbol, start, freq

    @triton.jit
    def _find_kernel(logits_ptr, psum_ptr, best_ptr, arg_ptr, table_ptr, fsum_ptr,
                     quantile_ptr, out_ptr, vocab, n_blocks, table_last, budget,
                     TOTAL: tl.constexpr, SHIFT: tl.constexpr, BV: tl.constexpr,
                     NB: tl.constexpr, PDL: tl.constexpr):
        _await_inputs(PDL)
        b = tl.program_id(0)
        symbol, start, freq = _find(logits_ptr, psum_ptr, best_ptr, arg_ptr, table_ptr,
                                    fsum_ptr, b, tl.load(quantile_ptr + b), vocab, n_blocks,
                                    table_last, budget, TOTAL, SHIFT, BV, NB)
        tl.store(out_ptr + b * 3, symbol)
        tl.store(out_ptr + b * 3 + 1, start)
        tl.store(out_ptr + b * 3 + 2, freq)

    @triton.jit
    def _decode_step_kernel(logits_ptr, psum_ptr, best_ptr, arg_ptr, table_ptr, fsum_ptr,
                            state_ptr, left_ptr, words_ptr, bad_ptr, step_ptr, lengths_ptr,
                            tokens_ptr, pos_ptr, out_ptr, rows_ptr, words_stride, out_stride,
                            rows_stride, capacity, vocab, n_blocks, table_last, budget,
                            TOTAL: tl.constexpr, PRECISION: tl.constexpr,
                            SHIFT: tl.constexpr, BV: tl.constexpr, NB: tl.constexpr,
                            PDL: tl.constexpr):
        """A decode step's tail for stream b: _find_kernel's search at the stream's quantile,
        then VectorRansDecoder.advance and the codec's bookkeeping (decode_step says which).

        The rANS state is the unsigned 64-bit state's int64 bit pattern, as in the decoder:
        int64 products, sums and left shifts wrap mod 2**64 as torch's do, and the right
        shifts are masked (>> 24 & 2**40 - 1) or compared with 0 (the high word is 0 exactly
        when x >> 32, arithmetic or logical, is 0), so they read as logical shifts."""
        _await_inputs(PDL)
        b = tl.program_id(0)
        state = tl.load(state_ptr + b)
        q = state & (TOTAL - 1)
        symbol, start, freq = _find(logits_ptr, psum_ptr, best_ptr, arg_ptr, table_ptr,
                                    fsum_ptr, b, q, vocab, n_blocks, table_last, budget, TOTAL,
                                    SHIFT, BV, NB)
        step = tl.load(step_ptr + b)
        active = step < tl.load(lengths_ptr + b)
        x = freq * ((state >> PRECISION) & ((1 << (64 - PRECISION)) - 1)) + q - start
        left = tl.load(left_ptr + b)
        refill = active & ((x >> 32) == 0) & (left > 0)
        word = tl.load(words_ptr + b.to(tl.int64) * words_stride + tl.maximum(left - 1, 0))
        x = tl.where(refill, (x << 32) | word, x)
        tl.store(left_ptr + b, left - refill.to(tl.int64))
        tl.store(state_ptr + b, tl.where(active, x, state))
        # symbols 0 and vocab + 1 are the dummies (decoders._reserved): a corrupt stream
        reserved = (symbol <= 0) | (symbol >= vocab + 1)
        tl.store(bad_ptr + b, tl.load(bad_ptr + b) | (active & reserved).to(tl.uint8))
        token = tl.minimum(tl.maximum(symbol - 1, 0), vocab - 1)
        token = tl.where(active, token, tl.load(tokens_ptr + b))
        tl.store(tokens_ptr + b, token)
        inside = step < capacity  # (the codec never steps past its buffers)
        tl.store(out_ptr + b.to(tl.int64) * out_stride + step, token, mask=inside)
        row = rows_ptr + b.to(tl.int64) * rows_stride + 2 * step
        tl.store(row, start, mask=inside)
        tl.store(row + 1, freq, mask=inside)
        tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)
        tl.store(step_ptr + b, step + 1)

    @triton.jit
    def _interval_kernel(logits_ptr, psum_ptr, best_ptr, arg_ptr, table_ptr, fsum_ptr,
                         token_ptr, out_ptr, vocab, n_blocks, table_last, budget,
                         TOTAL: tl.constexpr, SHIFT: tl.constexpr, BV: tl.constexpr,
                         NB: tl.constexpr, PDL: tl.constexpr):
        """The encoder's side of _find_kernel: the (start, freq) of a known token."""
        _await_inputs(PDL)
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

    # -- the token embedding ----------------------------------------------------------------
    @triton.jit
    def _embed_kernel(ids_ptr, table_ptr, mant_ptr, exp_ptr, out_ptr, vocab, hidden,
                      FRAC: tl.constexpr, BH: tl.constexpr, PDL: tl.constexpr):
        """model.IntModel.embed for one token and BH columns: the int16 row times the token's
        mantissa, rounded by intops.rshift_round at its shift exp - FRAC. The same int64
        operations as the torch code (product, clamps, shifts, the select), so the same
        integers, wraparound included, for every table and id in range (where torch raises
        on an id out of range, this gives a row of zeros and reads nothing past the table)."""
        _await_inputs(PDL)
        n, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = blk * BH + tl.arange(0, BH)
        valid = cols < hidden
        t = tl.load(ids_ptr + n)
        known = (t >= 0) & (t < vocab)
        t = tl.where(known, t, 0)
        x = tl.load(table_ptr + t * hidden + cols, mask=valid, other=0).to(tl.int64)
        e = x * tl.load(mant_ptr + t)
        shift = tl.load(exp_ptr + t) - FRAC
        right = tl.minimum(tl.maximum(shift, 1), 62)
        left = tl.minimum(tl.maximum(-shift, 0), 62)
        out = tl.where(shift > 0, (e + (1 << (right - 1))) >> right, e << left)
        out = tl.where(known, out, 0)
        tl.store(out_ptr + n * hidden + cols, out, mask=valid)


PDL = True  # programmatic dependent launch (_await_inputs) on GPUs that have it
# ... for kernels of up to this many rows (streams, or tokens of a prefill). Whole 256-token
# decodes on the H200 (SmolLM2's shapes, CUDA graphs), ms/step at positions <32 / 32-96 /
# 96-160 / 160-256 with PDL against without: 1 stream 1.01 / 1.09 / 1.19 / 1.25 against
# 1.23 / 1.31 / 1.37 / 1.43; 16 streams 1.32-1.48 against 1.42-1.51; 1,024 streams 3-6%
# slower (the waiting programs hold multiprocessors that a full grid would use).
PDL_MAX_ROWS = 16


def launch_options(device: torch.device, rows: int) -> dict:
    """The PDL constexpr and launch flag of an engine kernel over ``rows`` rows on
    ``device``: on up to PDL_MAX_ROWS rows from compute capability 9.0 (Hopper), where
    griddepcontrol exists."""
    on = (PDL and rows <= PDL_MAX_ROWS and device.type == "cuda"
          and _has_pdl(_device_index(device)))
    return {"PDL": on, "launch_pdl": on}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _has_pdl(index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(index) >= (9, 0)


VOCAB_BLOCK = 4096  # tokens per program in the distribution's passes


def _distribution(logits: torch.Tensor, table: torch.Tensor, shift: int, total: int):
    """The three passes over blocks of the vocabulary that locate and intervals share: each
    row's block maxima (and where), weight sums and frequency sums. Returns the last kernel's
    arguments (its launch options included)."""
    b, vocab = logits.shape
    n_blocks = triton.cdiv(vocab, VOCAB_BLOCK)
    nb = triton.next_power_of_2(n_blocks)
    dev = logits.device
    best = torch.empty((b, n_blocks), dtype=torch.int64, device=dev)
    arg = torch.empty((b, n_blocks), dtype=torch.int64, device=dev)
    psum = torch.empty((b, n_blocks), dtype=torch.int64, device=dev)
    fsum = torch.empty((b, n_blocks), dtype=torch.int64, device=dev)
    last, budget = table.shape[0] - 1, total - (vocab + 2)
    grid, launch = (b, n_blocks), launch_options(dev, b)
    _max_kernel[grid](logits, best, arg, vocab, n_blocks, BV=VOCAB_BLOCK, num_warps=4, **launch)
    _weight_sum_kernel[grid](logits, best, table, psum, vocab, n_blocks, last, SHIFT=shift,
                             BV=VOCAB_BLOCK, NB=nb, num_warps=4, **launch)
    _freq_sum_kernel[grid](logits, psum, best, table, fsum, vocab, n_blocks, last, budget,
                           SHIFT=shift, BV=VOCAB_BLOCK, NB=nb, num_warps=4, **launch)
    return dict(psum_ptr=psum, best_ptr=best, arg_ptr=arg, table_ptr=table, fsum_ptr=fsum,
                vocab=vocab, n_blocks=n_blocks, table_last=last, budget=budget, TOTAL=total,
                SHIFT=shift, BV=VOCAB_BLOCK, NB=nb, **launch)


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


def decode_step(logits: torch.Tensor, table: torch.Tensor, shift: int, total: int,
                decoder: VectorRansDecoder, step: torch.Tensor, lengths: torch.Tensor,
                tokens: torch.Tensor, pos: torch.Tensor, out: torch.Tensor,
                rows: torch.Tensor) -> None:
    """The rest of a decode step after its logits [B, V], in place: what
    codec.advance_streams does with ``locate``'s rows, in locate's four kernels (the last, one
    program per stream, also steps the stream). Stream b at its step s = step[b] takes the
    symbol at ``decoder``'s quantile and advances as VectorRansDecoder.advance (state, words
    left, ``bad``); tokens[b] becomes the decoded token if s < lengths[b] (else stays);
    out[b, s] = tokens[b], rows[b, s] = (start, freq); pos[b] and step[b] go up by one. The
    counter is per stream (int64 [B]) so that no program reads one that another advances.

    In a CUDA graph this replaces 37 small kernels (torch ops of the quantile, the decoder's
    advance and the bookkeeping): the same integers (tests/test_cuda_ops.py)."""
    precision = total.bit_length() - 1
    if total != 1 << precision or not 0 < precision < 32:
        raise ValueError(f"the rANS decoder's total must be a power of two, not {total}")
    logits = logits.contiguous()
    for t in (decoder.state, decoder.left, decoder.bad, step, lengths, tokens, pos):
        if not t.is_contiguous():
            raise ValueError("decode_step updates its per-stream tensors in place: contiguous")
    if decoder.words.stride(1) != 1 or out.stride(1) != 1 or rows.stride(1) != 2 or \
            rows.stride(2) != 1:
        raise ValueError("decode_step's words, out and rows need contiguous rows")
    _decode_step_kernel[(logits.shape[0],)](
        logits, state_ptr=decoder.state, left_ptr=decoder.left, words_ptr=decoder.words,
        bad_ptr=decoder.bad.view(torch.uint8), step_ptr=step, lengths_ptr=lengths,
        tokens_ptr=tokens, pos_ptr=pos, out_ptr=out, rows_ptr=rows,
        words_stride=decoder.words.stride(0), out_stride=out.stride(0),
        rows_stride=rows.stride(0), capacity=min(out.shape[1], rows.shape[1]),
        PRECISION=precision, num_warps=8,
        **_distribution(logits, table, shift, total))


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


def embed_rows(ids: torch.Tensor, table: torch.Tensor, mant: torch.Tensor, exp: torch.Tensor,
               frac: int) -> torch.Tensor:
    """model.IntModel.embed in one kernel: Q(frac) int64 rows [*ids.shape, hidden] of token
    ids (int64, each in [0, vocab)) from the int16 table [vocab, hidden] and the per-token
    mantissas and exponents (int64 [vocab]), where torch's gather, multiply and rounding
    shift took ~17 small kernels."""
    hidden = table.shape[1]
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((flat.shape[0], hidden), dtype=torch.int64, device=ids.device)
    bh = min(1024, triton.next_power_of_2(hidden))
    if flat.shape[0]:
        _embed_kernel[(flat.shape[0], triton.cdiv(hidden, bh))](
            flat, table.contiguous(), mant.contiguous(), exp.contiguous(), out, table.shape[0],
            hidden,
            FRAC=frac, BH=bh, num_warps=max(1, min(4, bh // 256)),
            **launch_options(ids.device, flat.shape[0]))
    return out.reshape(*ids.shape, hidden)


def int8_linear(hi: torch.Tensor, lo: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """model.linear's product and rescaling in one kernel: rows q = 128 hi + lo (int8 halves,
    [M, K]) at scale 2**k ([M] or [M, 1]) times w (int8 [N, K]), rounded to Q16 [M, N] plus
    ``bias``. The two int8 products (hi.w, lo.w) share one pass over the weights and never
    leave the chip. ``out_dtype`` int32 stores the low 32 bits: for callers that have proved
    every output fits (model.head_bound).
    """
    m, kdim = hi.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=hi.device)
    bm, bn, bk, warps = _linear_tiles(m, n, kdim, _shared_memory(hi.device))
    n_fast = m > LINEAR_N_FAST_ROWS
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _linear_kernel[grid[::-1] if n_fast else grid](
        hi.contiguous(), lo.contiguous(), k.reshape(-1).contiguous(), w, scale,
        bias if bias is not None else scale, out, m, n, kdim, HAS_BIAS=bias is not None, BM=bm,
        BN=bn, BK=bk, N_FAST=n_fast, num_warps=warps, num_stages=LINEAR_STAGES,
        **launch_options(hi.device, m))
    return out


# Above this many rows a GEMM's programs run columns first: the programs resident at once then
# share their rows, each row block read once, not once per column block, when the rows are
# larger than the L2 cache (the encoder's 65,536 rows: 75 MB of int8 halves).
LINEAR_N_FAST_ROWS = 4096


LINEAR_STAGES = 3  # the GEMM's pipelined loads: each stage holds a tile of rows and weights
SHARED_MARGIN = 16 << 10  # what a program needs besides its stages (layout conversions)


def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a program may use on this GPU (the figure Triton checks its
    kernels against)."""
    return _device_shared_memory(_device_index(device))


@functools.cache
def _device_shared_memory(index: int) -> int:  # a driver query: once per GPU, not per GEMM
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _stages_bytes(bm: int, bn: int, bk: int) -> int:
    """Shared memory of the GEMM's pipelined loads: int8 halves [bm, bk] twice, weights
    [bk, bn], LINEAR_STAGES times."""
    return LINEAR_STAGES * (2 * bm * bk + bk * bn)


def _linear_tiles(m: int, n: int, k: int, shared: int) -> tuple[int, int, int, int]:
    """Tile sizes (rows, columns, depth) and warps, from sweeps on the H200 with SmolLM2's
    shapes. Few rows make a GEMV bound by reading the weights: narrow column tiles give every
    SM some, except for the 49k-wide head (qkv projection at one row: 3.6 us instead of 8.6
    with 128 columns). At one row a depth of 512 (two or three loads of the weights, not five
    or six) took a whole decode step from 1.36-1.53 to 1.28-1.40 ms with 32 columns and 4
    warps, and to 1.28-1.48 with 16 and 2 (the GEMMs 0.46 ms of kernel time a step instead of
    0.54; 128-256 deep, 16-32 columns: the earlier choice, kept for GPUs whose ``shared``
    memory, in bytes, does not hold its 96 KB of stages with room to spare, as an RTX 4090's or
    an L4's does not). At 1,024 rows 64 x 64 x 64 tiles took half the time of torch._int_mm
    plus the compiled rescaling (head: 394 us against 729); at 4,096 and 16,384 rows (the
    encoder's) a depth of 128 took 3-27% less than 64 (the down projection the most)."""
    if m <= 16 and n <= 8192:
        if _stages_bytes(16, 32, 512) + SHARED_MARGIN <= shared:
            return 16, 32, 512, 4
        return 16, (16 if n < 2048 else 32), (256 if k > 1024 else 128), 2
    if m <= 64:
        wide = n > 8192
        return (16 if m <= 16 else 64), (128 if wide and m <= 16 else 64 if wide else 32), 128, 4
    return 64, 64, (128 if m > 1024 else 64), 4
