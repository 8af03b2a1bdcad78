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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not available(
    torch.device("cuda")), reason="needs a CUDA GPU with Triton")


def _use_kernels(model: IntModel, on: bool, attention: bool | None = None) -> None:
    model.triton_linear = on
    model.fused_attention_streams = 1 << 20 if (on if attention is None else attention) else 0
    model.fused_heads = on


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kernels_give_the_torch_integers(name):
    """Prefill through the fused linear, and steps through the fused attention from mixed
    positions (past the random Gemma-3's sliding window of 8), equal the torch path; and the
    rotation kernel writing a float64 cache (groups too large for the fused attention)."""
    model = IntModel(integerize(MODELS[name]().model), "cuda")
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
