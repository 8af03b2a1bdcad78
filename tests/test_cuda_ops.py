"""The engine's Triton kernels (seqkv/engine/cuda_ops.py) give the torch path's integers.

They run only on CUDA GPUs, so these tests skip elsewhere (CI has no GPU); they are run on the
H200 and reported in BENCHMARKS.md.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seqkv.core.decoders import VectorRansDecoder, encode_stream
from seqkv.core.distribution import TOTAL
from seqkv.core.errors import BlobError
from seqkv.engine import EngineCodec, IntModel, cuda_ops, integerize, tables
from seqkv.engine.codec import advance_streams
from seqkv.engine.cuda_ops import available
from seqkv.engine.intops import kv_float16
from seqkv.engine.model import FRAC

from .test_engine import MODELS

CUDA = torch.device("cuda")


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


def cached(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values as a cache of ``dtype`` holds them: float16 rounded as the engine's
    (intops.kv_float16), integer dtypes at full width (to test the kernels' sums at their
    bounds)."""
    return kv_float16(x) if dtype == torch.float16 else x.to(dtype)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not available(
    torch.device("cuda")), reason="needs a CUDA GPU with Triton")


def _use_kernels(model: IntModel, on: bool, attention: bool | None = None) -> None:
    model.triton_linear = on
    model.row_linear = on
    model.fused_attention_streams = 1 << 20 if (on if attention is None else attention) else 0
    model.fused_heads = on
    model.row_kernels = on


@pytest.mark.parametrize(("programs", "rotate_max", "key_major"), [
    (None, None, False), (1, None, False), (1, 0, False), (None, 0, True), (1, 0, True)])
@pytest.mark.parametrize("name", sorted(KERNEL_MODELS))
def test_kernels_give_the_torch_integers(name, programs, rotate_max, key_major, monkeypatch):
    """Prefill through the fused linear, and steps through the fused attention from mixed
    positions (past the random Gemma-3's sliding window of 8), equal the torch path; and the
    rotation kernel writing a float64 cache (groups too large for the fused attention).
    programs=1: one attention program per head (as large groups run), else split heads;
    rotate_max=0: the rotation in ``heads`` before the scores (as groups above
    ROTATE_MAX_STREAMS run), else in the scores kernel; key_major: over a key-major copy of
    the keys (as groups of KEY_MAJOR_MIN_STREAMS and more run)."""
    from seqkv.engine import cuda_attention

    if programs is not None:
        monkeypatch.setattr(cuda_attention, "TARGET_PROGRAMS", programs)
    if rotate_max is not None:
        monkeypatch.setattr(cuda_attention, "ROTATE_MAX_STREAMS", rotate_max)
    monkeypatch.setattr(cuda_attention, "KEY_MAJOR_MIN_STREAMS", 0 if key_major else 1 << 20)
    model = IntModel(integerize(KERNEL_MODELS[name]().model), "cuda")
    assert model.logits_dtype == torch.int32  # the kernels' head; the torch path's is int64
    # ... and their qkv (without q/k norms) and gate_up rows
    assert len(model._int32_outputs) == sum(2 if layer.q_norm is None else 1
                                            for layer in model.w.layers)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (5, 48), generator=g).cuda()
    start = torch.tensor([0, 3, 9, 17, 30], device="cuda")
    runs = []
    for on, attention in ((True, True), (False, False), (True, False)):
        _use_kernels(model, on, attention)
        hidden = model.prefill_hidden(ids)
        cache = model.new_cache(5, 48)
        assert cache.dtype == (torch.float16 if attention else torch.float64)
        assert (cache.major is not None) == (attention and key_major)
        model.prefill_hidden(ids[:, :30], cache=cache)
        steps = []
        for t in range(18):
            pos = start + t
            steps.append(model.step_logits(cache, ids.gather(1, pos[:, None])[:, 0], pos))
        runs.append((hidden, torch.stack(steps)))
    for hidden, steps in runs[1:]:
        assert torch.equal(runs[0][0], hidden)
        assert torch.equal(runs[0][1], steps)


def _wide(name: str):
    """The tiny architectures at hidden 64 and MLP width 128, the least the one-row kernels
    take (their int8 MMAs are 32 deep)."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from seqkv.core.models import from_objects

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128)
    torch.manual_seed(1)
    lm = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**common)),
          "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
              sliding_window=8, layer_types=["sliding_attention"] * 2 + ["full_attention"],
              **common)),
          "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),  # q, k, v biases
          "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**common))}[name]()  # q/k norms
    return from_objects(lm, None, f"wide-{name}")


@pytest.mark.parametrize("name", ["gemma3", "llama", "qwen2", "qwen3"])
def test_one_row_kernels_step_like_the_split_passes(name):
    """A one-stream decode (norm and GEMM, activation and GEMM in one kernel each) gives the
    logits of the same steps through the row passes and GEMMs apart, on every architecture
    (Gemma-3's post norms and sliding window, Qwen's biases and q/k norms); rows narrower
    than 64 keep the passes apart."""
    assert not IntModel(integerize(KERNEL_MODELS["llama"]().model), "cuda").row_linear
    model = IntModel(integerize(_wide(name).model), "cuda")
    assert model.row_linear
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4)).cuda()
    runs = []
    for one_row in (True, False):
        model.row_linear = one_row
        cache = model.new_cache(1, 48)
        model.prefill_hidden(ids[:, :12], cache=cache)
        runs.append(torch.stack([model.step_logits(cache, ids[:, t], torch.tensor([t]).cuda())
                                 for t in range(12, 40)]))
    assert torch.equal(runs[0], runs[1])


def _extreme_logits(g: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Q16 logits [rows, vocab] on the GPU: spreads from 2**12 to 2**19, all equal, a tie for
    the maximum, one huge maximum (every other token at the exp table's 0)."""
    spread = 2.0 ** (torch.arange(rows, dtype=torch.float64)[:, None] % 8 + 12)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * spread).to(torch.int64)
    logits[0] = 7
    logits[1, [3, vocab - 1]] = logits[1].max() + 1
    logits[2, vocab // 2] = 1 << 40
    return logits.to(CUDA)


def _corrupt_words(g: torch.Generator, n: int, low: int | None) -> np.ndarray:
    """n random words (the top bits set: states past 2**63) whose first state's quantile is
    ``low`` where given (the low 24 bits of the word below the top, or of the only one)."""
    w = torch.randint(0, 1 << 32, (n,), generator=g, dtype=torch.int64) | (1 << 31)
    if low is not None:
        below = max(n - 2, 0)
        w[below] = (w[below] & ~(TOTAL - 1)) | low
    return w.numpy().astype(np.uint32)


def test_locate_finds_the_tables_symbol():
    """The distribution kernels find the symbol, start and frequency the full table's
    cumulative search finds: random, flat, tied and peaked logits, quantiles at every edge;
    and the encoder's (start, freq) of given tokens (first, last, the argmax, random)."""
    model = IntModel(integerize(MODELS["llama"]().model), CUDA)
    g = torch.Generator().manual_seed(5)
    for vocab in (256, 5000, 49152):
        logits = _extreme_logits(g, 8, vocab)
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
def test_int8_linear_gives_split_linears_integers(rows, monkeypatch):
    """int8_linear equals model.split_linear at every tile shape it picks (16 and 64 rows,
    narrow and wide columns) and in either program order: random and extreme halves, widths
    that are not multiples of any tile (the 9,000-wide one takes the head's tiles), with and
    without a bias; as int32, the low 32 bits of the same integers."""
    from seqkv.engine.model import split_linear
    from seqkv.engine.weights import IntLinear

    g = torch.Generator().manual_seed(rows)
    for n, k in ((96, 576), (1000, 100), (576, 1536), (9000, 64)):
        hi = torch.randint(-64, 65, (rows, k), generator=g, dtype=torch.int8)
        lo = torch.randint(-64, 64, (rows, k), generator=g, dtype=torch.int8)
        hi[0], lo[0] = 64, 63  # the largest row: every product at its bound
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        w[: n // 2] = 127
        shift = torch.randint(0, 30, (rows, 1), generator=g)
        mant = torch.randint(1 << 20, 1 << 21, (n,), generator=g)
        exp = torch.randint(36, 44, (n,), generator=g)
        for bias in (None, torch.randint(-(1 << 20), 1 << 20, (n,), generator=g)):
            lin = IntLinear(w=w.cuda(), mant=mant.cuda(), exp=exp.cuda(),
                            bias=bias.cuda() if bias is not None else None)
            args = hi.cuda(), lo.cuda(), shift.cuda()
            want = split_linear(*args, lin)
            for n_fast_rows in (1 << 30, 0):
                monkeypatch.setattr(cuda_ops, "LINEAR_N_FAST_ROWS", n_fast_rows)
                got = cuda_ops.int8_linear(*args, lin.w, lin.scale, lin.bias)
                assert torch.equal(got, want)
                got = cuda_ops.int8_linear(*args, lin.w, lin.scale, lin.bias, torch.int32)
                assert got.dtype == torch.int32 and torch.equal(got, want.to(torch.int32))


def test_distribution_kernels_read_int32_logits():
    """locate, intervals and decode_step give the same integers from int32 logits as from
    the same logits in int64 (how the head hands them over where model.head_bound allows):
    flat, tied, spread and peaked rows up to 2**30."""
    model = IntModel(integerize(MODELS["llama"]().model), CUDA)
    assert model.logits_dtype == torch.int32
    g = torch.Generator().manual_seed(6)
    shift = FRAC - tables.EXP_STEP
    for vocab in (256, 49152):
        logits = _extreme_logits(g, 8, vocab).clamp(-(1 << 30), 1 << 30)
        narrow = logits.to(torch.int32)
        q = torch.randint(0, TOTAL, (8,), generator=g).cuda()
        q[0], q[1] = 0, TOTAL - 1
        assert torch.equal(cuda_ops.locate(narrow, q, model.exp_prob, shift, TOTAL),
                           cuda_ops.locate(logits, q, model.exp_prob, shift, TOTAL))
        tokens = torch.randint(0, vocab, (8,), generator=g).cuda()
        tokens[2] = logits[2].argmax()
        for x, y in zip(cuda_ops.intervals(narrow, tokens, model.exp_prob, shift, TOTAL),
                        cuda_ops.intervals(logits, tokens, model.exp_prob, shift, TOTAL),
                        strict=True):
            assert torch.equal(x, y)
        words = [_corrupt_words(g, 4, None) for _ in range(8)]
        runs = []
        for rows in (narrow, logits):
            decoder = VectorRansDecoder(words, CUDA)
            bufs = [torch.zeros(8, dtype=torch.long, device=CUDA),
                    torch.full((8,), 3, device=CUDA), torch.zeros(8, dtype=torch.long,
                                                                  device=CUDA),
                    torch.zeros(8, dtype=torch.long, device=CUDA),
                    torch.zeros((8, 4), dtype=torch.long, device=CUDA),
                    torch.zeros((8, 4, 2), dtype=torch.long, device=CUDA)]
            cuda_ops.decode_step(rows, model.exp_prob, shift, TOTAL, decoder, *bufs)
            runs.append([decoder.state, decoder.left, *bufs])
        for x, y in zip(*runs, strict=True):
            assert torch.equal(x, y)


def test_decode_step_equals_the_torch_tail():
    """cuda_ops.decode_step gives codec.advance_streams' integers after model.locate (tokens,
    (start, freq) rows, states, words left, ``bad``, positions, steps), step by step: sound
    streams of different lengths (one empty; those finishing early idle in place), refilling
    as their words run out; corrupt streams on either reserved symbol, past 2**63, with one or
    two words; flat, tied and peaked logits. The sound streams decode their tokens and end
    empty."""
    model = IntModel(integerize(MODELS["llama"]().model), CUDA)
    model.fused_locate = False  # the reference: locate_in_pmf on the full table
    g = torch.Generator().manual_seed(11)
    steps, lengths = 12, [12, 12, 3, 0, 1, 7, 12, 5, 12, 12, 12]
    sound = 8
    for vocab in (256, 5000):
        logits = torch.stack([_extreme_logits(g, len(lengths), vocab) for _ in range(steps)])
        pmf = model.pmf(logits.reshape(-1, vocab)).reshape(steps, len(lengths), -1).cpu()
        cdf = pmf.cumsum(-1) - pmf
        want, words = [], []
        for s, n in enumerate(lengths[:sound]):
            symbols = torch.randint(1, vocab + 1, (n,), generator=g)
            at = (torch.arange(n), s, symbols)
            want.append((symbols - 1).tolist())
            words.append(encode_stream("ans", cdf[at].numpy(), pmf[at].numpy()))
        words += [_corrupt_words(g, 6, 0), _corrupt_words(g, 2, TOTAL - 1),
                  _corrupt_words(g, 1, 0)]
        b = len(words)
        runs = []
        for _ in range(2):
            bufs = (torch.zeros(b, dtype=torch.long), torch.tensor(lengths),
                    torch.randint(0, vocab, (b,), generator=torch.Generator().manual_seed(1)),
                    torch.arange(b) * 3, torch.zeros((b, steps + 1), dtype=torch.long),
                    torch.zeros((b, steps + 1, 2), dtype=torch.long))
            runs.append((VectorRansDecoder(words, CUDA), [t.to(CUDA) for t in bufs]))
        (ref, ref_bufs), (fused, fused_bufs) = runs
        for t in range(steps):
            found = model.locate(logits[t], ref.quantile())
            advance_streams(ref, found, vocab + 2, *ref_bufs)
            cuda_ops.decode_step(logits[t], model.exp_prob, FRAC - tables.EXP_STEP, TOTAL,
                                 fused, *fused_bufs)
            for x, y in zip((ref.state, ref.left, ref.bad, *ref_bufs),
                            (fused.state, fused.left, fused.bad, *fused_bufs), strict=True):
                assert torch.equal(x, y), f"vocab {vocab}, step {t}"
        out = fused_bufs[4].cpu()
        assert [out[s, :n].tolist() for s, n in enumerate(lengths[:sound])] == want
        assert not fused.state[:sound].any() and not fused.left[:sound].any()
        assert fused.bad.tolist() == [False] * sound + [True] * (b - sound)


def test_fused_decode_step_decodes_like_the_torch_tail():
    """Decode groups (CUDA graphs on the GPU) stepping through cuda_ops.decode_step decode
    what the torch tail decodes: tokens, rows and the decoders' end states, with contexts,
    streams of different lengths and a corrupt one."""
    lm = MODELS["llama"]()
    model = IntModel(integerize(lm.model), CUDA)
    g = torch.Generator().manual_seed(12)
    full = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (20, 33, 7, 26)]
    cut = [5, 0, 2, 9]
    codec = EngineCodec(model, lm.prime_token(), pool_bytes=0)
    rows = codec.intervals(full, skip=cut)
    words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in rows[:3]]
    words.append(_corrupt_words(g, 9, None))
    lengths = [len(f) - c for f, c in zip(full, cut, strict=True)]
    contexts = [f[:c] for f, c in zip(full, cut, strict=True)]
    runs = []
    for fused in (True, False):
        model.fused_locate = fused
        decoder = VectorRansDecoder(words, CUDA)
        out = EngineCodec(model, lm.prime_token(), pool_bytes=0).decode_intervals(
            words, lengths, contexts, decoder=decoder)
        runs.append((out, decoder))
    (out, decoder), (want, ref) = runs
    assert [t for t, _ in out[:3]] == [f[c:] for f, c in zip(full[:3], cut[:3], strict=True)]
    for (tokens, r), (want_tokens, want_r) in zip(out, want, strict=True):
        assert tokens == want_tokens and np.array_equal(r, want_r)
    for x, y in ((decoder.state, ref.state), (decoder.left, ref.left), (decoder.bad, ref.bad)):
        assert torch.equal(x, y)


def test_graph_groups_round_streams_up_and_idle_the_extra_ones(monkeypatch):
    """On GPUs the codec rounds a decode group's streams up (a server's batches of 3 and 4
    requests share one group and its CUDA graphs): the extra streams idle through the
    captured steps, every stream decodes exactly, and a corrupt stream is refused."""
    import seqkv.engine.codec as codec_module

    made = []
    real_init = codec_module._DecodeGroup.__init__

    def counting_init(self, *args):
        made.append(args[1])
        real_init(self, *args)

    monkeypatch.setattr(codec_module._DecodeGroup, "__init__", counting_init)
    lm = MODELS["llama"]()
    model = IntModel(integerize(lm.model), CUDA)
    codec = EngineCodec(model, lm.prime_token())
    assert codec.graphs and codec._pool.round_streams
    g = torch.Generator().manual_seed(14)
    full = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (20, 33, 7, 26)]
    words = codec.encode(full)
    assert codec.decode(words[:3], [20, 33, 7]) == full[:3]
    assert codec.decode(words, [20, 33, 7, 26]) == full
    assert codec.decode(words[:3], [20, 33, 7]) == full[:3]
    assert made == [4]
    bad = [w.copy() for w in words[:3]]
    bad[1][0] ^= 0x5A5A5A5A
    with pytest.raises(BlobError):
        codec.decode(bad, [20, 33, 7])


def test_embed_rows_gives_the_embeddings_integers():
    """cuda_ops.embed_rows equals IntModel.embed: every token of each tiny model, ids of any
    shape, and random int16 tables with mantissas and exponents at the extremes (shifts from
    -70 to 70, products that wrap int64) at widths of one to several column blocks; ids out
    of range give zeros, not reads past the table."""
    g = torch.Generator().manual_seed(13)
    for name in sorted(MODELS):
        model = IntModel(integerize(MODELS[name]().model), CUDA)
        model.fused_embed = False  # (where the model would take the kernel itself)
        w = model.w
        for ids in (torch.arange(w.embed.shape[0]),
                    torch.randint(0, w.embed.shape[0], (3, 7), generator=g)):
            ids = ids.to(CUDA)
            got = cuda_ops.embed_rows(ids, w.embed, w.embed_mant, w.embed_exp, FRAC)
            assert torch.equal(got, model.embed(ids)), name
    vocab = 300
    for hidden in (1, 5, 576, 1030, 2304):
        table = torch.randint(-32768, 32768, (vocab, hidden), generator=g, dtype=torch.int16)
        table[0], table[1] = 32767, -32768
        mant = torch.randint(0, 1 << 15, (vocab,), generator=g)
        mant[:8] = torch.tensor([0, 1 << 15, (1 << 62) + 3, -(1 << 40), 1 << 47, 1, 3, 1 << 14])
        exp = torch.randint(FRAC - 70, FRAC + 70, (vocab,), generator=g)
        exp[:8] = FRAC + torch.tensor([0, 1, -1, 62, 63, -62, -63, 35])
        ids = torch.cat([torch.arange(vocab), torch.randint(0, vocab, (50,), generator=g)])
        table, mant, exp, ids = (t.to(CUDA) for t in (table, mant, exp, ids))
        weights = SimpleNamespace(embed=table, embed_mant=mant, embed_exp=exp)
        torch_model = SimpleNamespace(w=weights, fused_embed=False)
        want = IntModel.embed(torch_model, ids)  # the model's method on these tables
        assert torch.equal(cuda_ops.embed_rows(ids, table, mant, exp, FRAC), want), hidden
    outside = torch.tensor([-1, vocab, 1 << 40], device=CUDA)
    assert not cuda_ops.embed_rows(outside, table, mant, exp, FRAC).any()
