"""The row kernels (seqkv/engine/cuda_rows.py) give model.residual_norm_split's and
model.activation_split's integers: on realistic rows, and on the extreme ones (zeros, single
values, all negative, |h| from 2**40 to past 2**62, rounding ties, float64 exponent edges,
int64's limits for the activation), at several widths and row counts.

The kernels run on CUDA GPUs only, so these tests skip elsewhere (CI has no GPU); they passed
on the H200 and, as check_norm_split / check_act_split on CPU tensors, under Triton's
interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from seqkv.engine import cuda_rows, model, tables
from seqkv.engine.weights import IntLinear, IntNorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not cuda_rows.available(
    torch.device("cuda")), reason="needs a CUDA GPU with Triton")

NORM_WIDTHS = (576, 640, 1024, 1152, 3072)
ACT_WIDTHS = (576, 640, 1024, 1152, 1536)  # I: gate_up rows are 2 I wide
I64_MAX = (1 << 63) - 1


def make_norm(hidden: int, frac: int, eps32: int, gen: torch.Generator,
              bits: int = 15) -> IntNorm:
    """An IntNorm as weights._norm makes one (gains Q(frac), the largest near 2**bits)."""
    gain = torch.randint(-(1 << bits), 1 << bits, (hidden,), generator=gen, dtype=torch.int64)
    gain[0] = (1 << bits) - 1
    return IntNorm(gain, frac, eps32)


def _randint(lo: int, hi: int, shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64)


def norm_rows(hidden: int, gen: torch.Generator) -> torch.Tensor:
    """17 rows [17, hidden]: realistic first, then the extreme kinds, one a row."""
    w = hidden
    scales = 2.0 ** torch.arange(0, 49, 12, dtype=torch.float64)  # 2**0 .. 2**48
    gauss = (torch.randn(len(scales), w, generator=gen, dtype=torch.float64)
             * scales[:, None]).to(torch.int64)
    rows = [_randint(-(1 << 24), 1 << 24, (1, w), gen), gauss]
    zeros = torch.zeros(1, w, dtype=torch.int64)
    one = zeros.clone()
    one[0, w - 1] = -7  # in the row's second part (cuda_rows holds rows as two)
    rows += [zeros, one, -_randint(1, 1 << 30, (1, w), gen)]  # zeros; one value; all < 0
    # ties at .5 in rshift_round: max 2**21 (shift 2) and values = 2 mod 4
    tie = (_randint(-1000, 1000, (1, w), gen) * 4 + 2)
    tie[0, 0] = 1 << 21
    rows.append(tie)
    # ties in the division: 6s with a few 3s, 9s and 8s give r = 6 (eps 0, unit gains):
    # 3 / 6 and 9 / 6 are .5 ties, rounded half up
    six = torch.full((1, w), 6, dtype=torch.int64)
    six[0, :6] = torch.tensor([3, -3, 9, -9, 8, 8])
    rows.append(six)
    # float64 exponent edges of the row maximum: 2**20 - 1, 2**20, and values that round up
    # to the next power of two in float64 (2**54 - 1)
    for top in ((1 << 20) - 1, 1 << 20, (1 << 53) + 1, (1 << 54) - 1):
        r = _randint(-top, top, (1, w), gen)
        r[0, w - 1] = -top if top & 1 else top
        rows.append(r)
    big = (torch.rand(1, w, generator=gen, dtype=torch.float64) - 0.5) * 2.0**62
    rows.append(big.to(torch.int64))  # |h| up to 2**61
    huge = _randint(0, 1 << 61, (1, w), gen) + (1 << 62)  # past 2**62: the exact int64 branch
    huge[0, ::2] *= -1
    rows.append(huge)
    rows = torch.cat(rows)
    return rows[[0, 16, 10, *range(1, 10), *range(11, 16)]]  # realistic, huge, tie first


def norm_cases(hidden: int, gen: torch.Generator):
    """(label, norm) pairs: gains and shifts S = 16 - frac of both signs, eps 0 and typical;
    gains too large for the fast branch and S < -16 take the exact branch (S = -40: divisors
    near 2**62)."""
    return [
        ("smollm2-like", make_norm(hidden, 14, 42949, gen)),
        ("S=0", make_norm(hidden, 16, 4294, gen)),
        ("S=7", make_norm(hidden, 9, 0, gen)),
        ("S=-3", make_norm(hidden, 19, 42949, gen, bits=12)),
        ("big gains", make_norm(hidden, 9, 42949, gen, bits=26)),
        ("S=-20", make_norm(hidden, 36, 42949, gen, bits=10)),
        ("S=-40", make_norm(hidden, 56, 42949, gen, bits=8)),
        ("huge gains", make_norm(hidden, 0, 0, gen, bits=40)),  # products wrap; |y| > 2**53
    ]


def _assert_same(got, want, label: str) -> None:
    assert len(got) == len(want), label
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape, (label, i, g.dtype, g.shape, w.shape)
        if not torch.equal(g, w):
            bad = (g != w).nonzero()
            raise AssertionError(f"{label}: output {i} differs at {len(bad)} places, first "
                                 f"{bad[0].tolist()}: {g[tuple(bad[0])]} != {w[tuple(bad[0])]}")


def check_norm_split(hidden: int, device: str) -> None:
    gen = torch.Generator().manual_seed(hidden)
    h = norm_rows(hidden, gen).to(device)
    delta = torch.roll(h, 1, dims=0) // 3  # every extreme kind as a delta too
    delta[0] = _randint(-(1 << 22), 1 << 22, (hidden,), gen)
    delta = delta.to(device)
    unit = IntNorm(torch.ones(hidden, dtype=torch.int64), 16, 0)  # the tie row's norm
    for label, norm in [*norm_cases(hidden, gen), ("unit", unit)]:
        norm = IntNorm(norm.gain.to(device), norm.frac, norm.eps32)
        post = make_norm(hidden, 12, 4294, gen)
        post = IntNorm(post.gain.to(device), post.frac, post.eps32)
        for rows in (1, 3, 17):
            for d, p, kind in ((None, None, "no delta"), (delta, None, "delta"),
                               (delta, post, "delta+post"), (None, post, "post, no delta")):
                args = (h[:rows], d[:rows] if d is not None else None, p, norm)
                want = model.residual_norm_split(*args)
                got = cuda_rows.norm_split(*args)
                _assert_same(got, want, f"{hidden} {label} {rows} rows {kind}")
    # The split's shift where max |y| > 2**53 rounds differently from y's bit length: rows of
    # ones and unit S give y = gain, and max |y| = 2**54 - 2 is a float64 where the OR of
    # the |y| (2**54 - 1) would round up to 2**54
    gain = _randint(-100, 100, (hidden,), gen)
    gain[:2] = torch.tensor([(1 << 54) - 2, 1])
    edge = IntNorm(gain.to(device), 16, 0)
    ones = torch.ones(2, hidden, dtype=torch.int64, device=device)
    _assert_same(cuda_rows.norm_split(ones, None, None, edge),
                 model.residual_norm_split(ones, None, None, edge), f"{hidden} y near 2**54")
    # [B, T, hidden] rows, as a prefill passes them
    norm = IntNorm(norm_cases(hidden, gen)[0][1].gain.to(device), 14, 42949)
    h3, d3 = h[:6].reshape(2, 3, hidden), delta[:6].reshape(2, 3, hidden)
    _assert_same(cuda_rows.norm_split(h3, d3, None, norm),
                 model.residual_norm_split(h3, d3, None, norm), f"{hidden} [2, 3, hidden]")


def act_rows(width: int, gen: torch.Generator) -> torch.Tensor:
    """17 gate_up rows [17, 2 width]: realistic, then the extremes."""
    w2 = 2 * width
    rows = [_randint(-(1 << 20), 1 << 20, (2, w2), gen)]
    scales = 2.0 ** torch.tensor([4, 12, 24, 32, 45], dtype=torch.float64)
    rows.append((torch.randn(5, w2, generator=gen, dtype=torch.float64)
                 * scales[:, None]).to(torch.int64))
    rows.append(torch.zeros(1, w2, dtype=torch.int64))
    # table index ties (x = 32 mod 64) and the table's ends
    edge = 16 << 16
    gate = _randint(-(edge >> 6) - 4, (edge >> 6) + 4, (1, width), gen) * 64 + 32
    gate[0, :6] = torch.tensor([-edge - 33, -edge - 32, -edge, edge - 33, edge - 32, edge])
    up = _randint(-(1 << 20), 1 << 20, (1, width), gen)
    gate[0, -1], up[0, -1] = 24 << 16, 1 << 30  # the row's largest, in its second part
    rows.append(torch.cat([gate, up], 1))
    # the clamps: gate around 2**40, up around 2**30, both signs
    marks = torch.tensor([1 << 40, (1 << 40) + 1, (1 << 40) - 1, 1 << 30, (1 << 30) + 1,
                          (1 << 30) - 1, 1 << 46])
    pick = marks[_randint(0, len(marks), (2, w2), gen)]
    rows.append(pick * torch.where(torch.rand(2, w2, generator=gen) < 0.5, -1, 1))
    # int64's limits (torch wraps the table index's add; so must the kernel)
    lim = torch.tensor([I64_MAX, -I64_MAX - 1, I64_MAX - 100, -I64_MAX + 100])
    rows.append(lim[_randint(0, 4, (1, w2), gen)])
    # every activation negative: large positive gates (factor ~1) times negative ups
    neg = torch.cat([_randint(1 << 20, 1 << 22, (1, width), gen),
                     -_randint(1 << 10, 1 << 20, (1, width), gen)], 1)
    rows.append(neg)
    # half-ties in the final split: products landing on 2**(k-1) mod 2**k
    # (gate past the table's end: factor 2**16, a = gate = 24 * 2**16, act = 24 up; max
    # |act| near 24 * 2**13 gives shift 5, and up = 2 mod 4 puts act at 16 mod 32)
    tie = torch.cat([torch.full((1, width), 24 << 16, dtype=torch.int64),
                     _randint(-(1 << 11), 1 << 11, (1, width), gen) * 4 + 2], 1)
    rows.append(tie)
    rows.append(_randint(-(1 << 62), 1 << 62, (3, w2), gen))
    rows = torch.cat(rows)
    return rows[[0, 11, 7, *range(1, 7), *range(8, 11), *range(12, 17)]]  # limits, zeros 2nd


def act_tables() -> list[tuple[str, torch.Tensor]]:
    return [("silu", torch.from_numpy(tables.sigmoid_table())),
            ("gelu", torch.from_numpy(tables.gelu_tanh_table()))]


def check_act_split(width: int, device: str, blocks=(None,)) -> None:
    gen = torch.Generator().manual_seed(width + 1)
    gu = act_rows(width, gen).to(device)
    assert gu.shape[0] == 17
    for name, table in act_tables():
        table = table.to(device)
        for rows in (1, 3, 17):
            want = model.activation_split(table, gu[:rows])
            for block in blocks:
                got = cuda_rows.act_split(table, gu[:rows], block=block)
                _assert_same(got, want, f"{width} {name} {rows} rows block {block}")
    g3 = gu[:6].reshape(2, 3, -1)
    _assert_same(cuda_rows.act_split(table, g3), model.activation_split(table, g3),
                 f"{width} [2, 3, 2 I]")


def _linear_for(shift: int, n: int, k: int, gen: torch.Generator) -> IntLinear:
    """Random int8 weights [n, k] (every 7th row saturated) with a bias, scaled so that rows
    split at ``shift`` give outputs near 2**25, far from int64's limits."""
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w[::7] = 127
    mant = _randint(1 << 20, 1 << 21, (n,), gen)
    exp = 24 + shift + _randint(0, 8, (n,), gen)
    return IntLinear(w=w, mant=mant, exp=exp, bias=_randint(-(1 << 20), 1 << 20, (n,), gen))


def _on(lin: IntLinear, device: str) -> IntLinear:
    return IntLinear(w=lin.w.to(device), mant=lin.mant.to(device), exp=lin.exp.to(device),
                     bias=lin.bias.to(device))


def check_norm_linear_row(hidden: int, device: str) -> None:
    """norm_linear_row of each extreme row alone equals residual_norm_split, then
    split_linear (and the h' it passes on), with and without delta and post norm."""
    gen = torch.Generator().manual_seed(hidden + 2)
    h = norm_rows(hidden, gen).to(device)
    delta = (torch.roll(h, 1, dims=0) // 3).to(device)
    post = make_norm(hidden, 12, 4294, gen)
    post = IntNorm(post.gain.to(device), post.frac, post.eps32)
    for label, norm in norm_cases(hidden, gen):
        norm = IntNorm(norm.gain.to(device), norm.frac, norm.eps32)
        for r in range(h.shape[0]):
            d, p = ((None, None), (delta[r], None), (delta[r], post))[r % 3]
            want_h, hi, lo, k = model.residual_norm_split(h[r], d, p, norm)
            lin = _on(_linear_for(int(k), 72, hidden, gen), device)
            want = model.split_linear(hi, lo, k, lin)
            got_h, got = cuda_rows.norm_linear_row(h[r], d, p, norm, lin.w, lin.scale, lin.bias)
            where = f"{hidden} {label} row {r}"
            assert torch.equal(got_h, want_h) and got_h.shape == h[r].shape, where
            assert torch.equal(got, want), where


def check_act_linear_row(width: int, device: str) -> None:
    """act_linear_row of each extreme gate_up row alone equals activation_split, then
    split_linear."""
    gen = torch.Generator().manual_seed(width + 3)
    gu = act_rows(width, gen).to(device)
    for name, table in act_tables():
        table = table.to(device)
        for r in range(gu.shape[0]):
            hi, lo, k = model.activation_split(table, gu[r : r + 1])
            lin = _on(_linear_for(int(k), 40, width, gen), device)
            want = model.split_linear(hi, lo, k, lin)
            got = cuda_rows.act_linear_row(table, gu[r], lin.w, lin.scale, lin.bias)
            assert torch.equal(got, want), f"{width} {name} row {r}"


@pytest.mark.parametrize("hidden", (576, 640, 2048))
def test_norm_linear_row_gives_the_torch_integers(hidden):
    check_norm_linear_row(hidden, "cuda")


@pytest.mark.parametrize("width", (576, 1536, 2048))
def test_act_linear_row_gives_the_torch_integers(width):
    check_act_linear_row(width, "cuda")


@pytest.mark.parametrize("hidden", NORM_WIDTHS)
def test_norm_split_gives_the_torch_integers(hidden):
    check_norm_split(hidden, "cuda")


@pytest.mark.parametrize("width", ACT_WIDTHS)
def test_act_split_gives_the_torch_integers(width):
    """In registers, and in the two-pass loop over blocks (forced by a narrow block)."""
    check_act_split(width, "cuda", blocks=(None, 256))


def test_wide_activation_rows_loop():
    """Rows wider than the kernel holds at once (I = 14336) take the two-pass loop."""
    check_act_split(14336, "cuda")


def test_norm_split_compiled_agrees():
    """Against the compiled torch function the engine used before (SmolLM2's widths)."""
    gen = torch.Generator().manual_seed(9)
    norm = make_norm(576, 14, 42949, gen)
    norm = IntNorm(norm.gain.cuda(), norm.frac, norm.eps32)
    h = norm_rows(576, gen).cuda()
    fused = torch.compile(model.residual_norm_split, dynamic=False)
    _assert_same(cuda_rows.norm_split(h, h // 5, None, norm), fused(h, h // 5, None, norm),
                 "compiled")
