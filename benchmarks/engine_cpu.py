"""CPU speed of the integer coder engine: encode, one-stream and 8-stream decode.

    python benchmarks/engine_cpu.py [--ids brown256.npy] [--tokens 256] [--threads 2] [--compare]
        [--out DIR]

Streams: the first 8 rows of --ids (256-token chunks, ``engine_tokens.py --prepare``), or
else 8 overlapping 256-token windows of the bundled texts. Encode is one batched prefill of
all 8 streams (``EngineCodec.intervals``; and, where the model has it, the prefill plus
``IntModel.intervals``, which gives each token's (start, freq) without the full table);
decode is ``EngineCodec.decode`` of the coded words, one stream alone and the 8 together,
each checked token for token. Prints the rates and writes DIR/engine_cpu.json. --compare runs
the same again in the same process with the CPU kernels switched off (the engine's torch code:
the same integers; "torch_" keys).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from seqkv.core.models import load_model
from seqkv.engine import EngineCodec, cpu_kernels


def streams_of(args, tokenizer) -> list[list[int]]:
    if args.ids:
        return np.load(args.ids)[:8, : args.tokens].astype(int).tolist()
    data = Path(__file__).resolve().parents[1] / "seqkv" / "data"
    ids: list[int] = []
    for name in sorted(data.glob("*.txt")):
        ids.extend(tokenizer(name.read_text()).input_ids)
    stride = max(1, (len(ids) - args.tokens) // 7)
    return [ids[i * stride : i * stride + args.tokens] for i in range(8)]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(codec, model, lm, streams, save, prefix: str = "") -> None:
    """Encode all streams, decode one alone and the 8 together; save rates under prefix."""
    n_tok = sum(len(s) for s in streams)
    codec.intervals([s[:16] for s in streams[:2]])  # warm-up (tables, packed weights)
    rows, t_enc = timed(lambda: codec.intervals(streams))
    save(**{f"{prefix}encode_s": t_enc, f"{prefix}encode_tok_s": n_tok / t_enc})
    if hasattr(model, "intervals"):
        def model_intervals():
            prime = lm.prime_token()
            inputs = torch.tensor([[prime] + s[:-1] for s in streams])
            h = model.prefill_hidden(inputs)
            start, freq = model.intervals(h.reshape(-1, h.shape[-1]),
                                          torch.tensor(streams).reshape(-1))
            return torch.stack([start, freq], dim=1).numpy()
        direct, t_direct = timed(model_intervals)
        save(**{f"{prefix}encode_intervals_s": t_direct,
                f"{prefix}encode_intervals_tok_s": n_tok / t_direct,
                f"{prefix}encode_intervals_exact": bool(np.array_equal(direct,
                                                                       np.concatenate(rows)))})

    from seqkv.core.decoders import encode_stream

    words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in rows]
    one, t_one = timed(lambda: codec.decode(words[:1], [len(streams[0])]))
    save(**{f"{prefix}decode1_s": t_one, f"{prefix}decode1_steps_s": len(streams[0]) / t_one,
            f"{prefix}decode1_exact": one == streams[:1]})
    eight, t_eight = timed(lambda: codec.decode(words, [len(s) for s in streams]))
    save(**{f"{prefix}decode8_s": t_eight, f"{prefix}decode8_tok_s": n_tok / t_eight,
            f"{prefix}decode8_exact": eight == streams, f"{prefix}load_after": os.getloadavg()[0]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true",
                    help="then the same without the CPU kernels (the torch code), same process")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(device="cpu")
    model = lm.engine()
    codec = EngineCodec(model, lm.prime_token())
    streams = streams_of(args, lm.tokenizer)
    n_tok = sum(len(s) for s in streams)
    res: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "streams": len(streams), "tokens": n_tok, "load_before": os.getloadavg()[0],
                 "cpu_kernels": cpu_kernels.available()}
    path = Path(args.out) / "engine_cpu.json"

    def save(**kw) -> None:
        res.update(kw)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        print(json.dumps(kw), flush=True)

    measure(codec, model, lm, streams, save)
    print(f"encode {res['encode_tok_s']:.1f} tokens/s, decode one stream "
          f"{res['decode1_steps_s']:.1f} steps/s, 8 streams {res['decode8_tok_s']:.1f} tokens/s "
          f"({res['threads']} threads, kernels {res['cpu_kernels']}, load "
          f"{res['load_before']:.1f})")
    if args.compare:
        cpu_kernels.set_enabled(False)
        measure(codec, model, lm, streams, save, prefix="torch_")
        print(f"without the kernels: encode {res['torch_encode_tok_s']:.1f} tokens/s, decode one "
              f"stream {res['torch_decode1_steps_s']:.1f} steps/s, 8 streams "
              f"{res['torch_decode8_tok_s']:.1f} tokens/s (load after "
              f"{res['torch_load_after']:.1f})")


if __name__ == "__main__":
    main()
