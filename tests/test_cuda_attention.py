"""The engine's attention kernels (seqkv/engine/cuda_attention.py) give the torch path's integers.

They run only on CUDA GPUs, so these tests skip elsewhere (CI has no GPU); they are run on the
H200 and reported in BENCHMARKS.md.
"""

import pytest
import torch

from seqkv.engine import IntModel, cuda_attention, integerize
from seqkv.engine.cuda_ops import available
from seqkv.engine.model import FRAC, QKV_FRAC

from .test_cuda_ops import KERNEL_MODELS, cached

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not available(
    torch.device("cuda")), reason="needs a CUDA GPU with Triton")


@pytest.mark.parametrize("name", sorted(KERNEL_MODELS))
def test_prefill_kernel_gives_the_torch_integers(name):
    """A prefill through the attention kernel equals the torch path's query blocks, for
    uneven lengths (not multiples of the kernel's blocks) and past the random Gemma-3's
    sliding window of 8; with the cache written, as a decode group's context is."""
    model = IntModel(integerize(KERNEL_MODELS[name]().model), "cuda")
    if not model.fused_prefill:
        pytest.skip("head width outside the kernel's")
    g = torch.Generator().manual_seed(4)
    for b, t in ((1, 1), (3, 37), (2, 70)):
        ids = torch.randint(0, 256, (b, t), generator=g).cuda()
        runs = []
        for fused in (True, False):
            model.fused_prefill = fused
            cache = model.new_cache(b, t + 2)
            runs.append((model.prefill_hidden(ids, cache=cache), cache))
        (fused_h, fused_cache), (torch_h, torch_cache) = runs
        assert torch.equal(fused_h, torch_h)
        for i in range(model.spec.n_layers):
            assert torch.equal(fused_cache.keys[i], torch_cache.keys[i])


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int64, torch.int32, torch.float64])
def test_prefill_kernel_at_the_bounds(window, kv_dtype):
    """Queries after earlier keys (S > T), keys at the engine's |x| bound, strided keys and
    values (a transposed view, as the model passes them) and every cache dtype (float16 as
    intops.kv_float16 holds them; integer ones at full width, for the sums' bounds): the same
    integers as IntModel._attend."""
    from .test_engine import MODELS

    model = IntModel(integerize(MODELS["llama"]().model), "cuda")
    g = torch.Generator().manual_seed(9)
    lim = model._qkv_limit
    b, n_kv, rep, d, s, t = 2, 2, 3, 64, 75, 40
    q = torch.randint(-lim, lim + 1, (b, n_kv, rep, t, d), generator=g)
    k = torch.randint(-lim, lim + 1, (b, s, n_kv, d), generator=g).transpose(1, 2)
    v = torch.randint(-lim, lim + 1, (b, s, n_kv, d), generator=g).transpose(1, 2)
    q[0, 0, 0, 0], k[0, 0, :3] = lim, lim  # products and sums at their largest
    q[1, 1, 2, -1] = 0  # every score equal
    q, k, v = q.cuda(), cached(k.cuda(), kv_dtype), cached(v.cuda(), kv_dtype)
    qpos = torch.arange(s - t, s, device="cuda")[:, None]
    kpos = torch.arange(s, device="cuda")[None, :]
    allowed = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
    want = model._attend(q, k, v, allowed.expand(b, 1, 1, t, s))
    got = cuda_attention.prefill_attention(q, k, v, window, model.exp_attn_f,
                                           model._index_scale_t, 1 << (FRAC - QKV_FRAC))
    assert torch.equal(got, want)


def test_prefill_kernel_past_a_grid_axis_limit():
    """More (stream, head) pairs than a CUDA grid's second axis holds (65,535): short streams
    in one large prefill, as the store's compaction makes them."""
    from .test_engine import MODELS

    model = IntModel(integerize(MODELS["llama"]().model), "cuda")
    g = torch.Generator().manual_seed(5)
    b, n_kv, rep, d, t = 22_000, 1, 3, 16, 2
    q = torch.randint(-999, 1000, (b, n_kv, rep, t, d), generator=g).cuda()
    k, v = (torch.randint(-999, 1000, (b, n_kv, t, d), generator=g).cuda() for _ in range(2))
    pos = torch.arange(t, device="cuda")
    allowed = (pos[None, :] <= pos[:, None]).expand(b, 1, 1, t, t)
    got = cuda_attention.prefill_attention(q, k, v, 0, model.exp_attn_f, model._index_scale_t,
                                           1 << (FRAC - QKV_FRAC))
    assert torch.equal(got, model._attend(q, k, v, allowed))


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int32])
@pytest.mark.parametrize("major", [False, True])
@pytest.mark.parametrize("programs", [2048, 1])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_kernels_at_the_bounds(programs, window, major, kv_dtype, monkeypatch):
    """One step's attention over queries, keys and values at the engine's |x| bound, with
    split heads and with one program per head (as large groups run), and over a key-major
    copy of the keys (as groups of KEY_MAJOR_MIN_STREAMS run: the copy stale in each stream's
    last run, which the kernel reads from the rows, and copies over where it is whole): the
    torch path's integers, split for the o projection; over float16 caches as the engine
    keeps them, and int32 ones at full width."""
    from seqkv.engine.intops import split_rows

    from .test_engine import MODELS

    monkeypatch.setattr(cuda_attention, "TARGET_PROGRAMS", programs)
    model = IntModel(integerize(MODELS["llama"]().model), "cuda")
    g = torch.Generator().manual_seed(11)
    lim = model._qkv_limit
    b, n_kv, rep, d, cap = 3, 2, 3, 64, 75
    q = torch.randint(-lim, lim + 1, (b, n_kv, rep, 1, d), generator=g)
    k = torch.randint(-lim, lim + 1, (b, n_kv, cap, d), generator=g)
    v = torch.randint(-lim, lim + 1, (b, n_kv, cap, d), generator=g)
    q[0, 0, 0, 0], k[0, 0, :3], v[0, 0, :5] = lim, lim, -lim  # products at their largest
    q[1, 1, 2] = 0  # every score equal
    k, v = cached(k, kv_dtype), cached(v, kv_dtype)
    copy = cuda_attention.major_keys(b, n_kv, cap, d, "cpu", kv_dtype)
    run = cuda_attention.major_run(copy)
    pos = torch.tensor([cap - 1, 3 * run - 1, 3])  # stream 1: its third run just whole
    kpos = torch.arange(cap)[None, :]
    allowed = (kpos <= pos[:, None]) & ((pos[:, None] - kpos < window) if window else True)
    q, k, v, pos, allowed, copy = (x.to(model.device) for x in (q, k, v, pos, allowed, copy))
    want = split_rows(model._attend(q, k, v, allowed[:, None, None, None, :])[:, 0])
    if major:
        cuda_attention.fill_major(copy, k)
        for i, p in enumerate(pos.tolist()):
            copy[i, :, :, p - p % run :] = 777  # the last run: not in the copy yet
    got = cuda_attention.decode_attention(q, k, v, pos, window, model.exp_attn_f,
                                          model._index_scale_t, 1 << (FRAC - QKV_FRAC),
                                          major=copy if major else None)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    if major:  # the whole run copied over (stream 1), the others left
        whole = 3 * run
        kk = k[1, :, :whole]
        assert torch.equal(copy[1, :, :, :whole],
                           kk.reshape(n_kv, whole, d // 4, 4).transpose(1, 2))
        last = (cap - 1) - (cap - 1) % run
        assert (copy[0, :, :, last:] == 777).all() and (copy[2, :, :, :] == 777).all()
