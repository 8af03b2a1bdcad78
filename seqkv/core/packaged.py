"""What seqkv knows of its packaged models without loading one (no torch, no transformers):
the engine weights a compact blob names them by, and their KV geometry for size figures."""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"
GEMMA3 = "gemma3-270m"
NAMES = (DEFAULT_MODEL, GEMMA3)

# The engine's integer-weights digests of the packaged models (first 8 bytes, as compact
# blobs record them), so a header names its model without loading one. A test re-derives them.
ENGINE_WEIGHTS = {
    "smollm2-135m": "9443d4eb04ca4b7d",
    "gemma3-270m": "dce0a654c147ed7d",
}
# ... and under earlier engine versions, so a blob of one still names its model.
EARLIER_ENGINE_WEIGHTS = {
    1: {"smollm2-135m": "8cd0d9426fd40ea1", "gemma3-270m": "222edbe1f0df120b"},
}

# KV geometry of the packaged models: (layers, kv heads, head dim, sliding window per layer).
_PACKAGED_KV = {
    "smollm2-135m": (30, 3, 64, (None,) * 30),
    "gemma3-270m": (18, 1, 256, tuple(None if i % 6 == 5 else 512 for i in range(18))),
}


def model_name(engine_weights: bytes) -> str:
    """The packaged model whose engine weights begin with these bytes, or a description."""
    for table in (ENGINE_WEIGHTS, *EARLIER_ENGINE_WEIGHTS.values()):
        for name, digest in table.items():
            if engine_weights.hex() == digest:
                return name
    return f"unknown (engine weights {engine_weights.hex()})"


def packaged_kv_bits(name: str, n_tokens: int) -> tuple[int, int] | None:
    """(fp16 bits, 3-bit TurboQuant bits) of a packaged model's KV cache for n_tokens."""
    if name not in _PACKAGED_KV:
        return None
    layers, heads, dim, windows = _PACKAGED_KV[name]
    vectors = [2 * heads * (min(n_tokens, w) if w else n_tokens) for w in windows]
    return sum(v * dim * 16 for v in vectors), sum(v * (dim * 3 + 16) for v in vectors)
