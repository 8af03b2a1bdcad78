"""What a model's KV cache takes in bits, for the figures seqkv prints beside its own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerGeometry:
    kv_heads: int
    head_dim: int
    window: int | None  # sliding-window layers keep at most this many positions


def kv_geometry(config) -> list[LayerGeometry]:
    cfg = config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    return [
        LayerGeometry(kv_heads, head_dim, window if kind == "sliding_attention" else None)
        for kind in layer_types
    ]


def kv_vectors(config, n_tokens: int) -> list[tuple[int, int]]:
    """(number of K-or-V vectors, head_dim) per layer for a cache of n_tokens."""
    return [
        (2 * g.kv_heads * (min(n_tokens, g.window) if g.window else n_tokens), g.head_dim)
        for g in kv_geometry(config)
    ]


def fp16_kv_bits(config, n_tokens: int) -> int:
    return sum(n * d * 16 for n, d in kv_vectors(config, n_tokens))


def turboquant_kv_bits(config, n_tokens: int, bits: int = 3) -> int:
    """``bits`` per component plus one fp16 norm per vector (TurboQuant-mse, arXiv 2504.19874)."""
    return sum(n * (d * bits + 16) for n, d in kv_vectors(config, n_tokens))
