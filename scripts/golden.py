"""Regenerate the engine's golden vectors in tests/golden/ (after a change of ENGINE_ID): the
weights digest, the frequency hash of the bundled news text, and a small blob of its first 300
characters. Keep the previous engine's blob as smollm2_news_engine<N>.skv first: the tests
check that it is refused by name.

    python scripts/golden.py
"""

import json
from pathlib import Path

import seqkv
from seqkv.core.models import load_model
from seqkv.demo import bundled_text
from seqkv.engine import EngineCodec

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"


def main() -> None:
    lm = load_model()
    engine = lm.engine()
    text = bundled_text("brown_news")
    ids = lm.tokenizer(text).input_ids
    blob = seqkv.compress_text(lm, text[:300])
    if seqkv.decompress_text(lm, blob) != text[:300]:
        raise SystemExit("the golden blob does not decode to its text")
    (GOLDEN / "smollm2_news.skv").write_bytes(blob)
    vectors = {"weights_digest": engine.digest.hex(), "tokens": len(ids),
               "frequency_digest": EngineCodec(engine, lm.prime_token()).frequency_digest(ids),
               "blob_chars": 300, "blob_bytes": len(blob)}
    (GOLDEN / "smollm2_engine.json").write_text(json.dumps(vectors, indent=1))
    print(vectors)


if __name__ == "__main__":
    main()
