"""The delta tier: KV tensors stored as residuals from a predictor (arXiv 2604.15356, layer 2).

``compress_kv(kv, lm, predictor="recompute")`` codes a :class:`KVCache` (read from the
safetensors interchange format with ``load_cachefile``) exactly, or within
``max_abs_error``; ``decompress_kv(blob, lm)`` restores it.
"""

from .api import KIND, compress_kv, decompress_kv, inspect_delta_blob
from .cachefile import CacheFileError, KVCache, load_cachefile, parse_cachefile, save_cachefile
from .predictors import PREDICTORS, get_predictor

__all__ = [
    "KIND",
    "PREDICTORS",
    "CacheFileError",
    "KVCache",
    "compress_kv",
    "decompress_kv",
    "get_predictor",
    "inspect_delta_blob",
    "load_cachefile",
    "parse_cachefile",
    "save_cachefile",
]
