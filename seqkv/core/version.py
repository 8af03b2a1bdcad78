"""seqkv's version, recorded in the JSON headers it writes (importable from any layer)."""

__version__ = "0.1.0"
