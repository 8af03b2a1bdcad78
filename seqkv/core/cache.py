"""KV caches as every tier sees them: the tensors, how one is computed, and its file format.

- :class:`KVCache`: token ids and per-layer key/value tensors, whatever computed them;
- :func:`prefill_cache`: the cache of some ids by one prefill, as a serving engine computes it
  (:class:`RestoredCache`: that cache, its ids and the next-token logits);
- :func:`token_hash`: the hash of a token sequence that blobs and store records check;
- cache files: the safetensors interchange format a serving engine would export:
  ``input_ids`` (int64, [1, T]) and, for each layer i, ``layers.{i}.keys`` and
  ``layers.{i}.values`` ([1, kv_heads, T_i, head_dim], any float dtype; T_i <= T, as a
  sliding-window layer keeps only its window).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from .blob import read_file, write_atomic
from .errors import SeqkvError
from .stepper import cache_kwarg

FLOAT_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# Names of the float dtypes a cache is stored or recomputed in (CLI options, blob headers).
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "float32": "float32"}
_KEY = re.compile(r"^layers\.(\d+)\.(keys|values)$")


class CacheFileError(SeqkvError):
    """A cache file is missing, malformed, or not in the interchange format."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise CacheFileError(
            f"unsupported KV dtype {name}; supported: {', '.join(FLOAT_DTYPES)}"
        )
    return name


@dataclass
class KVCache:
    """Token ids and per-layer key/value tensors [1, kv_heads, T_i, head_dim]."""

    input_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __post_init__(self) -> None:
        validate(self)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Keys and values interleaved: layer 0 keys, layer 0 values, layer 1 keys, ..."""
        return [t for kv in zip(self.keys, self.values, strict=True) for t in kv]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @classmethod
    def from_tensors(cls, input_ids: list[int], tensors: list[torch.Tensor]) -> KVCache:
        return cls(list(input_ids), list(tensors[0::2]), list(tensors[1::2]))

    @classmethod
    def from_dynamic(cls, cache, input_ids, dtype: torch.dtype | None = None) -> KVCache:
        """From a transformers DynamicCache (and the ids it holds), cast to ``dtype``."""
        ids = input_ids.reshape(-1).tolist() if torch.is_tensor(input_ids) else list(input_ids)
        keys, values = [], []
        for layer in cache.layers:
            k, v = layer.keys.detach().cpu(), layer.values.detach().cpu()
            keys.append((k if dtype is None else k.to(dtype)).clone().contiguous())
            values.append((v if dtype is None else v.to(dtype)).clone().contiguous())
        return cls(ids, keys, values)

    def equal_bits(self, other: KVCache) -> bool:
        """True when ids, shapes, dtypes and every tensor's bit pattern are identical."""
        if self.input_ids != other.input_ids or len(self.keys) != len(other.keys):
            return False
        for a, b in zip(self.tensors, other.tensors, strict=True):
            if a.dtype != b.dtype or a.shape != b.shape:
                return False
            if not torch.equal(int_view(a), int_view(b)):
                return False
        return True


def dtype_alias(name: str, what: str = "dtype") -> str:
    """The torch name of a float dtype given as bf16, fp16 or fp32 (or a longer alias)."""
    try:
        return DTYPE_ALIASES[name]
    except KeyError:
        raise SeqkvError(f"{what} must be one of bf16, fp16, fp32, not {name!r}") from None


def token_hash(ids: Sequence[int]) -> str:
    """The hash of a token sequence recorded in JSON blob headers and store records."""
    data = np.asarray(ids, dtype="<i8").tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class RestoredCache:
    """A cache rebuilt from a blob: the DynamicCache, its ids [1, T] and the next-token logits."""

    cache: DynamicCache
    input_ids: torch.Tensor
    next_logits: torch.Tensor


@torch.inference_mode()
def prefill_cache(model: torch.nn.Module, ids: Sequence[int]) -> RestoredCache:
    """The cache of ``ids`` by one prefill, as a serving engine would compute it."""
    device = next(model.parameters()).device
    input_ids = torch.as_tensor([list(ids)], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                **{cache_kwarg(model): cache})
    return RestoredCache(cache, input_ids, out.logits[:, -1])


def int_view(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor as signed integers of the same width."""
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def validate(kv: KVCache) -> None:
    if len(kv.keys) != len(kv.values):
        raise CacheFileError("a cache needs as many value tensors as key tensors")
    if any(not isinstance(i, int) or i < 0 for i in kv.input_ids):
        raise CacheFileError("input_ids must be non-negative integers")
    n = len(kv.input_ids)
    for i, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        for name, t in (("keys", k), ("values", v)):
            where = f"layers.{i}.{name}"
            if not isinstance(t, torch.Tensor):
                raise CacheFileError(f"{where}: not a tensor")
            dtype_name(t.dtype)
            if t.dim() != 4 or t.shape[0] != 1:
                raise CacheFileError(
                    f"{where}: expected shape [1, kv_heads, T, head_dim], got {tuple(t.shape)}"
                )
            if t.shape[2] > n:
                raise CacheFileError(f"{where}: holds {t.shape[2]} positions but there are "
                                     f"only {n} input_ids")
        if k.shape[:3] != v.shape[:3]:
            raise CacheFileError(f"layers.{i}: keys {tuple(k.shape)} and values "
                                 f"{tuple(v.shape)} disagree on heads or positions")


def save_cachefile(path: str | os.PathLike, kv: KVCache) -> None:
    from safetensors.torch import save

    tensors = {"input_ids": torch.tensor([kv.input_ids], dtype=torch.int64).reshape(1, -1)}
    for i, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        tensors[f"layers.{i}.keys"] = k.contiguous()
        tensors[f"layers.{i}.values"] = v.contiguous()
    write_atomic(path, save(tensors, metadata={"format": "seqkv-kv-cache-v1"}))


def load_cachefile(path: str | os.PathLike) -> KVCache:
    return parse_cachefile(read_file(path, "cache file"), str(path))


def parse_cachefile(data: bytes, name: str = "cache file") -> KVCache:
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise CacheFileError(f"{name} is not a safetensors file ({str(e)[:80]})") from e
    if "input_ids" not in tensors:
        raise CacheFileError(f"{name} has no input_ids tensor")
    ids = tensors.pop("input_ids")
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != 1:
        raise CacheFileError(f"{name}: input_ids must be int64 of shape [1, T], "
                             f"got {ids.dtype} {tuple(ids.shape)}")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise CacheFileError(f"{name}: unexpected tensor {key!r}")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if sorted(layers) != list(range(len(layers))):
        raise CacheFileError(f"{name}: layer indices are not 0..{len(layers) - 1}")
    keys, values = [], []
    for i in range(len(layers)):
        if set(layers[i]) != {"keys", "values"}:
            raise CacheFileError(f"{name}: layer {i} lacks keys or values")
        keys.append(layers[i]["keys"])
        values.append(layers[i]["values"])
    return KVCache(ids.reshape(-1).tolist(), keys, values)
