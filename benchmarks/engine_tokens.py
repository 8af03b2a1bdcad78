"""The integer coder engine against the HF lockstep path, side by side, on one machine.

    python benchmarks/engine_tokens.py --ids brown256.npy [--long brown2048.npy]
        [--model PATH.gguf] [--device cuda] [--streams 1024] [--out DIR]

Streams are independent chunks of real text (Brown corpus, token ids prepared by
``--prepare``); every decode is checked token for token. Reports encode and decode
tokens/s, one-stream steps/s, bits against the float model's cross-entropy, the engine's
weights digest and golden frequency hash, and the old path at the same group size.
Results are written to DIR/engine_tokens_<device>.json after each measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from timing import timed  # benchmarks/timing.py, beside these scripts

from seqkv.core.models import load_model
from seqkv.engine import EngineCodec, IntModel, integerize


def prepare(out: Path) -> None:
    """Brown news, fiction, lore and belles lettres as 256- and 2,048-token chunks of SmolLM2
    ids (needs npm)."""
    from corpora import brown

    lm = load_model()
    ids: list[int] = []
    for cat, n in (("a", 44), ("k", 29), ("f", 48), ("g", 75)):
        for text in brown(cat, n):
            ids.extend(lm.tokenizer(text).input_ids)
    a = np.array(ids, dtype=np.int32)
    np.save(out / "brown256.npy", a[: (len(a) // 256) * 256].reshape(-1, 256)[:1024])
    np.save(out / "brown2048.npy", a[: (len(a) // 2048) * 2048].reshape(-1, 2048)[:16])
    print("prepared", len(a), "tokens")


@torch.inference_mode()
def float_bits(lm, streams: np.ndarray, prime: int, batch: int = 64) -> float:
    """The float model's own cross-entropy of the streams (prefill from the prime), in bits."""
    total = 0.0
    for s in range(0, len(streams), batch):
        ids = torch.as_tensor(streams[s : s + batch], dtype=torch.long, device=lm.device)
        inputs = torch.cat([torch.full_like(ids[:, :1], prime), ids[:, :-1]], dim=1)
        logits = lm.model(input_ids=inputs).logits.double()
        logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1))
        total += float(-logp.sum()) / math.log(2)
    return total


def engine_bits(rows: list[np.ndarray]) -> float:
    return float(sum((24 - np.log2(r[:, 1].astype(np.float64))).sum() for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids")
    ap.add_argument("--long")
    ap.add_argument("--model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", type=int, default=1024)
    ap.add_argument("--old-steps", type=int, default=64)
    ap.add_argument("--decode-words", help="npz of words coded on another machine")
    ap.add_argument("--out", default=".")
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--compile", action="store_true", help="IntModel.compile() (CUDA)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.prepare:
        prepare(out)
        return
    device = torch.device(args.device)
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda"
                 else platform.processor() or "cpu", "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    path = out / f"engine_tokens_{device.type}{'_compiled' if args.compile else ''}.json"
    res["compiled"] = args.compile

    def save(**kw) -> None:
        res.update(kw)
        path.write_text(json.dumps(res, indent=1))
        print(json.dumps(kw), flush=True)

    lm, t_load = timed(lambda: load_model(args.model, device=device))
    weights, t_int = timed(lambda: integerize(lm.model))
    model = IntModel(weights, device)
    if args.compile:
        model.compile()
    codec = EngineCodec(model, lm.prime_token())
    save(load_s=t_load, integerize_s=t_int, digest=weights.digest.hex())
    news = Path(__file__).resolve().parents[1] / "seqkv" / "data" / "brown_news.txt"
    golden_ids = lm.tokenizer(news.read_text()).input_ids
    save(golden_tokens=len(golden_ids), golden=codec.frequency_digest(golden_ids))

    streams = np.load(args.ids)[: args.streams]
    lists = streams.tolist()
    n_tok = streams.size
    # warm-up; a compiled model compiles each new shape once, so it warms up on the same ones
    codec.intervals(lists if args.compile else lists[:8])
    rows, t_enc = timed(lambda: codec.intervals(lists))
    fbits = float_bits(lm, streams, lm.prime_token())
    save(streams=len(lists), tokens=n_tok, encode_s=t_enc, encode_tok_s=n_tok / t_enc,
         bits_per_token=engine_bits(rows) / n_tok, float_bits_per_token=fbits / n_tok,
         bits_ratio=engine_bits(rows) / fbits)
    from seqkv.core.decoders import encode_stream
    words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in rows]
    flush = sum(32 * w.size for w in words) - engine_bits(rows)
    save(coded_bits_per_token=sum(32 * w.size for w in words) / n_tok,
         flush_bits_per_stream=flush / len(words))
    np.savez(out / f"words_{device.type}.npz", *words)

    if args.compile:
        codec.decode(words, [len(s) for s in lists])
        codec.decode(words[:1], [len(lists[0])])
    decoded, t_dec = timed(lambda: codec.decode(words, [len(s) for s in lists]))
    save(decode_s=t_dec, decode_tok_s=n_tok / t_dec, decode_exact=decoded == lists)
    one, t_one = timed(lambda: codec.decode(words[:1], [len(lists[0])]))
    save(one_stream_steps_s=len(lists[0]) / t_one, one_exact=one == lists[:1])
    if device.type == "cuda":
        plain = EngineCodec(model, lm.prime_token(), graphs=False)
        sub = min(64, len(words))
        got, t_plain = timed(lambda: plain.decode(words[:sub], [len(s) for s in lists[:sub]]))
        save(no_graph_streams=sub, no_graph_tok_s=sub * len(lists[0]) / t_plain,
             no_graph_exact=got == lists[:sub])

    if args.long:
        long = np.load(args.long)
        lrows, t_l = timed(lambda: codec.intervals(long.tolist()))
        lf = float_bits(lm, long, lm.prime_token(), batch=4)
        save(long_tokens=long.size, long_encode_tok_s=long.size / t_l,
             long_bits_per_token=engine_bits(lrows) / long.size,
             long_float_bits_per_token=lf / long.size, long_bits_ratio=engine_bits(lrows) / lf)

    if args.decode_words:
        other = np.load(args.decode_words)
        ow = [other[k] for k in sorted(other.files, key=lambda k: int(k.split("_")[1]))]
        ow = ow[: len(lists)]
        got = codec.decode(ow, [len(s) for s in lists[: len(ow)]])
        save(cross_machine_streams=len(ow), cross_machine_exact=got == lists[: len(ow)])

    if args.old_steps <= 0:
        return
    from seqkv.tokens.codec import TokenCodec

    old = TokenCodec(lm, chunk_size=args.old_steps, batch=len(lists))
    short = [s[: args.old_steps] for s in lists]
    flat = [t for s in short for t in s]
    coding, t_oe = timed(lambda: old.encode(flat))
    back, t_od = timed(lambda: old.decode(coding.chunks))
    new_rows, t_ne = timed(lambda: codec.intervals(short))
    new_words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in new_rows]
    new_back, t_nd = timed(lambda: codec.decode(new_words, [len(s) for s in short]))
    save(side_by_side={"streams": len(short), "tokens_each": args.old_steps,
                       "old_encode_tok_s": len(flat) / t_oe, "old_decode_tok_s": len(flat) / t_od,
                       "old_exact": back == flat, "engine_encode_tok_s": len(flat) / t_ne,
                       "engine_decode_tok_s": len(flat) / t_nd, "engine_exact": new_back == short})


if __name__ == "__main__":
    main()
