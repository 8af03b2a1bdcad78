"""KV checkpoints at trie nodes, and which nodes deserve one (prior-guided vs LRU).

A checkpoint at a node of depth d holds the materialized serving KV of the node's path (the
cache one prefill of path[:d] produces: raw, in the model's dtype, or per-vector quantized with
``seqkv.quant``) and the path's token ids (4 bytes a token, beside ~23 KB of KV a token on
SmolLM2). Restoring a session then starts at its deepest checkpoint: the prefix ids come from
the checkpoint, only the edges below it are decoded (whose context needs at most ``chunk``
tokens before them, as the context resets at fixed positions), and only the suffix is prefilled
on top of the checkpoint's KV. With a raw checkpoint the result equals a full prefill bit for
bit (tested); a quantized one trades that for size.

Policies (arXiv 2604.06228, prior-guided caching): both see the same accesses and the same
byte budget and return the set of nodes to keep.

- :class:`LRUPolicy`: the node a restore ended at is admitted; least recently used goes first.
- :class:`PriorGuidedPolicy`: a node's value is its expected reuse times the restore compute
  it saves per byte. Expected reuse = observed hits + the prior's estimate, and the prior is
  the PLT's measure of the node: how many stored sessions pass through it (each is a future
  restore that would start there) weighted by the model's own probability of the path,
  2^(-bits/token) (a low-surprisal prefix, a template or system prompt, is likely to be sent
  again by sessions not yet seen). Greedy knapsack by value density under the budget; the
  saving of a node counts only the compute beyond its deepest kept ancestor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..compress import RestoredCache
from ..errors import BlobError, SeqkvError
from ..stepper import cache_kwarg


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def serialize_kv(
    cache: DynamicCache, quant: str | None = None, bits: float | None = None
) -> tuple[dict, bytes]:
    """A cache's K/V as bytes: raw safetensors, or each tensor per-vector quantized."""
    from safetensors.torch import save

    layers = cache_tensors(cache)
    if quant is None:
        tensors = {}
        for i, (k, v) in enumerate(layers):
            tensors[f"k{i}"], tensors[f"v{i}"] = k.contiguous().cpu(), v.contiguous().cpu()
        return {"format": "raw", "layers": len(layers), "kv_bits": sum(
            8 * t.numel() * t.element_size() for t in tensors.values())}, save(tensors)
    from ..quant import get_quantizer

    q = get_quantizer(quant, bits)
    parts, kv_bits = [], 0
    for k, v in layers:
        for t in (k, v):
            qt = q.quantize(t.float().cpu())
            kv_bits += qt.bits
            parts.append(qt.to_bytes())
    lengths = [len(p) for p in parts]
    meta = {"format": "quant", "method": quant, "bits": bits, "layers": len(layers),
            "parts": lengths, "kv_bits": kv_bits}
    return meta, b"".join(parts)


def deserialize_kv(meta: dict, data: bytes, config, dtype: torch.dtype, device) -> DynamicCache:
    cache = DynamicCache(config=config)
    if meta["format"] == "raw":
        from safetensors.torch import load

        tensors = load(data)
        for i in range(int(meta["layers"])):
            cache.update(tensors[f"k{i}"].to(device), tensors[f"v{i}"].to(device), i)
        return cache
    from ..quant import QuantizedTensor, get_quantizer

    q = get_quantizer(meta["method"], meta["bits"])
    pos, tensors = 0, []
    for n in meta["parts"]:
        tensors.append(q.dequantize(QuantizedTensor.from_bytes(data[pos : pos + n])).to(dtype))
        pos += n
    if pos != len(data):
        raise BlobError("corrupt checkpoint (part lengths)")
    for i in range(int(meta["layers"])):
        cache.update(tensors[2 * i].to(device), tensors[2 * i + 1].to(device), i)
    return cache


@torch.inference_mode()
def continue_prefill(model, cache: DynamicCache, ids: list[int], held: int) -> RestoredCache:
    """Prefill ids[held:] on top of a cache holding ids[:held]."""
    device = next(model.parameters()).device
    all_ids = torch.as_tensor([list(ids)], dtype=torch.long, device=device)
    if held == len(ids):
        # Nothing to run, but the next-token logits need the last token: drop its position and
        # run it again as one step (its K/V then come from a one-token step, not the prefill).
        cache.crop(-1)
        held -= 1
    out = model(input_ids=all_ids[:, held:], use_cache=True, logits_to_keep=1,
                **{cache_kwarg(model): cache})
    return RestoredCache(cache, all_ids, out.logits[:, -1])


# -- policies ------------------------------------------------------------------------------


@dataclass
class NodeInfo:
    """What a policy knows about a candidate node."""

    id: str
    depth: int
    bytes: int  # checkpoint size
    refs: int  # stored sessions through the node
    bits: float  # -log2 P_M(path) as coded
    hits: int = 0
    last: float = 0.0  # last access (logical clock)
    ancestors: list[str] = field(default_factory=list)  # candidate ids above it, nearest last


def restore_cost(
    depth: int, ckpt_depth: int, chunk: int, step_cost: float, prefill_cost: float
) -> float:
    """Restore compute (seconds, from measured unit costs) of a path of ``depth`` tokens when
    its deepest checkpoint is at ``ckpt_depth``: decode steps from the context window start,
    plus prefill of the suffix."""
    window = ckpt_depth - ckpt_depth % chunk if ckpt_depth else 0
    return (depth - window) * step_cost + (depth - ckpt_depth) * prefill_cost


@dataclass
class LRUPolicy:
    name: str = "lru"

    def select(self, nodes: dict[str, NodeInfo], kept: set[str], accessed: str | None,
               budget: int) -> set[str]:
        keep = set(kept) | ({accessed} if accessed else set())
        order = sorted(keep, key=lambda i: nodes[i].last)
        used = sum(nodes[i].bytes for i in keep)
        for i in order:
            if used <= budget:
                break
            keep.discard(i)
            used -= nodes[i].bytes
        return keep


@dataclass
class PriorGuidedPolicy:
    """Expected reuse (hits + prior_weight * refs * 2^-bits/token) x saving / bytes."""

    prior_weight: float = 1.0
    name: str = "prior"

    def expected_reuse(self, n: NodeInfo) -> float:
        per_token = n.bits / max(n.depth, 1)
        return n.hits + self.prior_weight * n.refs * (1.0 + 2.0 ** (-per_token))

    def select(self, nodes: dict[str, NodeInfo], kept: set[str], accessed: str | None,
               budget: int) -> set[str]:
        keep: set[str] = set()
        used = 0
        remaining = dict(nodes)
        while remaining:
            best, best_score = None, 0.0
            for i, n in remaining.items():
                if n.bytes > budget - used:
                    continue
                base = max((nodes[a].depth for a in n.ancestors if a in keep), default=0)
                score = self.expected_reuse(n) * (n.depth - base) / max(n.bytes, 1)
                if score > best_score:
                    best, best_score = i, score
            if best is None:
                break
            keep.add(best)
            used += nodes[best].bytes
            del remaining[best]
        return keep


def policy_by_name(name: str):
    if name == "lru":
        return LRUPolicy()
    if name in ("prior", "prior-guided"):
        return PriorGuidedPolicy()
    raise SeqkvError(f"unknown checkpoint policy {name!r} (lru, prior)")


def dumps(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True)
