"""seqkv.testing: the tiny model directory the server tests and the store benchmarks serve."""

import torch

from seqkv.testing import TINY_VOCAB, tiny_llama, tiny_llama_config, tiny_model_dir

from .conftest import tiny_llama as conftest_tiny_llama


def test_tiny_llama_is_conftests_and_leaves_the_rng_alone():
    """tests/conftest.py's tiny_llama (behind the ``llama`` fixture and most tests) is this
    one, its arguments passed through; drawn without moving the caller's torch RNG."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ours = tiny_llama(seed=3, vocab=300, max_pos=64)
    assert torch.equal(torch.get_rng_state(), before)
    theirs = conftest_tiny_llama(seed=3, vocab=300, max_pos=64).model
    assert theirs.config.to_dict() == ours.config.to_dict()
    assert ours.config.to_dict() == tiny_llama_config(300, 64).to_dict()
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(ours["lm_head.weight"],
                           tiny_llama(seed=4, vocab=300, max_pos=64).state_dict()["lm_head.weight"])


def test_tiny_model_dir_loads_as_a_model(tmp_path):
    from seqkv.core.models import load_model

    d = tiny_model_dir(tmp_path / "tiny")
    lm = load_model(str(d))
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog.").input_ids
    assert 0 < len(ids) < 12 and max(ids) < TINY_VOCAB  # trained on it: a few merged tokens
    assert lm.tokenizer.decode(ids) == "The quick brown fox jumps over the lazy dog."
    ref = tiny_llama().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in lm.model.state_dict().items())
