"""Token-tier speed on a GPU: encode and decode tokens/s for batches of sessions.

Run on the H200 (see BENCHMARKS.md for the exact command):
    python benchmarks/gpu_tokens.py --gguf PATH.gguf --ids IDS.npy --out DIR

Streams are independent 256-token chunks of real text (Brown corpus), coded in lockstep
groups of B streams. Every decode is checked token for token. Results go to DIR/gpu_tokens.json
after each measurement, so a run cut short still reports what it finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import constriction
import numpy as np
import torch
from timing import timed  # benchmarks/timing.py, beside these scripts

from seqkv.core.decoders import ConstrictionDecoder, VectorRansDecoder
from seqkv.core.distribution import full_weights, quantized_pmf, symbol_intervals
from seqkv.core.models import load_model
from seqkv.core.stepper import PROCEDURE, run_lockstep
from seqkv.tokens.codec import TokenCodec


def intervals(lm, streams, batch, steps, procedure=PROCEDURE):
    rows = []

    def on_step(step, pmf, logits):
        tokens = streams[:batch, step].to(pmf.device)
        rows.append(symbol_intervals(pmf, tokens)[0])
        return tokens

    run_lockstep(lm, batch, steps, on_step, procedure)
    return torch.stack(rows)


def repeatable(lm, streams, steps: int) -> dict:
    n = min(64, streams.shape[0])
    a = intervals(lm, streams, n, steps)
    b = intervals(lm, streams, n, steps)
    bad = (a != b).any(-1).nonzero()
    return {"repeatable": bool(torch.equal(a, b)),
            "first_differing_step": int(bad[0]) if len(bad) else None}


def diagnose(lm, streams, device, steps: int) -> dict:
    out = {}
    g = torch.Generator().manual_seed(0)
    pmfs = quantized_pmf(torch.randn((40, 8, lm.vocab_size), generator=g) * 6).to(device)
    symbols = torch.multinomial(pmfs[:, :, 1:-1].reshape(-1, lm.vocab_size).double().cpu(), 1,
                                generator=g).reshape(40, 8) + 1
    words = []
    for s in range(8):
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(symbols[:, s].numpy().astype(np.int32),
                             constriction.stream.model.Categorical(perfect=False),
                             np.stack([full_weights(r) for r in pmfs[:, s].cpu().numpy()]))
        words.append(coder.get_compressed())
    dec = VectorRansDecoder(words, torch.device(device))
    got = torch.stack([dec.step(pmfs[t], torch.ones(8, dtype=torch.bool, device=device))
                       for t in range(40)]).cpu()
    out["vector_decoder_matches_on_gpu"] = bool(torch.equal(got, symbols - 1))
    out["sdpa"] = repeatable(lm, streams, steps)
    print(json.dumps(out), flush=True)
    if not out["sdpa"]["repeatable"]:
        lm.model.set_attn_implementation("eager")
        out["eager"] = repeatable(lm, streams, steps)
        print(json.dumps(out), flush=True)
        if not out["eager"]["repeatable"]:
            lm.model.set_attn_implementation("sdpa")
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)
            out["sdpa_math"] = repeatable(lm, streams, steps)
            print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ids", required=True, help=".npy int64 [n_streams, chunk] token ids")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eager-batches", default="64,256,1024")
    ap.add_argument("--skip-diagnose", action="store_true")
    ap.add_argument("--cpu-blob", default=None, help="a blob made on the dev CPU, to decode here")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "runs": []}

    def save() -> None:
        (out / "gpu_tokens.json").write_text(json.dumps(results, indent=2))

    streams = torch.from_numpy(np.load(args.ids)).long()
    chunk = streams.shape[1]
    (lm, load_s) = timed(lambda: load_model(args.gguf, device=args.device, dtype=torch.bfloat16))
    results.update(model=lm.fingerprint.to_dict(), load_s=load_s, chunk=chunk)
    save()

    # Diagnostics first: is the procedure repeatable on this GPU, and does the vectorized
    # decoder read constriction's streams at full vocabulary size on the GPU?
    if not args.skip_diagnose:
        lm.model.set_attn_implementation("sdpa")  # show why the codec uses eager attention
        results["diagnostics"] = diagnose(lm, streams, args.device, chunk)
        lm.model.set_attn_implementation("eager")
    results["attn_used"] = lm.config._attn_implementation  # recorded in every blob's numerics
    save()

    def run(procedure: str, batch: int) -> None:
        ids = streams[:batch].reshape(-1).tolist()
        codec = TokenCodec(lm, chunk_size=chunk, batch=batch, procedure=procedure,
                           decoder=VectorRansDecoder)
        coding, enc_s = timed(lambda: codec.encode(ids))
        decoded, dec_s = timed(lambda: codec.decode(coding.chunks))
        row = {
            "procedure": procedure, "batch": batch, "tokens": len(ids),
            "encode_tok_s": len(ids) / enc_s, "decode_tok_s": len(ids) / dec_s,
            "steps_s_decode": chunk / dec_s, "exact": decoded == ids,
            "bits_per_token": coding.bits / len(ids),
            "model_bits_per_token": coding.model_bits / len(ids)
        }
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        save()

    plan = [(PROCEDURE, int(x)) for x in args.eager_batches.split(",") if x]
    for procedure, b in plan:
        try:
            run(procedure, b)
        except Exception as e:  # report, keep the other measurements
            results["runs"].append({"procedure": procedure, "batch": b, "error": repr(e)})
            print(json.dumps(results["runs"][-1]), flush=True)
            save()

    # Restore = decode, then one batched prefill of every session.
    # (Restore's prefill is not part of coding: it may use the fast SDPA path.)
    lm.model.set_attn_implementation("sdpa")
    for b in (64, 256):
        ids = streams[:b].to(args.device)
        _, s = timed(lambda ids=ids: lm.model(input_ids=ids, use_cache=True, logits_to_keep=1))
        _, s = timed(lambda ids=ids: lm.model(input_ids=ids, use_cache=True, logits_to_keep=1))
        results.setdefault("prefill", []).append(
            {"batch": b, "tokens": ids.numel(), "tok_s": ids.numel() / s})
    save()

    # Why the group size is part of the numerics profile: one stream alone vs in a batch.
    n_probe = min(32, chunk)
    wide = min(64, streams.shape[0])
    probe = streams[:wide, :n_probe].to(args.device)
    pmfs = {}
    for b in (1, wide):
        rows = []

        def on_step(step, pmf, logits, rows=rows, b=b):
            rows.append(pmf[0].clone())
            return probe[:b, step]

        run_lockstep(lm, b, n_probe, on_step)
        pmfs[b] = torch.stack(rows)
    differ = (pmfs[1] != pmfs[wide]).any(-1)
    results["batch_invariance"] = {
        "positions": n_probe, "wide_batch": wide,
        "positions_with_different_pmf": int(differ.sum()),
        "max_abs_freq_difference": int((pmfs[1] - pmfs[wide]).abs().max()),
    }
    save()

    # The vectorized decoder reads exactly what constriction reads, on GPU distributions.
    n_small = min(64, chunk)
    small = streams[:4, :n_small].reshape(-1).tolist()
    coding = TokenCodec(lm, chunk_size=n_small, batch=4).encode(small)
    ref = TokenCodec(lm, chunk_size=n_small, batch=4,
                     decoder=ConstrictionDecoder).decode(coding.chunks)
    results["constriction_cross_check"] = ref == small
    save()

    if args.cpu_blob:
        from seqkv import decompress_tokens, inspect_blob
        cpu_lm = load_model(args.gguf, device="cpu")
        blob = Path(args.cpu_blob).read_bytes()
        try:
            ids, s = timed(lambda: decompress_tokens(cpu_lm, blob))
            results["cpu_blob_from_dev_machine"] = {"ok": True, "tokens": len(ids), "s": s}
        except Exception as e:
            results["cpu_blob_from_dev_machine"] = {"ok": False, "error": str(e)}
        results["cpu_blob_info"] = inspect_blob(blob)["numerics"]
        save()
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
