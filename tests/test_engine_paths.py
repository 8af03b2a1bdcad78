"""The engine's GPU composition (each GEMM's rows split into int8 halves in the pass that makes
them: residual add + norm + split, activation + split) gives the CPU composition's integers
(the split inside the GEMM). Both are plain torch, so this runs on the CPU; the Triton kernels
that replace parts of the GPU path are checked against it in test_cuda_ops.py."""

import pytest
import torch

from seqkv.engine import IntModel, integerize

from .test_engine import MODELS


@pytest.mark.parametrize("name", sorted(MODELS))
def test_split_before_gemm_gives_the_same_integers(name):
    model = IntModel(integerize(MODELS[name]().model))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (3, 20), generator=g)
    runs = []
    for split in (False, True):
        model.split_before_gemm = split
        hidden = model.prefill_hidden(ids)
        cache = model.new_cache(3, 20)
        logits = [model.step_logits(cache, ids[:, t], torch.full((3,), t)) for t in range(20)]
        runs.append((hidden, model.head(hidden[:, -1]), torch.stack(logits)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][2][-1], runs[0][1])  # the last step is the prefill's last row


def test_prefill_refuses_ids_past_its_cache():
    """More positions or streams than the cache holds: a clear error, not writes past it (the
    GPU's rotation kernel writes without bounds checks)."""
    model = IntModel(integerize(MODELS["llama"]().model))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    for streams, capacity in ((2, 8), (1, 16)):
        with pytest.raises(ValueError, match="do not fit a cache"):
            model.prefill_hidden(ids, cache=model.new_cache(streams, capacity))
    model.prefill_hidden(ids, cache=model.new_cache(2, 9))


def test_gemm_tiles_fit_the_gpus_shared_memory():
    """The small-group GEMM tiles (cuda_ops._linear_tiles) take the deep tiles measured on the
    H200 only where a program's stages fit the GPU's shared memory with room to spare; on a
    GPU with less (an RTX 4090's 99 KB, a T4's 64 KB) they fall back to shallower ones."""
    from seqkv.engine import cuda_ops

    for shared in (232_448, 166_912, 101_376, 65_536):  # H200/H100, A100, RTX 4090/L4, T4
        for m, n, k in ((1, 960, 576), (16, 3072, 576), (4, 576, 1536), (1, 8192, 2048)):
            bm, bn, bk, _ = cuda_ops._linear_tiles(m, n, k, shared)
            assert cuda_ops._stages_bytes(bm, bn, bk) + cuda_ops.SHARED_MARGIN <= shared
        assert cuda_ops._linear_tiles(1, 960, 576, shared)[2] == (512 if shared > 150_000
                                                                   else 128)


def test_dependent_launch_only_for_small_groups_on_gpus_that_have_it(monkeypatch):
    """Programmatic dependent launch (cuda_ops.launch_options) is on for kernels of up to
    PDL_MAX_ROWS rows on a GPU with griddepcontrol, and off for larger groups (where it was
    measured slower), on CPUs (Triton's interpreter) and when switched off."""
    from seqkv.engine import cuda_ops

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(cuda_ops, "_has_pdl", lambda index: True)
    small, large = cuda_ops.PDL_MAX_ROWS, cuda_ops.PDL_MAX_ROWS + 1
    assert cuda_ops.launch_options(gpu, small) == {"PDL": True, "launch_pdl": True}
    assert cuda_ops.launch_options(gpu, large) == {"PDL": False, "launch_pdl": False}
    assert not cuda_ops.launch_options(torch.device("cpu"), 1)["PDL"]
    monkeypatch.setattr(cuda_ops, "_has_pdl", lambda index: False)  # before Hopper
    assert not cuda_ops.launch_options(gpu, 1)["PDL"]
    monkeypatch.setattr(cuda_ops, "_has_pdl", lambda index: True)
    monkeypatch.setattr(cuda_ops, "PDL", False)
    assert not cuda_ops.launch_options(gpu, 1)["launch_pdl"]
