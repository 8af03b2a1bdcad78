"""The main job: compress real texts to their tokens, restore their KV caches, verify them.

For each text: bits per token of the blob beside what the same cache takes as fp16 KV and
as 3-bit TurboQuant KV, the time to compress and to restore (decode tokens, then prefill),
and three checks: the text comes back byte for byte, the restored cache equals the original
(a prefill of the text) bit for bit, and greedy generation continues exactly as from it.
The blob is decoded once: the restored ids give back both the cache and the text.

By default each bundled text is cut to its opening paragraphs (``SHORT_CHARS``), so the
demo runs in about a minute on a 2-core CPU; ``full=True`` takes the whole texts.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from .blobs import inspect_blob
from .core.cache import RestoredCache, prefill_cache
from .core.models import LoadedModel
from .core.stepper import cache_kwarg
from .core.textcodec import encode_text
from .tokens.api import compress_cache, restore_cache, text_of

BUNDLED = ("brown_news", "brown_fiction", "python_tutorial")
SHORT_CHARS = 400  # the default run: each bundled text's opening paragraphs, this long at least


def bundled_text(name: str, full: bool = True) -> str:
    """A bundled text (Brown news and fiction, the Python tutorial): whole, or its opening
    paragraphs of at least ``SHORT_CHARS`` characters."""
    text = resources.files("seqkv.data").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return text if full else opening(text, SHORT_CHARS)


def opening(text: str, chars: int) -> str:
    """The whole paragraphs that begin ``text`` and first reach ``chars`` characters."""
    end = text.find("\n\n", chars)
    return text if end < 0 else text[:end + 1]


@dataclass
class DemoRow:
    text: str
    tokens: int
    bits_per_token: float
    model_bits_per_token: float
    blob_bytes: int
    fp16_kv_bytes: int
    turboquant3_kv_bytes: int
    ratio_vs_fp16: float
    ratio_vs_turboquant3: float
    compress_s: float
    restore_s: float
    text_exact: bool
    cache_exact: bool
    continuation_exact: bool

    @property
    def exact(self) -> bool:
        return self.text_exact and self.cache_exact and self.continuation_exact

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def greedy_continue(model: torch.nn.Module, state: RestoredCache, n: int) -> list[int]:
    """n greedy tokens generated from a cache and its next-token logits."""
    kwarg = cache_kwarg(model)
    token = state.next_logits.argmax(-1, keepdim=True)
    out = [int(token)]
    for _ in range(n - 1):
        logits = model(input_ids=token, use_cache=True, **{kwarg: state.cache}).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
    return out


def caches_equal(a, b) -> bool:
    """Every layer's keys and values equal bit for bit."""
    return len(a.layers) == len(b.layers) and all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        for x, y in zip(a.layers, b.layers, strict=True)
    )


@torch.inference_mode()
def model_bits(lm: LoadedModel, ids: list[int]) -> float:
    """The float model's own cross-entropy of ids (after the prime token), in bits: the
    figure the coded bits are compared with."""
    device = lm.device
    inputs = torch.tensor([[lm.prime_token(), *ids[:-1]]], device=device)
    logp = torch.log_softmax(lm.model(input_ids=inputs).logits[0].double(), dim=-1)
    picked = logp[torch.arange(len(ids)), torch.tensor(ids, device=device)]
    return float(-picked.sum()) / math.log(2)


def run_one(lm: LoadedModel, name: str, text: str, continue_tokens: int = 16,
            progress: bool = False) -> DemoRow:
    ids, recipe = encode_text(lm.tokenizer, text)
    original = prefill_cache(lm.model, ids)

    t0 = time.perf_counter()
    blob = compress_cache(lm, original.cache, original.input_ids, text=recipe, progress=progress)
    compress_s = time.perf_counter() - t0
    info = inspect_blob(blob)

    t0 = time.perf_counter()
    restored = restore_cache(lm, blob, progress=progress)
    restore_s = time.perf_counter() - t0
    text_back = text_of(lm, blob, restored.input_ids)  # the same decode: no second pass

    cache_exact = caches_equal(restored.cache, original.cache)
    continuation_exact = greedy_continue(lm.model, restored, continue_tokens) == greedy_continue(
        lm.model, original, continue_tokens
    )
    return DemoRow(
        text=name,
        tokens=info["tokens"],
        bits_per_token=info["bits_per_token"],
        model_bits_per_token=model_bits(lm, ids) / info["tokens"],
        blob_bytes=info["bytes"],
        fp16_kv_bytes=info["fp16_kv_bits"] // 8,
        turboquant3_kv_bytes=info["turboquant3_kv_bits"] // 8,
        ratio_vs_fp16=info["ratio_vs_fp16"],
        ratio_vs_turboquant3=info["ratio_vs_turboquant3"],
        compress_s=compress_s,
        restore_s=restore_s,
        text_exact=text_back == text,
        cache_exact=cache_exact,
        continuation_exact=continuation_exact,
    )
