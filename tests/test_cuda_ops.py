"""The engine's Triton kernels (seqkv/engine/cuda_ops.py) give the torch path's integers.

They run only on CUDA GPUs, so these tests skip elsewhere (CI has no GPU); they are run on the
H200 and reported in BENCHMARKS.md.
"""

import pytest
import torch

from seqkv.engine import IntModel, cuda_ops, integerize, tables
from seqkv.engine.cuda_ops import available
from seqkv.engine.model import FRAC

from .test_engine import MODELS


def _llama_rep3():
    """Three query heads per key/value head, as SmolLM2 (9 over 3), not a power of two."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqkv.core.models import from_objects

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=128)
    return from_objects(LlamaForCausalLM(config), None, "tiny-llama-rep3")


KERNEL_MODELS = {**MODELS, "llama_rep3": _llama_rep3}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not available(
    torch.device("cuda")), reason="needs a CUDA GPU with Triton")


def _use_kernels(model: IntModel, on: bool, attention: bool | None = None) -> None:
    model.triton_linear = on
    model.fused_attention_streams = 1 << 20 if (on if attention is None else attention) else 0
    model.fused_heads = on
    model.row_kernels = on


@pytest.mark.parametrize("name", sorted(KERNEL_MODELS))
def test_kernels_give_the_torch_integers(name):
    """Prefill through the fused linear, and steps through the fused attention from mixed
    positions (past the random Gemma-3's sliding window of 8), equal the torch path; and the
    rotation kernel writing a float64 cache (groups too large for the fused attention)."""
    model = IntModel(integerize(KERNEL_MODELS[name]().model), "cuda")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (5, 48), generator=g).cuda()
    start = torch.tensor([0, 3, 9, 17, 30], device="cuda")
    runs = []
    for on, attention in ((True, True), (False, False), (True, False)):
        _use_kernels(model, on, attention)
        hidden = model.prefill_hidden(ids)
        cache = model.new_cache(5, 48)
        assert cache.dtype == (torch.int32 if attention else torch.float64)
        model.prefill_hidden(ids[:, :30], cache=cache)
        steps = []
        for t in range(18):
            pos = start + t
            steps.append(model.step_logits(cache, ids.gather(1, pos[:, None])[:, 0], pos))
        runs.append((hidden, torch.stack(steps)))
    for hidden, steps in runs[1:]:
        assert torch.equal(runs[0][0], hidden)
        assert torch.equal(runs[0][1], steps)


def test_locate_finds_the_tables_symbol():
    """The distribution kernels find the symbol, start and frequency the full table's
    cumulative search finds: random, flat and tied logits, quantiles at every edge; and the
    encoder's (start, freq) of given tokens (first, last, the argmax, random)."""
    model = IntModel(integerize(MODELS["llama"]().model), "cuda")
    g = torch.Generator().manual_seed(5)
    for vocab in (256, 5000, 49152):
        logits = (torch.randn(8, vocab, generator=g, dtype=torch.float64) * 2.0 ** torch.arange(
            8, dtype=torch.float64)[:, None] * 2**12).to(torch.int64)
        logits[0] = 7  # all equal
        logits[1, [3, vocab - 1]] = logits[1].max() + 1  # a tie for the maximum
        logits = logits.cuda()
        for q in (torch.zeros(8), torch.full((8,), (1 << 24) - 1), torch.ones(8),
                  torch.randint(0, 1 << 24, (8,), generator=g)):
            q = q.to(torch.int64).cuda()
            model.fused_locate = True
            got = model.locate(logits, q)
            model.fused_locate = False
            assert torch.equal(got, model.locate(logits, q))
        pmf = model.pmf(logits)
        cdf = pmf.cumsum(-1)
        for tokens in (torch.zeros(8), torch.full((8,), vocab - 1), logits.argmax(1).cpu(),
                       torch.randint(0, vocab, (8,), generator=g)):
            symbols = tokens.to(torch.int64).cuda()[:, None] + 1
            want_freq = pmf.gather(1, symbols)[:, 0]
            start, freq = cuda_ops.intervals(logits, symbols[:, 0] - 1, model.exp_prob,
                                             FRAC - tables.EXP_STEP, 1 << 24)
            assert torch.equal(freq, want_freq)
            assert torch.equal(start, cdf.gather(1, symbols)[:, 0] - want_freq)


@pytest.mark.parametrize("rows", [1, 2, 3, 17, 100])
def test_int8_linear_gives_split_linears_integers(rows):
    """int8_linear equals model.split_linear at every tile shape it picks (16 and 64 rows,
    narrow and wide columns): random and extreme halves, widths that are not multiples of any
    tile (the 9,000-wide one takes the head's tiles), with and without a bias."""
    from seqkv.engine.model import split_linear
    from seqkv.engine.weights import IntLinear

    g = torch.Generator().manual_seed(rows)
    for n, k in ((96, 576), (1000, 100), (576, 1536), (9000, 64)):
        hi = torch.randint(-64, 65, (rows, k), generator=g, dtype=torch.int8)
        lo = torch.randint(-64, 64, (rows, k), generator=g, dtype=torch.int8)
        hi[0], lo[0] = 64, 63  # the largest row: every product at its bound
        w = torch.randint(-127, 128, (2 * n, k), generator=g, dtype=torch.int8)
        w[: n // 2] = 127
        shift = torch.randint(0, 30, (rows, 1), generator=g)
        mant = torch.randint(1 << 20, 1 << 21, (n,), generator=g)
        exp = torch.randint(36, 44, (n,), generator=g)
        for bias in (None, torch.randint(-(1 << 20), 1 << 20, (n,), generator=g)):
            lin = IntLinear(w=w.cuda(), mant=mant.cuda(), exp=exp.cuda(),
                            bias=bias.cuda() if bias is not None else None)
            args = hi.cuda(), lo.cuda(), shift.cuda()
            got = cuda_ops.int8_linear(*args, lin.w, lin.scale, lin.bias)
            assert torch.equal(got, split_linear(*args, lin))
