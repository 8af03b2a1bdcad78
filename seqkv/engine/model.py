"""The integer forward pass: one function of (integer weights, tokens) on every device.

Two drivers share every per-token operation: ``prefill`` runs whole chunks at once (the
encoder: all positions' distributions from one pass), ``step`` advances each stream one
token over a static KV cache (the decoder). The only reductions are integer sums and maxima,
the GEMMs are exact (intops.py) and the nonlinearities are tables (tables.py), so both give
the same integers at every position, at any group size, thread count or device.

Fixed-point formats: the residual stream and GEMM outputs are Q16 int64; queries, keys and
values Q12, bounded so that q.k and p.v sums stay exact in float64, keys and values rounded to
float16's precision (intops.round_kv) so that GPU caches hold them as float16; attention
weights Q16; next-token weights Q30; rotary tables Q14. GEMM inputs are int14 per row (dyadic
scale), weights int8 per output channel (intops.int_matmul).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..core.decoders import locate_in_pmf
from ..core.distribution import TOTAL
from . import cpu_kernels, cuda_attention, cuda_ops, cuda_rows, tables
from .intops import (
    ACT_BITS,
    RowGemm,
    int_matmul,
    isqrt,
    kv_float16,
    kv_float64,
    round_kv,
    rshift_round,
    split_rows,
)
from .weights import FRAC, ArchSpec, IntLayer, IntLinear, IntNorm, IntWeights

if TYPE_CHECKING:
    from ..core.decoders import VectorRansDecoder

QKV_FRAC = 12
MAX_POSITIONS = 8192  # attention sums stay exact in float64 up to this many keys
# Decode groups up to this size attend with cuda_attention's fused kernel over float16 caches,
# larger ones with float64 GEMMs (see new_cache): in practice every group.
FUSED_ATTENTION_MAX_STREAMS = 1 << 16
# A CPU prefill's MLP runs over blocks of rows whose [gate | up] rows take at most this many
# bytes (SmolLM2: 24 KB a row, 682 rows): below glibc's mmap threshold (32 MB), whose larger
# blocks are mapped afresh and faulted in page by page on every call (an 8 x 256-token
# encode on the 2-core EPYC, alternating in one process: 305-316 tokens/s in one block,
# 324-353 in blocks of 256 rows, 335-376 in 512-1,024).
CPU_MLP_BYTES = 16 << 20


def _cached(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values (Q12 integers) rounded to float16's precision, as a cache of ``dtype``
    holds them (float16: x * 2**-KV_EXP; integers and float64: the rounded integers)."""
    return kv_float16(x) if dtype == torch.float16 else round_kv(x).to(dtype)


def linear(v: torch.Tensor, lin: IntLinear) -> torch.Tensor:
    """Q16 [..., in] -> Q16 [..., out]: per-row int14 activations x int8 weights, exactly."""
    shape = v.shape
    rows = v.reshape(-1, shape[-1])
    if v.device.type == "cpu":  # the same integers: one kernel (cpu_kernels) or intops.RowGemm
        y = (cpu_kernels.linear(rows.contiguous(), lin.w, lin.scale, lin.bias)
             if cpu_kernels.available() else RowGemm(rows, lin.w, lin.scale, lin.bias).all())
    else:
        y = split_linear(*split_rows(rows), lin)
    return y.reshape(*shape[:-1], -1)


def split_linear(hi: torch.Tensor, lo: torch.Tensor, k: torch.Tensor,
                 lin: IntLinear) -> torch.Tensor:
    """``linear`` of rows given as split_rows' int8 halves and scales: [M, in] -> Q16 [M, out].

    The rescaling runs in float64 on integers below 2**53 times powers of two: each step is
    exact, and the one rounding (to the nearest integer) is an IEEE-defined operation.
    """
    acc = int_matmul(hi, lo, lin.w.t())
    y = torch.round(acc * lin.scale * torch.ldexp(torch.ones_like(acc[:, :1]), k))
    y = y.to(torch.int64)
    return y + lin.bias if lin.bias is not None else y


def head_bound(norm: IntNorm, head: IntLinear) -> float:
    """An upper bound on |logit| (Q16) of ``linear(rms_norm(h, norm), head)`` over every row h
    (and so on the outputs of any linear that a norm feeds: qkv, gate_up).

    rms_norm's row x has ||x||_2 <= 2 sqrt(n) g + sqrt(n) / 2 (n wide, g its largest |gain|
    in Q16): the rounded rows xs over r = isqrt(floor(|xs|^2 / n) + eps) >= 1 give
    |xs| / r <= 2 sqrt(n) (r >= sqrt(|xs|^2 / n) / 2 where |xs|^2 >= n, |xs| < sqrt(n)
    otherwise), and each rounding adds at most 1/2. Its split q 2**k is within 2**(k-1) <=
    max|x| / 2**ACT_BITS of x in every element. Logit j is 2 scale_j (q 2**k).w_j + bias_j,
    at most 2 scale_j |w_j|_2 |q 2**k|_2 + |bias_j| (Cauchy-Schwarz), plus the final
    rounding. This holds while the norm's products xs gain stay below 2**63 (|xs| <= 2**20):
    gains (in Q16) below 2**40; none otherwise (inf). SmolLM2-135M: 2**26.2."""
    n = head.w.shape[1]
    gain = norm.gain.abs().max().item() * 2.0 ** (FRAC - norm.frac)
    if gain >= 2**40:
        return math.inf
    rows = 2 * math.sqrt(n) * gain + math.sqrt(n) / 2
    rows *= 1 + math.sqrt(n) / 2**ACT_BITS
    cols = (head.w.double().square().sum(dim=1).sqrt() * 2 * head.scale).max().item()
    bias = head.bias.abs().max().item() if head.bias is not None else 0
    return rows * cols * (1 + 2**-40) + 1 + bias


def add_residual(h: torch.Tensor, delta: torch.Tensor | None,
                 post: IntNorm | None) -> torch.Tensor:
    """h + delta, delta first normed by ``post`` where the architecture has one (Gemma-3)."""
    if delta is None:
        return h
    return h + (rms_norm(delta, post) if post is not None else delta)


def residual_norm_split(h: torch.Tensor, delta: torch.Tensor | None, post: IntNorm | None,
                        norm: IntNorm):
    """h' = add_residual(h, delta, post), and rms_norm(h', norm)'s rows as split_rows' halves
    for the next GEMM: the residual add, the norm and the split as one pass when compiled."""
    h = add_residual(h, delta, post)
    return (h, *split_rows(rms_norm(h, norm).reshape(-1, h.shape[-1])))


def rms_norm(h: torch.Tensor, norm: IntNorm) -> torch.Tensor:
    """RMSNorm of Q16 rows, times the gain, in Q16."""
    low, high = torch.aminmax(h, dim=-1, keepdim=True)  # bit_length(max |h|), as below
    top = torch.frexp(torch.maximum(high, low.neg()).to(torch.float64)).exponent
    k = (top - 20).clamp_(min=0).to(torch.int64)
    xs = (h + ((1 << k) >> 1)) >> k  # rshift_round(h, k), k >= 0
    mean = (xs * xs).sum(dim=-1, keepdim=True) // h.shape[-1] + (norm.eps32 >> (2 * k))
    r = isqrt(mean).clamp_(min=1)
    # div_round(xs * gain << s, r) = floor((xs * (gain << s + 1) + r) / 2r), one division
    s = FRAC - norm.frac
    if s >= 0:
        gain2, den = norm.gain << (s + 1), r
    else:
        gain2, den = norm.gain << 1, r << (-s)
    return torch.div((xs * gain2).add_(den), den << 1, rounding_mode="floor")


def _table_lookup(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The factor table (sigmoid or GELU) at Q16 inputs, and x times it, in Q16."""
    n = table.shape[0] // 2
    shift = FRAC - tables.SIGMOID_IN  # rshift_round(x, shift).clamp(-n, n - 1) + n:
    idx = ((x + ((1 << (shift - 1)) + (n << shift))) >> shift).clamp_(0, 2 * n - 1)
    y = x.clamp(-(1 << 40), 1 << 40).mul_(table[idx])
    return y.add_(1 << (tables.SIGMOID_OUT - 1)).bitwise_right_shift_(tables.SIGMOID_OUT)


def gated_activation(table: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of the MLP's [gate | up] rows, in Q16."""
    half = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :half], gate_up[..., half:]
    act = _table_lookup(table, gate).clamp_(-(1 << 30), 1 << 30)
    act = act.mul_(up.clamp(-(1 << 30), 1 << 30))  # then rshift_round(act, FRAC):
    return act.add_(1 << (FRAC - 1)).bitwise_right_shift_(FRAC)


def activation_split(table: torch.Tensor, gate_up: torch.Tensor):
    """split_rows of gated_activation's rows: one pass when compiled."""
    act = gated_activation(table, gate_up)
    return split_rows(act.reshape(-1, act.shape[-1]))


class IntModel:
    """The engine's model on one device: integer weights and their tables."""

    def __init__(self, weights: IntWeights, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.w = weights.to(self.device)
        self.spec = weights.spec
        self.digest = weights.digest
        dev = self.device
        self.exp_attn = torch.from_numpy(tables.exp_table(tables.ATTN_BITS)).to(dev)
        self.exp_prob = torch.from_numpy(tables.exp_table(tables.PROB_BITS)).to(dev)
        act = tables.sigmoid_table() if self.spec.act == "silu" else tables.gelu_tanh_table()
        self.act_table = torch.from_numpy(act).to(dev)
        self.exp_attn_f = self.exp_attn.to(torch.float64)
        # |q|, |k|, |v| below 2**lim: q.k sums (head_dim terms) and p.v sums (Q16 weights,
        # MAX_POSITIONS terms) stay below 2**53, exact in float64; and keys and values,
        # rounded (intops.round_kv), stay within float16's range as caches hold them.
        lim = min((53 - (self.spec.head_dim - 1).bit_length()) // 2,
                  53 - tables.ATTN_BITS - (MAX_POSITIONS - 1).bit_length(), 23)
        self._qkv_limit = (1 << lim) - 1
        # score units (Q20) to table steps (2**-EXP_STEP nat), a float64 constant fixed here
        self._index_scale = self.spec.attn_scale * 2.0 ** (tables.EXP_STEP - 2 * QKV_FRAC)
        self._index_scale_t = torch.tensor([self._index_scale], dtype=torch.float64, device=dev)
        # Decode groups up to this many streams attend through one Triton kernel on CUDA
        # (cuda_attention.py): the same integers as the float64 GEMMs. The per-head kernels span a
        # head's width in one block: power-of-two head widths only (64, 128, ...).
        per_head_kernels = (cuda_ops.available(self.device)
                            and self.spec.head_dim & (self.spec.head_dim - 1) == 0)
        self.fused_attention_streams = FUSED_ATTENTION_MAX_STREAMS if per_head_kernels else 0
        # A prefill's attention as one kernel per layer (cuda_attention.prefill_attention): its
        # scores never leave the chip, where the float64 GEMMs and the softmax's passes wrote
        # and read [B, H, T, T] float64 tensors (13 of 72 ms of the H200's encode profile).
        self.fused_prefill = per_head_kernels and self.spec.head_dim >= 16
        # (positions, {theta: tables}), replaced whole, never changed in place: threads that
        # share the model (a server's readers, compactor and rebalancer) see one or the other.
        # Replaced ones stay alive: decode groups kept with their CUDA graphs (codec.py) read
        # the tables they were captured with by address (each at most half the next one's size).
        self._rope: tuple[int, dict[float, tuple[torch.Tensor, torch.Tensor]]] = (0, {})
        self._rope_past: list[dict[float, tuple[torch.Tensor, torch.Tensor]]] = []
        # Every GEMM runs as one Triton kernel with the rescaling inside (cuda_ops.int8_linear):
        # on the H200 it took half the time of torch._int_mm plus compiled rescaling from 1 to
        # 1,024 rows, and the encoder's prefill ran 15% faster (BENCHMARKS.md).
        self.triton_linear = cuda_ops.available(dev)
        # GPUs split each GEMM's rows into int8 halves in the pass that makes them; CPUs split
        # them inside the GEMM (intops.RowGemm). The same integers either way (tested).
        self.split_before_gemm = dev.type != "cpu"
        self.fused_locate = cuda_ops.available(dev)
        # The head's logits feed the distribution's kernels (cuda_ops.locate, decode_step,
        # intervals), which read int32 where head_bound proves that every logit fits: half
        # the bytes of a step's widest tensor, written once and read three times.
        self.logits_dtype = (torch.int32 if self.fused_locate and
                             head_bound(self.w.final_norm, self.w.head) < 2**31 else torch.int64)
        # Likewise each layer's qkv and gate_up rows, which a norm feeds too (SmolLM2: at most
        # 2**25.1 and 2**26.5), where kernels read them (rotation: fused_heads; activation:
        # row_kernels): half the bytes of the widest GEMM outputs, written and read once (on
        # the H200: a 1,024-stream step 7.05 -> 6.75 ms, the encoder 322k -> 342k tokens/s).
        # The linears (by id) whose outputs provably fit int32, and the flag of their readers
        # (none off the GPU kernels' devices: the bounds take ~0.1 s for SmolLM2).
        self._int32_outputs = {id(lin): reader for norm, lin, reader in (
            *((layer.attn_norm, layer.qkv, "fused_heads") for layer in self.w.layers
              if layer.q_norm is None),  # q/k norms: the torch rotation reads int64
            *((layer.mlp_norm, layer.gate_up, "row_kernels") for layer in self.w.layers))
            if self.triton_linear and head_bound(norm, lin) < 2**31}
        # A decode step's token embedding as one kernel (cuda_ops.embed_rows), not ~17 torch ops
        self.fused_embed = cuda_ops.available(dev)
        # A decode step's rotation writes its keys and values straight into the cache (one
        # kernel instead of the rotation's and two scatters; one stream went from 472 to
        # 530-539 steps/s on the H200, BENCHMARKS.md); models with q/k norms keep the torch
        # composition.
        self.fused_heads = per_head_kernels
        # The residual add, norm and split before each GEMM, and the gated activation and
        # split before the down projection, as one Triton pass per row (cuda_rows.py) instead
        # of inductor's fusions, which ran 3-4x off memory bandwidth: on the H200 the encoder
        # went from 165-175k to 213k tokens/s, a 1,024-stream step from 8.3 to 7.1 ms.
        norms = [self.w.final_norm] + [n for layer in self.w.layers for n in (
            layer.attn_norm, layer.mlp_norm, layer.post_attn_norm, layer.post_mlp_norm) if n]
        self.row_kernels = (cuda_rows.available(dev)
                            and 2 <= self.spec.hidden <= cuda_rows.NORM_MAX_WIDTH
                            and all(cuda_rows.norm_in_range(n) for n in norms))
        # One stream's row pass and the GEMM after it (norm and qkv or gate_up; activation and
        # down) as one kernel (cuda_rows.norm_linear_row, act_linear_row): a one-stream step
        # is bound by its ~300 kernels' launches and first loads, not by their work.
        self.row_linear = self.row_kernels and all(
            cuda_rows.row_linear_fits(n) for n in
            (self.spec.hidden, *(layer.down.w.shape[1] for layer in self.w.layers)))
        self._linear, self._split_linear = linear, split_linear
        self._rms_norm, self._add_residual = rms_norm, add_residual
        self._residual_norm_split, self._activation_split = residual_norm_split, activation_split
        self._gated_activation, self._split_rows = gated_activation, split_rows
        self.compiled = False
        if dev.type == "cpu":  # the same integers through cpu_kernels where they run
            self._rms_norm, self._gated_activation = _cpu_rms_norm, _cpu_gated_activation
            self._heads, self._attend = self._cpu_heads, self._cpu_attend

    def compile(self) -> IntModel:
        """Fuse the elementwise work between the GEMMs (residual adds, norms, the rows' split
        for the next GEMM, rotary embedding, attention and the distribution) with
        torch.compile (inductor), for CUDA devices.

        The integers stay the same: every fused operation is integer arithmetic or an IEEE
        operation on exact float64 integers, and on the H200 the compiled engine gave the
        eager engine's golden frequency hash and decoded every token exactly (BENCHMARKS.md).
        Each new shape compiles once (~20 s at first use); a decode group compiles a span's
        step before capturing it. Elsewhere a no-op: CPUs have their own kernels
        (cpu_kernels.py).
        """
        if not self.compiled and self.device.type == "cuda":
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            fuse = lambda fn: torch.compile(fn, dynamic=False)  # noqa: E731
            # (the unsplit linear, rms_norm and gated_activation are the CPU's composition)
            self._split_linear, self._add_residual = fuse(split_linear), fuse(add_residual)
            self._residual_norm_split = fuse(residual_norm_split)
            self._activation_split, self._split_rows = fuse(activation_split), fuse(split_rows)
            self._freq_plus_one = fuse(self._freq_plus_one)
            self._heads, self._attend, self.pmf = (fuse(self._heads), fuse(self._attend),
                                                  fuse(self.pmf))
            self.compiled = True
        return self

    # -- GEMMs and what surrounds them ------------------------------------------------------
    def _gemm(self, hi: torch.Tensor, lo: torch.Tensor, k: torch.Tensor,
              lin: IntLinear) -> torch.Tensor:
        if self.triton_linear:
            reader = self._int32_outputs.get(id(lin))
            dtype = (self.logits_dtype if lin is self.w.head
                     else torch.int32 if reader and getattr(self, reader) else torch.int64)
            return cuda_ops.int8_linear(hi, lo, k, lin.w, lin.scale, lin.bias, dtype)
        return self._split_linear(hi, lo, k, lin)

    def _one_row(self, rows: torch.Tensor, lin: IntLinear) -> bool:
        """Whether rows (one, here) take a one-row kernel into lin: not the head, whose
        ~400-1,500 programs would each norm the row again."""
        return (self.row_kernels and self.row_linear and rows.numel() == rows.shape[-1]
                and lin is not self.w.head)

    def linear(self, v: torch.Tensor, lin: IntLinear) -> torch.Tensor:
        """``linear`` (Q16 [..., in] -> Q16 [..., out])."""
        if not self.split_before_gemm:
            return self._linear(v, lin)
        shape = v.shape
        return self._gemm(*self._split_rows(v.reshape(-1, shape[-1])), lin).reshape(
            *shape[:-1], -1)

    def norm_linear(self, h: torch.Tensor, delta: torch.Tensor | None, post: IntNorm | None,
                    norm: IntNorm, lin: IntLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """(h', linear(rms_norm(h', norm), lin)) for h' = add_residual(h, delta, post)."""
        if not self.split_before_gemm:
            h = self._add_residual(h, delta, post)
            return h, self._linear(self._rms_norm(h, norm), lin)
        if self._one_row(h, lin):
            h, y = cuda_rows.norm_linear_row(h, delta, post, norm, lin.w, lin.scale, lin.bias)
            return h, y.reshape(*h.shape[:-1], -1)
        h, hi, lo, k = (cuda_rows.norm_split(h, delta, post, norm) if self.row_kernels
                        else self._residual_norm_split(h, delta, post, norm))
        return h, self._gemm(hi, lo, k, lin).reshape(*h.shape[:-1], -1)

    def mlp_down(self, gate_up: torch.Tensor, down: IntLinear) -> torch.Tensor:
        """The down projection of the gated activation of [gate | up]."""
        if not self.split_before_gemm:
            return self._linear(self._gated_activation(self.act_table, gate_up), down)
        if self._one_row(gate_up, down):
            return cuda_rows.act_linear_row(self.act_table, gate_up, down.w, down.scale,
                                            down.bias).reshape(*gate_up.shape[:-1], -1)
        hi, lo, k = (cuda_rows.act_split(self.act_table, gate_up) if self.row_kernels
                     else self._activation_split(self.act_table, gate_up))
        return self._gemm(hi, lo, k, down).reshape(*gate_up.shape[:-1], -1)

    # -- tables ---------------------------------------------------------------------------
    def rope(self, theta: float, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width rotary tables [positions, d] for ``_rotate``: [cos | cos], [-sin | sin]."""
        length, built = self._rope
        if n_positions > length:
            self._rope_past.append(built)
            length, built = max(n_positions, 2 * length, 64), {}
        if theta not in built:
            cos, sin = tables.rope_table(theta, self.spec.head_dim, length)
            cos, sin = torch.from_numpy(cos).to(self.device), torch.from_numpy(sin).to(self.device)
            built = {**built, theta: (torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1))}
            self._rope = (length, built)
        return built[theta]

    def prepare(self, n_positions: int) -> None:
        """Build the rotary tables for n_positions up front (outside any CUDA graph)."""
        for theta in set(self.spec.thetas):
            self.rope(theta, n_positions)

    # -- shared per-token pieces ----------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.w.embed[ids].to(torch.int64) * self.w.embed_mant[ids].unsqueeze(-1)
        return rshift_round(e, (self.w.embed_exp[ids] - FRAC).unsqueeze(-1))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding (rotate-half form) of Q16 [..., T, d] into Q12, with the full-width
        tables of ``rope``: (x1 cos - x2 sin, x2 cos + x1 sin) = x [cos | cos] + [x2 | x1]
        [-sin | sin], the same integers in one pass per product."""
        half = x.shape[-1] // 2
        x = x.clamp(-(1 << 40), 1 << 40)
        swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
        shift = FRAC + tables.ROPE_BITS - QKV_FRAC  # rshift_round(., shift)
        out = (x * cos).addcmul_(swapped, sin).add_(1 << (shift - 1))
        return out.bitwise_right_shift_(shift).clamp_(-self._qkv_limit, self._qkv_limit)

    def _qkv(self, layer: IntLayer, i: int, h: torch.Tensor, delta: torch.Tensor | None,
             post: IntNorm | None, pos: torch.Tensor, cache: StepCache | None):
        """The residual stream h' = add_residual(h, delta, post), and queries [B, Hkv, rep, T,
        d] and keys, values [B, Hkv, T, d] in Q12 at positions pos [B, T] = 0..T-1, the keys
        and values also written into ``cache`` where given."""
        h, qkv = self.norm_linear(h, delta, post, layer.attn_norm, layer.qkv)
        b, t = pos.shape
        if self.fused_heads and layer.q_norm is None:  # one kernel writes the cache
            if cache is None:  # keys and values for this prefill alone
                shape = (b, self.spec.n_kv, t, self.spec.head_dim)
                keys, values = (torch.empty(shape, dtype=torch.int32, device=self.device)
                                for _ in range(2))
            else:
                keys, values = cache.keys[i], cache.values[i]
            q = cuda_attention.heads(qkv, pos[:, 0], keys, values, self._rotation(i, t))
            return h, q, keys[:, :, :t], values[:, :, :t]
        cos, sin = self.rope(self.spec.thetas[i], t)
        kv_dtype = cache.dtype if cache is not None else torch.int64
        q, k, v = self._heads(qkv, cos, sin, pos, layer.q_norm, layer.k_norm, kv_dtype)
        if cache is not None:
            cache.keys[i][:, :, :t] = k
            cache.values[i][:, :, :t] = v
        return h, q, k, v

    def _rotation(self, i: int, n_positions: int) -> cuda_attention.Rotation:
        """What cuda_attention's kernels need to rotate layer i's heads themselves."""
        cos, sin = self.rope(self.spec.thetas[i], n_positions)
        return cuda_attention.Rotation(self.spec.n_heads, cos, sin, self._qkv_limit,
                                       FRAC + tables.ROPE_BITS - QKV_FRAC, FRAC - QKV_FRAC)

    def _heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
               q_norm: IntNorm | None, k_norm: IntNorm | None, kv_dtype: torch.dtype):
        """Rows [B, T, (H + 2 Hkv) d] of the qkv projection as rotated Q12 queries (int64,
        contiguous) and keys, values rounded to float16's precision (intops.round_kv) as a
        cache of kv_dtype holds them: one pass when compiled."""
        s = self.spec
        b, t = qkv.shape[:2]
        nq, nk = s.n_heads * s.head_dim, s.n_kv * s.head_dim
        if q_norm is None:  # queries and keys rotated together
            qk = qkv[..., : nq + nk].reshape(b, t, s.n_heads + s.n_kv, s.head_dim).transpose(1, 2)
        else:
            q = qkv[..., :nq].reshape(b, t, s.n_heads, s.head_dim).transpose(1, 2)
            k = qkv[..., nq : nq + nk].reshape(b, t, s.n_kv, s.head_dim).transpose(1, 2)
            qk = torch.cat([rms_norm(q, q_norm), rms_norm(k, k_norm)], 1)
        v = qkv[..., nq + nk :].reshape(b, t, s.n_kv, s.head_dim).transpose(1, 2)
        qk = self._rotate(qk, cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
        q, k = qk[:, : s.n_heads], qk[:, s.n_heads :]
        v = rshift_round(v, FRAC - QKV_FRAC).clamp(-self._qkv_limit, self._qkv_limit)
        q = q.reshape(b, s.n_kv, s.n_heads // s.n_kv, t, s.head_dim).contiguous()
        return q, _cached(k, kv_dtype), _cached(v, kv_dtype)

    def _attend(self, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
        """Softmax attention of Q12 queries [B, Hkv, rep, T, d] over Q12 keys/values
        [B, Hkv, S, d]; allowed [B, 1, 1, T, S]. Returns Q16 [B, T, H * d]."""
        b, hkv, rep, t, d = q.shape
        # float64 holds every integer here exactly; the only rounded operations (the scale
        # multiply, the final division) are IEEE-defined, so they agree on every device.
        scores = torch.matmul(q.reshape(b, hkv, rep * t, d).to(torch.float64),
                              kv_float64(k).transpose(-1, -2))
        scores = scores.reshape(b, hkv, rep, t, -1).masked_fill(~allowed, -math.inf)
        dist = scores.amax(dim=-1, keepdim=True) - scores  # +inf where not allowed
        idx = torch.floor(dist * self._index_scale).clamp(max=self.exp_attn.shape[0] - 1)
        p = self.exp_attn_f[idx.to(torch.int64)]
        total = p.sum(dim=-1, keepdim=True)
        out = torch.matmul(p.reshape(b, hkv, rep * t, -1), kv_float64(v))
        out = torch.round(out.reshape(b, hkv, rep, t, d) * (1 << (FRAC - QKV_FRAC)) / total)
        out = out.to(torch.int64)
        return out.reshape(b, hkv * rep, t, d).transpose(1, 2).reshape(b, t, hkv * rep * d)

    def _cpu_heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   pos: torch.Tensor, q_norm: IntNorm | None, k_norm: IntNorm | None,
                   kv_dtype: torch.dtype):
        """``_heads`` on CPUs as one kernel, the query and key norms first where the model has
        them (the same integers; caches of other types through the torch code)."""
        if not cpu_kernels.available() or kv_dtype not in (torch.int64, torch.int32):
            return IntModel._heads(self, qkv, cos, sin, pos, q_norm, k_norm, kv_dtype)
        s = self.spec
        if q_norm is not None:  # in a copy of the rows
            qkv = qkv.contiguous().clone()
            cpu_norm_heads_(qkv.reshape(-1, qkv.shape[-1]), q_norm, k_norm, s)
        q, k, v = cpu_kernels.prefill_heads(
            qkv.contiguous(), pos, cos, sin, s.n_heads, s.n_kv,
            FRAC + tables.ROPE_BITS - QKV_FRAC, FRAC - QKV_FRAC, self._qkv_limit)
        return q, k.to(kv_dtype), v.to(kv_dtype)

    def _cpu_attend(self, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
        """``_attend`` on CPUs as one kernel over each query's visible keys (the same integers)."""
        if not cpu_kernels.available() or q.shape[-1] > cpu_kernels.MAX_HEAD_DIM:
            return IntModel._attend(self, q, k, v, allowed)
        return cpu_kernels.prefill_attention(q, k, v, allowed, self.exp_attn_f, self._index_scale,
                                             float(1 << (FRAC - QKV_FRAC)))

    def _finish_layer(self, layer: IntLayer, h: torch.Tensor, attn_out: torch.Tensor,
                      ops: StepOps | None = None):
        """The attention's output (projected by layer.o) added to h, and the MLP's output (the
        caller adds it, normed by layer.post_mlp_norm, fused with the next norm); through
        ``ops``' pieces where given (a decode step's), else this model's."""
        ops = ops or self
        h, gate_up = ops.norm_linear(h, attn_out, layer.post_attn_norm, layer.mlp_norm,
                                     layer.gate_up)
        return h, ops.mlp_down(gate_up, layer.down)

    def _finish_rows(self, layer: IntLayer, h: torch.Tensor,
                     attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """_finish_layer of a prefill: on CPUs over blocks of rows (each row's own integers
        either way), so the MLP's [gate | up] rows stay within CPU_MLP_BYTES."""
        rows = h.shape[:-1].numel()
        block = max(1, CPU_MLP_BYTES // (layer.gate_up.w.shape[0] * 8))
        if self.device.type != "cpu" or rows <= block:
            return self._finish_layer(layer, h, attn_out)
        h_rows, att_rows = h.reshape(rows, -1), attn_out.reshape(rows, -1)
        parts = [self._finish_layer(layer, h_rows[a : a + block], att_rows[a : a + block])
                 for a in range(0, rows, block)]
        return tuple(torch.cat(p).reshape(*h.shape[:-1], -1) for p in zip(*parts, strict=True))

    def head(self, h: torch.Tensor, delta: torch.Tensor | None = None,
             post: IntNorm | None = None) -> torch.Tensor:
        """Q16 logits of the residual stream add_residual(h, delta, post) (``logits_dtype``:
        int32 on GPUs where they provably fit, else int64)."""
        return self.norm_linear(h, delta, post, self.w.final_norm, self.w.head)[1]

    def pmf(self, logits: torch.Tensor) -> torch.Tensor:
        """Integer frequencies [..., V + 2] summing to 2**PRECISION (distribution.py's layout:
        two never-coded dummies at the ends, every token at least 1)."""
        freq, remainder = self._freq_plus_one(logits)
        freq.scatter_add_(-1, logits.argmax(dim=-1, keepdim=True), remainder)
        return torch.nn.functional.pad(freq, (1, 1), value=1)

    def _freq_plus_one(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """floor(p * budget / sum p) + 1 for every token, p the exp table at the logits'
        distance to their max, and what the floors leave of the budget (which the argmax gets):
        pmf's integers, in fewer passes (floor((p budget + s) / s) = floor(p budget / s) + 1)."""
        vocab = logits.shape[-1]
        budget = TOTAL - (vocab + 2)
        shift = FRAC - tables.EXP_STEP  # rshift_round(max - logits, shift), max - logits >= 0
        idx = torch.sub(logits.amax(dim=-1, keepdim=True) + (1 << (shift - 1)), logits)
        idx = idx.bitwise_right_shift_(shift).clamp_(max=self.exp_prob.shape[0] - 1)
        p = self.exp_prob[idx]
        total = p.sum(dim=-1, keepdim=True)
        freq = torch.add(total, p, alpha=budget).div_(total, rounding_mode="floor")
        return freq, (TOTAL - 2) - freq.sum(dim=-1, keepdim=True)

    def locate(self, logits: torch.Tensor, quantile: torch.Tensor) -> torch.Tensor:
        """(symbol, start, freq) [B, 3] of each quantile [B] under pmf(logits): the decoder's
        next symbols. On CUDA four short Triton passes find it without building the [B, V]
        frequency table (cuda_ops.locate; the same integers)."""
        if self.fused_locate:
            shift = FRAC - tables.EXP_STEP
            return cuda_ops.locate(logits, quantile, self.exp_prob, shift, TOTAL)
        return locate_in_pmf(self.pmf(logits), quantile)

    def decode_step(self, logits: torch.Tensor, decoder: VectorRansDecoder,
                    *buffers: torch.Tensor) -> None:
        """``locate`` and the decode loop's tail (codec.advance_streams: the rANS decoder's
        step and the bookkeeping of ``buffers``) in locate's four kernels (CUDA only)."""
        cuda_ops.decode_step(logits, self.exp_prob, FRAC - tables.EXP_STEP, TOTAL, decoder,
                             *buffers)

    @torch.inference_mode()
    def intervals(self, h: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, freq) [N] of tokens [N] under the distributions of hidden states h [N,
        hidden]: pmf(head(h))[token + 1] and the sum of pmf below it, exactly what the full
        table gives, without building it (the encoder needs nothing else)."""
        # one pass per row where a kernel does it (CUDA: locate's passes, then the token's
        # block; CPUs: cpu_kernels), else the table's cumsum
        rows = (cuda_ops.intervals if self.fused_locate
                else cpu_kernels.interval_rows if self.device.type == "cpu"
                and cpu_kernels.available() else None)
        starts, freqs = [], []
        for s, logits in self._head_blocks(h):
            t = tokens[s : s + logits.shape[0]]
            start, freq = (rows(logits, t, self.exp_prob, FRAC - tables.EXP_STEP, TOTAL)
                           if rows is not None else self._table_intervals(logits, t))
            starts.append(start)
            freqs.append(freq)
        return torch.cat(starts), torch.cat(freqs)

    def _table_intervals(self, logits: torch.Tensor,
                         tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``intervals`` of one block through the frequency table's cumsum (torch)."""
        freq, remainder = self._freq_plus_one(logits)
        t = tokens.unsqueeze(-1)
        top = logits.argmax(dim=-1, keepdim=True)
        cum = freq.cumsum_(dim=-1)
        upto = cum.gather(-1, t)
        below = torch.where(t > 0, cum.gather(-1, (t - 1).clamp_(min=0)), 0)
        return ((below + 1 + torch.where(top < t, remainder, 0)).squeeze(-1),
                (upto - below + torch.where(top == t, remainder, 0)).squeeze(-1))

    def _head_blocks(self, h: torch.Tensor, block: int | None = None):
        """Yield (row offset, Q16 logits) for blocks of rows of h [N, hidden]. On CPUs the head
        GEMM runs over 512 rows and its rows are rescaled a few at a time, so every pass over
        the 49,152-wide rows after it works in cache; through the kernels, 128 rows a block,
        every block into the same buffer (a block's logits last until the next is asked for:
        a new 50 MB tensor each was mapped and faulted in page by page)."""
        if self.device.type != "cpu":
            block = block or 4096
            for s in range(0, h.shape[0], block):
                yield s, self.head(h[s : s + block])
            return
        block = block or 512
        head = self.w.head
        out = (torch.empty((min(128, h.shape[0]), head.w.shape[0]), dtype=torch.int64)
               if cpu_kernels.available() else None)
        for s in range(0, h.shape[0], block):
            x = self._rms_norm(h[s : s + block], self.w.final_norm)
            if out is not None:  # the GEMM and its rescaling as one kernel
                for a in range(0, x.shape[0], 128):
                    rows = x[a : a + 128].contiguous()
                    yield s + a, cpu_kernels.linear(rows, head.w, head.scale, head.bias,
                                                    out[: rows.shape[0]])
                continue
            gemm = RowGemm(x, head.w, head.scale, head.bias)
            step = max(8, gemm.block)
            for a in range(0, gemm.m, step):
                yield s + a, gemm.rows(a, a + step)

    # -- drivers --------------------------------------------------------------------------
    def _allowed(self, qpos: torch.Tensor, kpos: torch.Tensor, i: int) -> torch.Tensor:
        """Causal (and sliding-window) visibility [B, 1, 1, T, S] for positions [B, T], [B, S]."""
        q, k = qpos.unsqueeze(-1), kpos.unsqueeze(-2)
        ok = (k <= q) & (k >= 0)
        window = self.spec.windows[i]
        if window:
            ok &= (q - k) < window
        return ok[:, None, None]

    @torch.inference_mode()
    def prefill_hidden(self, ids: torch.Tensor, cache: StepCache | None = None,
                       budget: int | None = None) -> torch.Tensor:
        """The last hidden states (Q16 [B, T, hidden]) of sequences ids [B, T] at positions
        0..T-1, optionally writing their keys and values into ``cache`` (the same integers a
        step-by-step run writes). Attention runs in query blocks of about ``budget`` scores."""
        b, t = ids.shape
        if cache is not None and (t > cache.capacity or b > cache.keys[0].shape[0]):
            # the GPU's rotation kernel writes unchecked (the torch path's copy would raise)
            raise ValueError(f"{b} x {t} ids do not fit a cache of {cache.keys[0].shape[0]} "
                             f"streams x {cache.capacity} positions")
        pos = torch.arange(t, device=self.device).expand(b, t)
        budget = budget or (1 << (24 if self.device.type == "cpu" else 28))
        block = max(16, budget // max(1, b * self.spec.n_heads * t))
        h, mlp, post = self.embed(ids), None, None
        for i, layer in enumerate(self.w.layers):
            h, q, k, v = self._qkv(layer, i, h, mlp, post, pos, cache)
            if cache is not None and cache.major is not None:
                cuda_attention.fill_major(cache.major[i], k)
            if self.fused_prefill:
                att = cuda_attention.prefill_attention(
                    q, k, v, self.spec.windows[i], self.exp_attn_f, self._index_scale_t,
                    1 << (FRAC - QKV_FRAC))
            else:
                att = torch.cat([
                    self._attend(q[..., s:e, :], k[:, :, :e], v[:, :, :e],
                                 self._allowed(pos[:, s:e], pos[:, :e], i))
                    for s, e in ((s, min(s + block, t)) for s in range(0, t, block))
                ], dim=1)
            h, mlp = self._finish_rows(layer, h, self.linear(att, layer.o))
            post = layer.post_mlp_norm
        return self._add_residual(h, mlp, post)

    def head_pmf(self, h: torch.Tensor, block: int | None = None):
        """Yield (row offset, pmf [n, V + 2]) for blocks of rows of hidden states h [N, hidden]."""
        for s, logits in self._head_blocks(h, block):
            yield s, self.pmf(logits)

    # -- step -----------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> StepCache:
        s = self.spec
        shape = (batch, s.n_kv, capacity, s.head_dim)
        self.prepare(capacity)
        # The fused kernels read float16 keys and values (x * 2**-KV_EXP: intops.kv_float16),
        # each stream's own positions only. On the H200 (compiled, 128-token streams, int32
        # caches then) they beat the float64 GEMMs at 1 to 256 streams (+16% at 1 and 64,
        # +13% at 256); with their key splits sized to the group
        # (cuda_attention.TARGET_PROGRAMS) also at 1,024 (7.2 ms a step at positions 100-190,
        # where the GEMMs take 6.7 ms at a 128-slot span, 13.2 at 320).
        dtype = torch.float16 if batch <= self.fused_attention_streams else torch.float64
        # Large groups keep a key-major copy of their keys: their attention runs a program
        # per key head (cuda_attention.KEY_MAJOR_MIN_STREAMS).
        major = dtype == torch.float16 and batch >= cuda_attention.KEY_MAJOR_MIN_STREAMS
        return StepCache(
            keys=[torch.zeros(shape, dtype=dtype, device=self.device)
                  for _ in range(s.n_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=self.device)
                    for _ in range(s.n_layers)],
            capacity=capacity,
            major=[cuda_attention.major_keys(batch, s.n_kv, capacity, s.head_dim, self.device,
                                             dtype) for _ in range(s.n_layers)] if major else None,
        )

    @torch.inference_mode()
    def step_logits(self, cache: StepCache, tokens: torch.Tensor, pos: torch.Tensor,
                    span: int | None = None, ops: StepOps | None = None) -> torch.Tensor:
        """Feed tokens [B] at positions pos [B] (writing the cache there) and return Q16
        logits [B, V] of the next token. ``span``: attend over the first ``span`` cache
        slots (a static bound >= max(pos) + 1; default the whole capacity). ``ops``: the
        pieces of the step (``StepOps``), by default this model's own; the CPU's kernels
        (cpu_step.CpuStep) give the same integers with their own."""
        ops = ops or self
        h, delta, post = ops.step_embed(tokens), None, None
        for i, layer in enumerate(self.w.layers):
            h, qkv = ops.norm_linear(h, delta, post, layer.attn_norm, layer.qkv)
            attn_out = ops.step_attend(i, qkv, cache, pos, span or cache.capacity)
            h, delta = self._finish_layer(layer, h, attn_out, ops)
            post = layer.post_mlp_norm
        return ops.norm_linear(h, delta, post, self.w.final_norm, self.w.head)[1]

    # -- the step's pieces on this model (StepOps) -------------------------------------------
    def step_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.fused_embed:  # a decoder's tokens are in range (clamped)
            return cuda_ops.embed_rows(tokens, self.w.embed, self.w.embed_mant,
                                       self.w.embed_exp, FRAC)
        return self.embed(tokens)

    def step_attend(self, i: int, qkv: torch.Tensor, cache: StepCache, pos: torch.Tensor,
                    span: int) -> torch.Tensor:
        """Layer i's attention for one new token per stream, through its output projection:
        the qkv rows [B, (H + 2 Hkv) d] rotated into queries, keys and values, the latter
        written into the cache at pos, then the queries attend over slots 0..pos. Returns
        Q16 [B, hidden]."""
        s, layer, b = self.spec, self.w.layers[i], qkv.shape[0]
        rotate_in_kernel = self.fused_heads and layer.q_norm is None
        if (cache.dtype == torch.float16 and rotate_in_kernel
                and b <= cuda_attention.ROTATE_MAX_STREAMS
                and cache.major is None):  # one pass, no queries stored
            rotation = self._rotation(i, cache.capacity)
            return self._gemm(*self._decode_attention(i, qkv, cache, pos, rotation), layer.o)
        if rotate_in_kernel:  # the cache written by the kernel
            q = cuda_attention.heads(qkv.unsqueeze(1), pos, cache.keys[i], cache.values[i],
                                     self._rotation(i, cache.capacity),
                                     torch.int32 if cache.major is None else torch.float64)
        else:
            cos, sin = self.rope(s.thetas[i], cache.capacity)
            q, k, v = self._heads(qkv.unsqueeze(1), cos, sin, pos.unsqueeze(1), layer.q_norm,
                                  layer.k_norm, cache.dtype)
            slot = pos.view(b, 1, 1, 1).expand(b, s.n_kv, 1, s.head_dim)
            cache.keys[i].scatter_(2, slot, k)
            cache.values[i].scatter_(2, slot, v)
        if cache.dtype == torch.float16:  # the fused kernels: each stream's own keys only
            return self._gemm(*self._decode_attention(i, q, cache, pos), layer.o)
        kpos = torch.arange(span, device=self.device).expand(b, span)
        att = self._attend(q, cache.keys[i][:, :, :span], cache.values[i][:, :, :span],
                           self._allowed(pos.unsqueeze(1), kpos, i))
        return self.linear(att.reshape(b, -1), layer.o)

    def _decode_attention(self, i: int, q: torch.Tensor, cache: StepCache, pos: torch.Tensor,
                          rotation: cuda_attention.Rotation | None = None):
        """cuda_attention.decode_attention of layer i: the o projection's split input."""
        return cuda_attention.decode_attention(q, cache.keys[i], cache.values[i], pos,
                                               self.spec.windows[i], self.exp_attn_f,
                                               self._index_scale_t, 1 << (FRAC - QKV_FRAC),
                                               rotation,
                                               None if cache.major is None else cache.major[i])


class StepOps(Protocol):
    """The pieces of a decode step over rows [B, ...] (IntModel's, or cpu_step.CpuStep's
    kernels): each gives model.py's integers."""

    def step_embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def norm_linear(self, h: torch.Tensor, delta: torch.Tensor | None, post: IntNorm | None,
                    norm: IntNorm, lin: IntLinear) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step_attend(self, i: int, qkv: torch.Tensor, cache: StepCache, pos: torch.Tensor,
                    span: int) -> torch.Tensor: ...

    def linear(self, v: torch.Tensor, lin: IntLinear) -> torch.Tensor: ...

    def mlp_down(self, gate_up: torch.Tensor, down: IntLinear) -> torch.Tensor: ...


@dataclass
class StepCache:
    """A static KV cache of Q12 keys and values [B, Hkv, capacity, d], rounded to float16's
    precision: float64 (exact) for the attention GEMMs, float16 (x * 2**-KV_EXP) for the fused
    GPU kernels, int32 for the CPU's (cpu_step). ``major``: a large group's key-major
    copies of the keys (cuda_attention.major_keys), which prefills fill and decode steps keep
    up run by run."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    capacity: int
    major: list[torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype


# -- CPU kernels in place of torch code (the same integers; the torch code where they don't run)
def _cpu_rms_norm(h: torch.Tensor, norm: IntNorm) -> torch.Tensor:
    if not cpu_kernels.available():
        return rms_norm(h, norm)
    rows = h.reshape(-1, h.shape[-1]).contiguous()
    y = cpu_kernels.rms_norm(rows, norm.gain, FRAC - norm.frac, norm.eps32)
    return y.reshape(h.shape)


def cpu_norm_heads_(rows: torch.Tensor, q_norm: IntNorm, k_norm: IntNorm, spec: ArchSpec) -> None:
    """_heads' query and key norms through cpu_kernels, in place: each query and key head's
    row of qkv rows [M, (H + 2 Hkv) d] (a prefill's and a CPU decode step's, before their
    rotation)."""
    nq, nk = spec.n_heads * spec.head_dim, spec.n_kv * spec.head_dim
    for part, norm, heads in ((rows[:, :nq], q_norm, spec.n_heads),
                              (rows[:, nq : nq + nk], k_norm, spec.n_kv)):
        cpu_kernels.rms_norm(part, norm.gain, FRAC - norm.frac, norm.eps32, heads, part)


def _cpu_gated_activation(table: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    if not cpu_kernels.available():
        return gated_activation(table, gate_up)
    rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    y = cpu_kernels.gated_activation(rows, table, FRAC, tables.SIGMOID_IN, tables.SIGMOID_OUT)
    return y.reshape(*gate_up.shape[:-1], -1)
