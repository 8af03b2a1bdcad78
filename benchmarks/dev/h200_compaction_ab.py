"""Compaction speed with the intervals kernel on and off, alternating (dev; run from the repository root on the H200, 2026-11-30 ~22:12 UTC, with the Brown texts store_gpu.py --dump-texts writes as .carry/brown_a.json)."""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
from store_gpu import chunks, compaction, load_texts
from seqkv.core.models import load_model
texts = load_texts(".carry/brown_a.json")
lm = load_model(None, device="cuda")
lm.engine().compile()
sessions = chunks(lm.tokenizer, texts[:-1], 256, 256)
for fused in (True, False, True, False, True):
    lm.engine().fused_locate = fused
    with tempfile.TemporaryDirectory() as tmp:
        r = compaction(str(Path(tmp) / "c.db"), lm, sessions, "cuda")
    print(json.dumps({"fused": fused, "compact_s": r["compact_s"], "tok_s": r["compact_tokens_per_s"], "put_s": r["put_s"]}), flush=True)
