"""seqkv's version, recorded in the JSON headers it writes (importable from any layer)."""

__version__ = "0.1.0"

# The integer coder engine's version, recorded in blobs and stores: bump when any integer of
# its forward changes. 2: int8 weights alone (engine 1 added an int8 rounding residual: a
# third GEMM product per weight for 0.1% of bits); engine 1's blobs and stores are refused by
# name.
ENGINE_ID = 2
