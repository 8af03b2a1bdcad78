"""The delta tier: KV tensors stored as residuals from a predictor (arXiv 2604.15356, layer 2).

``compress_kv(kv, lm, predictor="recompute")`` codes a :class:`seqkv.core.cache.KVCache`
(read from the safetensors interchange format with ``seqkv.load_cachefile``) exactly, or
within ``max_abs_error`` or ``rel_mse``; ``decompress_kv(blob, lm)`` restores it.
"""

from .api import KIND, compress_kv, decompress_kv, inspect_delta_blob, needs_model, parse
from .header import predictor_of
from .predictors import PREDICTORS, Predictor, get_predictor, predictor_from_options

__all__ = [
    "KIND",
    "PREDICTORS",
    "Predictor",
    "compress_kv",
    "decompress_kv",
    "get_predictor",
    "inspect_delta_blob",
    "needs_model",
    "parse",
    "predictor_from_options",
    "predictor_of",
]
