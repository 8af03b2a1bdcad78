"""The numerics a recomputation runs in, built the way an engine builds its model, and the
search for the numerics a cache was made in.

A serving engine loads a model in its dtype with ``from_pretrained(..., dtype=bf16)``: the
weights are bf16, but buffers keep the dtype the model class gives them (Llama's RoPE
inverse frequencies stay fp32). ``model.to(bf16)`` casts those buffers too, and the rotary
angles then differ in the third significant digit: a cache made one way is not predicted
exactly by a model made the other way (0.6978 vs 0.6992 for SmolLM2's second frequency).
So a variant is built one of two ways, and the way is recorded:

- ``loaded``: as ``from_pretrained(dtype=...)`` builds it (the model class instantiated
  under that dtype, the weights copied in; buffers as the class makes them);
- ``cast``: ``copy.deepcopy(model).to(dtype)``: every float buffer cast as well.

``search`` runs each candidate over the first few layers only (their K/V do not depend on
the later layers, so stopping the forward there gives the same bits as a full prefill) and
keeps the one whose residual costs least.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..core.models import LoadedModel

BUILDS = ("loaded", "cast")
SAMPLE_LAYERS = 4  # layers the search runs each candidate over
_VARIANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: copy}


def dtype_of(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _loaded(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """``model`` rebuilt as ``from_pretrained(dtype=dtype)`` would build it."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x: initialize, then overwrite
        from contextlib import nullcontext as no_init_weights
    config = copy.deepcopy(model.config)  # from_config writes the dtype into its config
    with no_init_weights():
        out = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.load_state_dict(model.state_dict())
    return out.to(next(model.parameters()).device).eval()


def _cast(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    return copy.deepcopy(model).to(getattr(torch, dtype)).eval()


def variant(lm: LoadedModel, dtype: str, build: str, attn: str | None) -> torch.nn.Module:
    """lm's model in ``dtype`` built the ``build`` way with attention ``attn`` (None: the
    model's own). lm's model itself where nothing differs; copies are kept for reuse (two at
    most) and never change lm's model."""
    here = dtype_of(lm.model)
    own_attn = lm.config._attn_implementation
    if dtype == here and build == "loaded" and attn in (None, own_attn):
        return lm.model
    store = _VARIANTS.setdefault(lm.model, {})
    key = (dtype, build)
    if key not in store:
        if len(store) >= 2:
            store.pop(next(iter(store)))
        if dtype == here and build == "loaded":
            store[key] = copy.deepcopy(lm.model)
        else:
            store[key] = (_loaded if build == "loaded" else _cast)(lm.model, dtype)
    model = store[key]
    want = attn or own_attn
    if model.config._attn_implementation != want:
        model.set_attn_implementation(want)
    return model


def builds_differ(lm: LoadedModel, dtype: str) -> bool:
    """Whether the cast build differs from the loaded one (some float buffer in another dtype)."""
    model = variant(lm, dtype, "loaded", None)
    target = getattr(torch, dtype)
    return any(b.is_floating_point() and b.dtype != target for b in model.buffers())


class _Enough(Exception):
    """Raised by a hook once the sampled layers have run."""


def _decoder_layers(model: torch.nn.Module):
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


@torch.inference_mode()
def prefill_kv(model: torch.nn.Module, ids: list[int],
               n_layers: int | None = None) -> list[torch.Tensor]:
    """K and V of the first ``n_layers`` layers (None: all) of a prefill of ``ids``: the same
    call as seqkv.core.cache.prefill_cache, stopped after layer n_layers - 1."""
    from transformers import DynamicCache

    from ..core.stepper import cache_kwarg

    device = next(model.parameters()).device
    input_ids = torch.as_tensor([list(ids)], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    layers = _decoder_layers(model)
    hook = None
    if n_layers is not None and layers is not None and n_layers < len(layers):
        def stop(*_):
            raise _Enough

        hook = layers[n_layers - 1].register_forward_hook(stop)
    try:
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
              **{cache_kwarg(model): cache})
    except _Enough:
        pass
    finally:
        if hook is not None:
            hook.remove()
    out = []
    for layer in cache.layers[: n_layers if n_layers is not None else len(cache.layers)]:
        if getattr(layer, "keys", None) is None:
            break
        out += [layer.keys, layer.values]
    return out


def residual_cost(x: torch.Tensor, pred: torch.Tensor) -> tuple[float, int]:
    """sum(log2(1 + |residual|)) of the bit patterns (a proxy for the coded bits) and the
    number of values that differ; (inf, numel) when the shapes differ."""
    from .residual_coding import to_ordered

    if tuple(pred.shape) != tuple(x.shape):
        return math.inf, x.numel()
    r = to_ordered(x) - to_ordered(pred.detach().to("cpu", x.dtype).contiguous())
    r = np.abs(np.asarray(r, dtype=np.float64))
    return float(np.log2(1.0 + r).sum()), int(np.count_nonzero(r))


@dataclass
class Candidate:
    dtype: str
    attn: str | None
    build: str
    bits_per_component: float = math.inf
    exact: bool = False

    def record(self) -> dict:
        bits = self.bits_per_component
        return {"dtype": self.dtype, "attn": self.attn, "build": self.build,
                "bits_per_component": round(bits, 4) if math.isfinite(bits) else None,
                "exact": self.exact}


def candidates(lm: LoadedModel, cache_dtype: torch.dtype, dtype: str | None, attn: str | None,
               build: str | None) -> list[Candidate]:
    """What the search tries: the cache's dtype (bf16 for an fp8 cache) with each attention
    path and each build, then the model's own dtype with seqkv's default attention. Fixed
    choices (not None) restrict it."""
    here = dtype_of(lm.model)
    stored = str(cache_dtype).removeprefix("torch.")
    engine = stored if stored in ("bfloat16", "float16", "float32") else "bfloat16"
    dtypes = [dtype] if dtype is not None else list(dict.fromkeys([engine, here]))
    out: list[Candidate] = []
    for d in dtypes:
        if attn is not None:
            attns: list[str | None] = [attn]
        elif d == engine:
            attns = ["sdpa", "eager"]
        else:
            attns = [None]  # the model's own dtype: seqkv's repeatable default
        builds = [build] if build is not None else (
            list(BUILDS) if builds_differ(lm, d) else ["loaded"])
        out += [Candidate(d, a, b) for b in builds for a in attns]
    return out


def search(lm: LoadedModel, tensors: list[torch.Tensor], ids: list[int],
           cands: list[Candidate], run) -> list[Candidate]:
    """Each candidate's residual over the first SAMPLE_LAYERS layers; best first (stable:
    ties keep the candidates' order). ``run(candidate, n_layers)`` gives its prediction."""
    n = min(SAMPLE_LAYERS, len(tensors) // 2)
    sample = tensors[: 2 * n]
    numel = max(1, sum(t.numel() for t in sample))
    for c in cands:
        pred = run(c, n)
        if len(pred) < len(sample):
            c.bits_per_component, c.exact = math.inf, False
            continue
        costs = [residual_cost(x, p) for x, p in zip(sample, pred, strict=False)]
        c.bits_per_component = sum(b for b, _ in costs) / numel
        c.exact = all(d == 0 for _, d in costs)
    return sorted(cands, key=lambda c: c.bits_per_component)
