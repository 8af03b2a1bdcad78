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
