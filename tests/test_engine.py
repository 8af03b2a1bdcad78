"""The integer coder engine: one integer function, whatever the path, group or thread count."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from seqkv import compress_tokens, decompress_text, decompress_tokens, inspect_blob
from seqkv.core.blob import pack, unpack
from seqkv.core.errors import BlobError, ModelMismatchError, SeqkvError
from seqkv.core.models import ENGINE_WEIGHTS, from_objects
from seqkv.core.version import ENGINE_ID
from seqkv.engine import EngineCodec, IntModel, Unsupported, arch_spec, cpu_kernels, integerize
from seqkv.engine import model as model_module
from seqkv.engine.cpu_step import CpuStep
from seqkv.engine.intops import (
    RowGemm,
    kv_float16,
    kv_float64,
    kv_integers,
    round_kv,
    round_kv_reference,
)
from seqkv.engine.model import head_bound
from seqkv.tokens import compact as token_blob

from .conftest import memoize_method, tiny_gemma3, tiny_llama

GOLDEN = Path(__file__).parent / "golden"


def tiny_qwen(kind: str):
    common = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(7)
    if kind == "qwen2":  # biases on q, k, v
        return from_objects(Qwen2ForCausalLM(Qwen2Config(**common)), None, "tiny-qwen2")
    return from_objects(Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common)), None, "tiny-qwen3")


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3, "qwen2": lambda: tiny_qwen("qwen2"),
          "qwen3": lambda: tiny_qwen("qwen3")}


def _prefill_pmf(model: IntModel, ids: torch.Tensor) -> torch.Tensor:
    h = model.prefill_hidden(ids)
    rows = torch.cat([p for _, p in model.head_pmf(h.reshape(-1, h.shape[-1]))])
    return rows.reshape(*ids.shape, -1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prefill_equals_step_at_every_position(name):
    """The encoder's one prefill and the decoder's steps give the same integers everywhere;
    40 positions run well past the random Gemma-3's sliding window of 8."""
    lm = MODELS[name]()
    model = IntModel(integerize(lm.model))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 40), generator=g)
    prefill = _prefill_pmf(model, ids)
    cache = model.new_cache(3, 40)
    for t in range(40):
        step = model.pmf(model.step_logits(cache, ids[:, t], torch.full((3,), t)))
        assert torch.equal(step, prefill[:, t]), f"position {t}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_follows_the_float_model(name):
    lm = MODELS[name]()
    model = IntModel(integerize(lm.model))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    freq = _prefill_pmf(model, ids)[..., 1:-1].double() / 2**24
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits.double(), -1)
    kl = (logp.exp() * (logp - freq.log())).sum(-1)
    assert float(kl.max()) < 1e-3


def test_group_size_changes_nothing(llama):
    """A stream's frequencies alone equal its frequencies inside a padded group of 8, and
    streams coded together decode in groups of 1, 3 or 8 alike."""
    model = IntModel(integerize(llama.model))
    g = torch.Generator().manual_seed(3)
    streams = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (9, 30, 17, 1, 25, 4,
                                                                           30, 12)]
    alone = _prefill_pmf(model, torch.tensor([[1, *streams[1][:-1]]]))[0]
    group = torch.ones((8, 30), dtype=torch.long)
    for row, s in enumerate(streams):
        group[row, 1 : len(s)] = torch.tensor(s[:-1])
    assert torch.equal(_prefill_pmf(model, group)[1], alone)
    codec = EngineCodec(model, llama.prime_token())
    words = codec.encode(streams)
    assert [codec.encode([s])[0].tolist() for s in streams] == [w.tolist() for w in words]
    lengths = [len(s) for s in streams]
    for size in (1, 3, 8):
        out = []
        for start in range(0, 8, size):
            out += codec.decode(words[start : start + size], lengths[start : start + size])
        assert out == streams


def test_contexts_decode_like_a_continuation(llama):
    """Streams that continue a context (fed by prefill) decode as if stepped through it."""
    codec = EngineCodec(IntModel(integerize(llama.model)), llama.prime_token())
    g = torch.Generator().manual_seed(4)
    full = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (20, 33, 7)]
    cut = [5, 30, 2]
    rows = codec.intervals(full, skip=cut)
    whole = codec.intervals(full)
    for r, w, c in zip(rows, whole, cut, strict=True):
        assert np.array_equal(r, w[c:])
    from seqkv.core.decoders import encode_stream

    words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in rows]
    tails = codec.decode(words, [len(f) - c for f, c in zip(full, cut, strict=True)],
                         contexts=[f[:c] for f, c in zip(full, cut, strict=True)])
    assert tails == [f[c:] for f, c in zip(full, cut, strict=True)]


def test_kept_decode_groups_decode_later_streams_exactly(llama):
    """A codec that keeps its decode groups (as on GPUs, with their graphs) reloads them for
    each decode: streams of other lengths, contexts and a decoder carried across calls decode
    as by a fresh group, and a corrupt stream is still refused after a good one."""
    from seqkv.core.decoders import VectorRansDecoder, encode_stream

    model = IntModel(integerize(llama.model))
    kept = EngineCodec(model, llama.prime_token(), pool_bytes=1 << 30)
    g = torch.Generator().manual_seed(6)
    for n_tokens, cut in (((20, 33), (5, 0)), ((9, 40), (0, 12)), ((3, 3), (1, 1))):
        full = [torch.randint(3, 320, (n,), generator=g).tolist() for n in n_tokens]
        rows = kept.intervals(full, skip=list(cut))
        words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in rows]
        tails = kept.decode(words, [len(f) - c for f, c in zip(full, cut, strict=True)],
                            contexts=[f[:c] for f, c in zip(full, cut, strict=True)])
        assert tails == [f[c:] for f, c in zip(full, cut, strict=True)]
    # one decoder carried over two calls (the store's window rounds)
    full = [torch.randint(3, 320, (30,), generator=g).tolist() for _ in range(2)]
    words = kept.encode(full)
    decoder = VectorRansDecoder(words, model.device)
    first = kept.decode(words, [10, 10], decoder=decoder)
    rest = kept.decode(words, [20, 20], contexts=first, decoder=decoder)
    decoder.finish()
    assert [a + b for a, b in zip(first, rest, strict=True)] == full
    bad = [w.copy() for w in words]
    bad[1][0] ^= 0x5A5A5A5A
    with pytest.raises(BlobError):
        kept.decode(bad, [30, 30])


def test_a_kept_group_wider_than_its_decode_idles_the_extra_streams(llama, monkeypatch):
    """GPU pools round stream counts up, so a server's batches of 3 and of 4 requests share
    one group (and its graphs): the group's extra streams idle, every stream decodes exactly,
    a decoder carried across calls keeps its states, and a corrupt stream is refused."""
    import seqkv.engine.codec as codec_module
    from seqkv.core.decoders import VectorRansDecoder

    assert [codec_module.rounded_streams(n) for n in (1, 3, 16, 17, 64, 65, 200, 1000)] == [
        1, 4, 16, 32, 64, 72, 208, 1024]
    made = []
    real_init = codec_module._DecodeGroup.__init__

    def counting_init(self, *args):
        made.append(args[1])  # its streams
        real_init(self, *args)

    monkeypatch.setattr(codec_module._DecodeGroup, "__init__", counting_init)
    model = IntModel(integerize(llama.model))
    codec = EngineCodec(model, llama.prime_token(), pool_bytes=1 << 30)
    codec._pool.round_streams = True  # as on GPUs (CUDA graphs)
    g = torch.Generator().manual_seed(9)
    full = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (20, 33, 7, 26)]
    words = codec.encode(full)
    assert codec.decode(words[:3], [20, 33, 7]) == full[:3]
    assert codec.decode(words, [20, 33, 7, 26]) == full
    assert made == [4]
    decoder = VectorRansDecoder(words[:3], model.device)
    first = codec.decode(words[:3], [5, 5, 5], decoder=decoder)
    rest = codec.decode(words[:3], [15, 28, 2], contexts=first, decoder=decoder)
    decoder.finish()
    assert [a + b for a, b in zip(first, rest, strict=True)] == full[:3]
    assert made == [4]
    bad = [w.copy() for w in words[:3]]
    bad[2][0] ^= 0x5A5A5A5A
    with pytest.raises(BlobError):
        codec.decode(bad, [20, 33, 7])


def test_a_decode_out_of_memory_frees_the_kept_groups_and_runs_again(llama, monkeypatch):
    """A decode that runs out of memory (context prefill, graph capture) gives up the kept
    groups' memory and runs once more on a fresh group, exactly; with nothing kept to free,
    the error is the caller's. Mismatched counts are refused before any work."""
    import seqkv.engine.codec as codec_module

    model = IntModel(integerize(llama.model))
    codec = EngineCodec(model, llama.prime_token(), pool_bytes=1 << 30)
    g = torch.Generator().manual_seed(12)
    full = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (15, 9)]
    words = codec.encode(full)
    assert codec.decode(words[:1], [15]) == full[:1]  # a kept group of one stream
    real_run, failures = codec_module._DecodeGroup.run, []

    def run_once_out_of_memory(self, *args):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("simulated")
        return real_run(self, *args)

    monkeypatch.setattr(codec_module._DecodeGroup, "run", run_once_out_of_memory)
    assert codec.decode(words, [15, 9]) == full
    assert list(codec._pool.free) == [codec._pool.key(2, 16, max(w.size for w in words))]
    failures.clear()
    codec._pool.clear()
    with pytest.raises(torch.OutOfMemoryError):
        codec.decode(words, [15, 9])
    with pytest.raises(ValueError):
        codec.decode(words, [15])


def test_a_decode_continuing_the_last_skips_its_contexts_prefill(llama, monkeypatch):
    """A chat's edges decode one after another, each after the ids of those before it: a
    kept group whose cache already holds those ids is not prefilled again, and decodes
    exactly; streams of unequal lengths (idle steps past the shorter one) and a context the
    cache does not hold (prefilled) as well."""
    from seqkv.core.decoders import encode_stream

    model = IntModel(integerize(llama.model))
    codec = EngineCodec(model, llama.prime_token(), pool_bytes=1 << 30)
    prefills = []  # a decode's context prefills (the encoder's prefills write no cache)
    prefill = model.prefill_hidden
    monkeypatch.setattr(model, "prefill_hidden", lambda ids, cache=None, **k: (
        prefills.append(ids.shape) if cache is not None else None) or prefill(ids, cache, **k))
    g = torch.Generator().manual_seed(8)
    full = [torch.randint(3, 320, (60,), generator=g).tolist() for _ in range(2)]

    def decode(streams, cut, end):
        rows = codec.intervals([f[:e] for f, e in zip(streams, end, strict=True)],
                               skip=list(cut))
        words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in rows]
        return codec.decode(words, [e - c for c, e in zip(cut, end, strict=True)],
                            [f[:c] for f, c in zip(streams, cut, strict=True)], capacity=100)

    for cut, end in (((0, 0), (20, 12)), ((20, 12), (45, 30)), ((45, 30), (60, 60))):
        assert decode(full, cut, end) == [f[c:e] for f, c, e in zip(full, cut, end, strict=True)]
    assert prefills == []  # every context was in the group's cache
    other = [[3] * 10 + f[10:] for f in full]  # contexts the cache does not hold
    assert decode(other, (10, 10), (20, 20)) == [f[10:20] for f in full]
    assert prefills == [(2, 10)]


def test_decode_groups_are_reused_within_budget_and_never_after_a_failure(llama, monkeypatch):
    """Decodes of one shape share one kept group; a budget too small keeps none, the oldest
    goes first past it, and a group whose decode raised is not kept."""
    import seqkv.engine.codec as codec_module

    made = []
    real_init = codec_module._DecodeGroup.__init__

    def counting_init(self, *args):
        made.append(self)
        real_init(self, *args)

    monkeypatch.setattr(codec_module._DecodeGroup, "__init__", counting_init)
    model = IntModel(integerize(llama.model))
    g = torch.Generator().manual_seed(8)
    streams = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (12, 20)]
    for budget, groups in ((1 << 30, 1), (1, 3)):
        made.clear()
        codec = EngineCodec(model, llama.prime_token(), pool_bytes=budget)
        words = codec.encode(streams)
        for _ in range(3):
            assert codec.decode(words, [12, 20]) == streams
        assert len(made) == groups
    codec = EngineCodec(model, llama.prime_token(), pool_bytes=1 << 30)
    words = codec.encode(streams)

    def fail(n):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        codec.decode(words, [12, 20], progress=fail)
    assert not codec._pool.free
    codec._pool.budget = made[-1].nbytes + 1  # room for one group of two streams
    codec.decode(words, [12, 20])
    codec.decode([words[0]], [12])  # a second group: the first, older, goes
    assert list(codec._pool.free) == [codec._pool.key(1, 13, words[0].size)]


def test_kept_groups_on_the_float64_path_mask_stale_slots(monkeypatch):
    """The GPU's float64 attention reads the whole span, stale slots of earlier decodes
    included: with power-of-two spans as under graphs, Llama and Gemma-3 (window 8) decode
    every stream exactly through groups reused across lengths and contexts."""
    import seqkv.engine.codec as codec_module

    monkeypatch.setattr(codec_module.CpuStep, "for_model", staticmethod(lambda m: None))

    def span(self, step):
        need = max(self.start) + step + 1
        return min(1 << max(3, (need - 1).bit_length()), self.capacity)

    monkeypatch.setattr(codec_module._DecodeGroup, "_span", span)
    g = torch.Generator().manual_seed(9)
    for name in ("llama", "gemma3"):
        lm = MODELS[name]()
        codec = EngineCodec(IntModel(integerize(lm.model)), lm.prime_token(),
                            pool_bytes=1 << 30)
        for n, cut in ((40, 30), (12, 2), (33, 9), (5, 0)):
            full = [torch.randint(3, 256, (n,), generator=g).tolist() for _ in range(2)]
            rows = codec.intervals(full, skip=[cut, cut // 2])
            from seqkv.core.decoders import encode_stream

            words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in rows]
            tails = codec.decode(words, [n - cut, n - cut // 2],
                                 contexts=[full[0][:cut], full[1][: cut // 2]])
            assert tails == [full[0][cut:], full[1][cut // 2 :]]


def test_kept_groups_keep_the_rotary_tables_they_were_captured_with(llama):
    """A longer prefill replaces the rotary tables; the ones a kept group's graphs read by
    address stay alive."""
    import gc
    import weakref

    model = IntModel(integerize(llama.model))
    kept = EngineCodec(model, llama.prime_token(), pool_bytes=1 << 30)
    s = [torch.randint(3, 320, (20,)).tolist()]
    assert kept.decode(kept.encode(s), [20]) == s
    refs = [weakref.ref(t) for t in model.rope(model.spec.thetas[0], 1)]
    kept.encode([torch.randint(3, 320, (120,)).tolist()])  # a longer prefill rebuilds them
    gc.collect()
    assert model.rope(model.spec.thetas[0], 1)[0] is not refs[0]()
    assert all(r() is not None for r in refs)


_THREADS_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import LlamaConfig, LlamaForCausalLM
from seqkv import compress_tokens, decompress_tokens, from_objects
config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
model = LlamaForCausalLM(config)
model.load_state_dict(torch.load(sys.argv[2]))
lm = from_objects(model, None, "tiny")
ids = list(range(3, 300, 2))
if sys.argv[3] == "encode":
    open(sys.argv[4], "wb").write(compress_tokens(lm, ids, chunk_size=64))
else:
    assert decompress_tokens(lm, open(sys.argv[4], "rb").read()) == ids
    print("decoded")
"""


def test_any_thread_count(tmp_path):
    """Blobs coded with 1 and 2 CPU threads are the same bytes and decode under the other
    (torch fixes its thread pool per process, hence subprocesses)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    torch.manual_seed(5)
    torch.save(LlamaForCausalLM(config).state_dict(), tmp_path / "w.pt")
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)

    def run(threads: int, mode: str, blob: Path, kernels: str = "1") -> str:
        out = subprocess.run([sys.executable, str(script), str(threads), str(tmp_path / "w.pt"),
                              mode, str(blob)], capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads),
                                  "SEQKV_CPU_KERNELS": kernels})
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    run(1, "encode", tmp_path / "one.skv")
    run(2, "encode", tmp_path / "two.skv")
    assert (tmp_path / "one.skv").read_bytes() == (tmp_path / "two.skv").read_bytes()
    assert "decoded" in run(2, "decode", tmp_path / "one.skv")
    assert "decoded" in run(1, "decode", tmp_path / "two.skv")
    # The torch code alone (no CPU kernels) makes the same bytes and decodes the kernels' blob.
    run(2, "encode", tmp_path / "torch.skv", kernels="0")
    assert (tmp_path / "torch.skv").read_bytes() == (tmp_path / "one.skv").read_bytes()
    assert "decoded" in run(1, "decode", tmp_path / "two.skv", kernels="0")


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="no CPU kernels here (C compiler, AVX-512 VNNI or AVX2)")


@needs_kernels
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cpu_kernels_give_the_torch_integers(name, monkeypatch):
    """With the CPU kernels, the prefill's pmf and intervals at every position equal the torch
    code's (its MLP over blocks of 7 rows, against one block), and so does the kernels' decode
    step (CpuStep) at every position."""
    lm = MODELS[name]()
    model = IntModel(integerize(lm.model))
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(8))
    with monkeypatch.context() as patch:  # [gate | up] rows of int64
        patch.setattr(model_module, "CPU_MLP_BYTES", 7 * 8 * model.w.layers[0].gate_up.w.shape[0])
        fast = _prefill_pmf(model, ids)
        h = model.prefill_hidden(ids).reshape(-1, model.spec.hidden)
    fast_intervals = model.intervals(h, ids.reshape(-1))
    was = cpu_kernels.set_enabled(False)
    try:
        slow = _prefill_pmf(model, ids)
        slow_intervals = model.intervals(h, ids.reshape(-1))
    finally:
        cpu_kernels.set_enabled(was)
    assert torch.equal(fast, slow)
    assert all(torch.equal(a, b) for a, b in zip(fast_intervals, slow_intervals, strict=True))
    step = CpuStep.for_model(model)
    cache = step.new_cache(3, 40)
    for t in range(40):
        assert torch.equal(step.pmf(cache, ids[:, t], torch.full((3,), t)), slow[:, t]), t


@needs_kernels
def test_cpu_attention_kernel_equals_the_torch_attention(llama):
    """The prefill attention kernel gives _attend's integers: head widths on and off its
    column blocks, causal and sliding-window visibility, queries past the first key."""
    model = IntModel(integerize(llama.model))
    g = torch.Generator().manual_seed(10)
    qpos, kpos = torch.arange(5, 42).expand(2, 37), torch.arange(42).expand(2, 42)
    for d, bits in ((64, 12), (80, 12), (16, 20)):
        q = torch.randint(-(1 << bits), 1 << bits, (2, 2, 3, 37, d), generator=g)
        k, v = (torch.randint(-(1 << bits), 1 << bits, (2, 2, 42, d), generator=g)
                for _ in range(2))
        for window in (0, 9):
            ok = (kpos[:, None, :] <= qpos[:, :, None])
            if window:
                ok &= qpos[:, :, None] - kpos[:, None, :] < window
            allowed = ok[:, None, None]
            want = IntModel._attend(model, q, k, v, allowed)
            got = cpu_kernels.prefill_attention(q, k, v, allowed, model.exp_attn_f,
                                                model._index_scale, 16.0)
            assert torch.equal(got, want), (d, window)


@needs_kernels
def test_cpu_prefill_heads_at_the_bounds(llama):
    """The prefill's rotation kernel gives _heads' integers (rotated queries, keys and values
    rounded as caches hold them) for rows at the engine's bound and far past it (clamped),
    mixed with ordinary values, at positions that do not start at 0, into int64 and int32."""
    model = IntModel(integerize(llama.model))
    s, b, t = model.spec, 2, 13
    width = (s.n_heads + 2 * s.n_kv) * s.head_dim
    g = torch.Generator().manual_seed(12)
    sign = torch.randint(0, 2, (b, t, width), generator=g) * 2 - 1
    big = torch.rand((b, t, width), generator=g) < 0.5
    qkv = torch.where(big, sign << 45, torch.randint(-(1 << 20), 1 << 20, (b, t, width),
                                                     generator=g))
    pos = torch.arange(5, 5 + t).expand(b, t)
    cos, sin = model.rope(s.thetas[0], 5 + t)
    for kv_dtype in (torch.int64, torch.int32):
        want = IntModel._heads(model, qkv, cos, sin, pos, None, None, kv_dtype)
        got = model._cpu_heads(qkv, cos, sin, pos, None, None, kv_dtype)
        assert all(x.dtype == y.dtype and torch.equal(x, y)
                   for x, y in zip(got, want, strict=True)), kv_dtype


@needs_kernels
def test_cpu_decode_attention_at_the_bounds(llama):
    """The CPU decode step's attention kernel (rotation, cache write, attention over each
    stream's keys) gives the torch step's integers when queries, keys and values sit at the
    engine's bound (rows far past it, clamped), mixed with ordinary values: the products and
    sums at their largest."""
    model = IntModel(integerize(llama.model))
    step = CpuStep.for_model(model)
    s, b, cap = model.spec, 2, 24
    fast, slow = step.new_cache(b, cap), model.new_cache(b, cap)
    width = (s.n_heads + 2 * s.n_kv) * s.head_dim
    g = torch.Generator().manual_seed(11)
    for t in range(cap):
        sign = torch.randint(0, 2, (b, width), generator=g) * 2 - 1
        big = torch.rand((b, width), generator=g) < 0.5
        qkv = torch.where(big, sign << 45, torch.randint(-(1 << 20), 1 << 20, (b, width),
                                                         generator=g))
        pos = torch.full((b,), t)
        want = model.step_attend(0, qkv.clone(), slow, pos, cap)
        got = step.step_attend(0, qkv.clone(), fast, pos, cap)
        assert torch.equal(got, want), t


TIES = [sign * ((m << drop) + (1 << (drop - 1)))  # halfway between two KV_BITS-bit neighbours
        for drop in (1, 5, 12) for m in (1024, 1025, 2046, 2047) for sign in (1, -1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(1 << 23), 1 << 23), min_size=1, max_size=64))
def test_round_kv_is_its_integer_definition(xs):
    """round_kv (float16 conversions, as devices run it) gives round_kv_reference's integers
    for every key or value the engine makes (|x| <= 2**23): 11 significant bits, ties to
    even, and 2**23 itself, the largest a rounding can reach; and a float16 cache
    (kv_float16) holds exactly those integers."""
    xs = xs + TIES + [1 << 23, -(1 << 23), (1 << 23) - 1, 2047, 2048, 2049, 0]
    got = round_kv(torch.tensor(xs)).tolist()
    assert got == [round_kv_reference(x) for x in xs]
    assert all(abs(y - x) <= abs(x) >> 11 for x, y in zip(xs, got, strict=True))
    # GPU caches hold kv_float16: it keeps those integers exactly, read back either way
    cached = kv_float16(torch.tensor(xs))
    assert kv_float64(cached).tolist() == got and kv_integers(cached).tolist() == got


@needs_kernels
def test_cpu_linear_kernel_equals_rowgemm_at_extremes():
    """The kernel GEMM and rescaling give RowGemm's integers: saturated weights, rows of zeros
    and of extreme values, widths off the kernel's tiles, row counts across its blocks, and a
    depth whose sums pass int32 (4,100 products of 2**20: the AVX2 kernel's chunks)."""
    g = torch.Generator().manual_seed(9)
    for n, k in ((37, 70), (16, 64), (200, 1537), (24, 4100)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        w[0], w[1, ::2], w[n - 2], w[n - 1] = 127, -127, -128, 127
        mant = torch.randint(1 << 14, (1 << 15) + 1, (n,), generator=g).to(torch.float64)
        scale = torch.ldexp(mant, -torch.randint(12, 40, (n,), generator=g))
        bias = torch.randint(-(1 << 30), 1 << 30, (n,), generator=g)
        for m in (1, 3, 4, 5, 300):
            v = torch.randint(-(1 << 45), 1 << 45, (m, k), generator=g)
            v >>= torch.randint(0, 45, (m, 1), generator=g)
            v[0] = 0
            if m > 2:
                v[1], v[2, ::3] = 1 << 13, -(1 << 50)
                v[m - 1] = -(1 << 50)  # q = -2**13 at every k: times -128, 2**20 each
            for b in (bias, None):
                assert torch.equal(cpu_kernels.linear(v, w, scale, b),
                                   RowGemm(v, w, scale, b).all()), (n, k, m)


def tiny_gpt2():
    config = GPT2Config(vocab_size=200, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(6)
    return from_objects(GPT2LMHeadModel(config), None, "tiny-gpt2")


def test_uncovered_architecture_falls_back_and_records_threads():
    lm = tiny_gpt2()
    with pytest.raises(Unsupported):
        arch_spec(lm.config)
    assert lm.engine() is None
    ids = list(range(5, 90))
    blob = compress_tokens(lm, ids, chunk_size=40)
    info = inspect_blob(blob)
    assert info["format"] == "json" and info["numerics"]["procedure"] == "lockstep-v1"
    assert info["numerics"]["threads"] == torch.get_num_threads()
    assert decompress_tokens(lm, blob) == ids
    header, sections = unpack(blob)
    header["numerics"]["threads"] += 1
    with pytest.raises(ModelMismatchError, match="threads"):
        decompress_tokens(lm, pack({k: v for k, v in header.items() if k != "sections"},
                                   sections))
    with pytest.raises(SeqkvError, match="does not cover"):
        compress_tokens(lm, ids, procedure="engine")


def test_previous_format_blobs_decode_or_are_refused_by_name(llama):
    """seqkv 0.1 blobs (no thread count) decode when the numerics match; otherwise the error
    names their format rather than blaming corruption."""
    ids = list(range(3, 50))
    header, sections = unpack(compress_tokens(llama, ids, chunk_size=20, procedure="lockstep-v1"))
    del header["numerics"]["threads"]
    header = {k: v for k, v in header.items() if k != "sections"}
    assert decompress_tokens(llama, pack(header, sections)) == ids
    words = bytearray(sections[0])
    words[0] ^= 0x40
    with pytest.raises(BlobError, match="0.1's token format"):
        decompress_tokens(llama, pack(header, [bytes(words), *sections[1:]]))


def test_crafted_compact_headers_are_refused_or_exact(llama, monkeypatch):
    """10,000 checksum-valid edits of a compact blob's header: each is refused with seqkv's
    own error or decodes to exactly the original ids."""
    memoize_method(monkeypatch, EngineCodec, "decode", lambda self, words, lengths, *rest: (
        tuple(w.tobytes() for w in words), tuple(lengths)))
    ids = list(range(3, 40))
    blob = compress_tokens(llama, ids, chunk_size=16)
    header_end = len(blob) - 8 - 4 * (inspect_blob(blob)["bits"] // 32)
    rng = random.Random(7)
    outcomes = {"refused": 0, "exact": 0}
    for _ in range(10_000):
        data = bytearray(blob[:-8])
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(4, header_end)
            data[pos] = rng.randrange(256) if rng.random() < 0.5 else data[pos] ^ (
                1 << rng.randrange(8))
        if rng.random() < 0.2:  # also grow or shrink the header
            pos = rng.randrange(4, header_end)
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        crafted = bytes(data) + token_blob.short_hash(bytes(data))
        try:
            token_blob.unpack(crafted)
        except BlobError:
            outcomes["refused"] += 1
            continue
        try:
            got = decompress_tokens(llama, crafted)
        except SeqkvError:
            outcomes["refused"] += 1
            continue
        assert got == ids
        outcomes["exact"] += 1
    assert outcomes["refused"] > 9_000


@pytest.mark.slow
def test_golden_vectors(smollm2):
    """The engine's integer weights, every position's frequencies for a bundled text and a
    small committed blob: the same on every machine (checked on the H200 too, BENCHMARKS.md)."""
    golden = json.loads((GOLDEN / "smollm2_engine.json").read_text())
    engine = smollm2.engine()
    assert engine.digest.hex() == golden["weights_digest"]
    assert engine.digest[:8].hex() == ENGINE_WEIGHTS["smollm2-135m"]
    from seqkv.demo import bundled_text

    codec = EngineCodec(engine, smollm2.prime_token())
    ids = smollm2.tokenizer(bundled_text("brown_news")).input_ids
    assert len(ids) == golden["tokens"]
    assert codec.frequency_digest(ids) == golden["frequency_digest"]
    blob = (GOLDEN / "smollm2_news.skv").read_bytes()
    assert decompress_text(smollm2, blob) == bundled_text("brown_news")[: golden["blob_chars"]]
    # GPUs keep its logits in int32: the bound that allows it holds with room to spare
    assert head_bound(engine.w.final_norm, engine.w.head) < 2**28
    # earlier engines' golden blobs (1: int8 weights with an int8 residual; 2: keys and values
    # at full Q12 precision): refused by their format's name
    for version in (1, 2):
        old = (GOLDEN / f"smollm2_news_engine{version}.skv").read_bytes()
        with pytest.raises(BlobError, match=f"integer engine version {version}; this seqkv has "
                                            f"version {ENGINE_ID}"):
            decompress_text(smollm2, old)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_head_bound_holds_for_every_row(name):
    """head_bound, which lets GPUs keep logits in int32, bounds |logit| for rows built to
    reach it, and is within 2x of the largest: the largest head row over the gains (the
    norm's output then points along it), rows aligned with head rows' signs at every scale,
    one-hot rows (whose tiny norm rounds its divisor down) and random rows up to 2**40."""
    model = IntModel(integerize(MODELS[name]().model))
    bound = head_bound(model.w.final_norm, model.w.head)
    hidden = model.spec.hidden
    g = torch.Generator().manual_seed(0)
    w, gain = model.w.head.w.to(torch.int64), model.w.final_norm.gain
    j = (w.double().square().sum(dim=1).sqrt() * model.w.head.scale).argmax()
    rows = [(w[j : j + 1].double() / gain.double().clamp(min=1) * 2**30).to(torch.int64)]
    rows += [torch.sign(w[:64]) * torch.sign(gain) * (1 << s) for s in (0, 3, 10, 20, 40)]
    rows += [torch.eye(hidden, dtype=torch.int64)[:8] * v for v in (1, 7, 47, 1 << 30)]
    rows += [(torch.randn(64, hidden, generator=g, dtype=torch.float64) * 2.0**s).to(torch.int64)
             for s in (4, 16, 40)]
    top = max(model.head(r).abs().max().item() for r in rows)
    assert bound / 2.1 < top <= bound < 2**31
