"""seqkv's version, recorded in the JSON headers it writes (importable from any layer)."""

__version__ = "0.1.0"

# The integer coder engine's version, recorded in blobs and stores: bump when any integer of
# its forward changes. 3: keys and values rounded to float16's precision (intops.round_kv),
# so GPU caches hold them in half the bytes. 2: int8 weights alone (engine 1 added an int8
# rounding residual: a third GEMM product per weight for 0.1% of bits). Blobs and stores of
# earlier engines are refused by name.
ENGINE_ID = 3


def engine_mismatch(engine: object, what: str) -> str | None:
    """The one-line refusal of a ``what`` ("blob", "store") coded by another engine version
    than this one, or None when it is this one's."""
    if engine == ENGINE_ID:
        return None
    return (f"{what} was coded by integer engine version {engine}; this seqkv has version "
            f"{ENGINE_ID} (read it with the seqkv that wrote it)")
