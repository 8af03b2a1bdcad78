"""Portability checks of the integer engine through the public API, and a fusion experiment.

    python benchmarks/engine_checks.py --golden tests/golden --ids brown256.npy --out DIR

- the committed golden blob decodes to the bundled text and the golden frequency hash holds;
- a blob compressed here (written to DIR/news_<device>.skv) for decoding on another machine;
- ``--compile``: the decode step with ``IntModel.compile()`` (the elementwise work fused by
  torch.compile, still captured per span as CUDA graphs): same tokens? how fast?
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from timing import timed  # benchmarks/timing.py, beside these scripts

import seqkv
from seqkv.demo import bundled_text
from seqkv.engine import EngineCodec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--golden", default="tests/golden")
    ap.add_argument("--ids")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", type=int, default=1024)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out = Path(args.out)
    res: dict = {"device": args.device, "date": time.strftime("%Y-%m-%d")}

    def save(**kw) -> None:
        res.update(kw)
        (out / f"engine_checks_{args.device}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(kw), flush=True)

    lm = seqkv.load_model(device=args.device)
    golden = json.loads((Path(args.golden) / "smollm2_engine.json").read_text())
    engine = lm.engine()
    codec = EngineCodec(engine, lm.prime_token())
    news = bundled_text("brown_news")
    ids = lm.tokenizer(news).input_ids
    save(weights_digest_match=engine.digest.hex() == golden["weights_digest"],
         frequency_digest_match=codec.frequency_digest(ids) == golden["frequency_digest"])
    blob = (Path(args.golden) / "smollm2_news.skv").read_bytes()
    save(golden_blob_exact=seqkv.decompress_text(lm, blob) == news[: golden["blob_chars"]])
    mine = seqkv.compress_text(lm, news)
    (out / f"news_{args.device}.skv").write_bytes(mine)
    save(api_round_trip=seqkv.decompress_text(lm, mine) == news, api_blob_bytes=len(mine))

    if args.compile and args.ids:
        streams = np.load(args.ids)[: args.streams].tolist()
        words = codec.encode(streams)
        lengths = [len(s) for s in streams]
        base, t_base = timed(lambda: codec.decode(words, lengths))
        engine.compile()  # the library's fused path
        first, t_first = timed(lambda: codec.decode(words[:1], lengths[:1]))
        one, t_one = timed(lambda: codec.decode(words[:1], lengths[:1]))
        comp, t_c1 = timed(lambda: codec.decode(words, lengths))
        comp2, t_comp = timed(lambda: codec.decode(words, lengths))
        save(compile_streams=len(streams), eager_graph_tok_s=sum(lengths) / t_base,
             compiled_first_s=t_first, compiled_first_group_s=t_c1,
             compiled_one_stream_steps_s=lengths[0] / t_one,
             compiled_tok_s=sum(lengths) / t_comp,
             compiled_exact=comp == streams and comp2 == streams and base == streams
             and one == streams[:1] and first == streams[:1],
             compiled_frequency_digest_match=codec.frequency_digest(ids)
             == golden["frequency_digest"])


if __name__ == "__main__":
    main()
