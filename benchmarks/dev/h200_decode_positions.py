"""A decode step's time by position (dev; CUDA): graph replays of one 1,024-stream and one
1-stream group from position 0 to 256 (a whole 256-token decode, capacity 320), timed step by
step, and the kernels of the steps at positions 120-130. SmolLM2-shaped engine with random
weights, compiled.

    python3 benchmarks/dev/h200_decode_positions.py [STREAMS ...] [--set NAME=VALUE ...]

(from the repository root; default 1,024 and 1 streams; --variant "NAME=VALUE ..." runs
each stream count again with those set, in the same process; --set sets a cuda_attention
constant, e.g. TARGET_PROGRAMS=1 for unsplit heads, or a cuda_ops one, e.g. cuda_ops.PDL=0;
--tiles BM,BN,BK,WARPS sets the GEMM tiles of groups of up to 16 rows, the head's excepted;
--head-tiles the head's at up to 16 rows; --logits64 keeps the head's logits in int64;
--split-rows runs one stream's row passes as kernels of their own, not in its GEMMs;
--outputs64 keeps the qkv and gate_up GEMMs' outputs in int64.)

Output of 2026-12-01 07:00 UTC: benchmarks/results/engine_dev_h200.txt.
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped  # noqa: E402
from timing import kernel_table  # noqa: E402

from seqkv.core.decoders import VectorRansDecoder  # noqa: E402
from seqkv.engine import EngineCodec, cuda_attention, cuda_ops  # noqa: E402
from seqkv.engine.codec import _DecodeGroup  # noqa: E402


def assign(setting: str) -> tuple[object, str, object]:
    """Set one NAME=VALUE (a cuda_attention constant, or cuda_ops.NAME); returns what to undo."""
    name, value = setting.split("=")
    module, name = name.split(".") if "." in name else ("cuda_attention", name)
    owner = {"cuda_attention": cuda_attention, "cuda_ops": cuda_ops}[module]
    before = getattr(owner, name)
    setattr(owner, name, int(value))
    print(f"{module}.{name} = {value}")
    return owner, name, before


def main() -> None:
    args = sys.argv[1:]
    while "--set" in args:
        at = args.index("--set")
        assign(args[at + 1])
        del args[at : at + 2]
    variants = [[]]  # each --variant "A=1 B=2": the streams again with those set, same process
    while "--variant" in args:
        at = args.index("--variant")
        variants.append(args[at + 1].split())
        del args[at : at + 2]
    for flag, head in (("--tiles", False), ("--head-tiles", True)):
        if flag in args:
            at = args.index(flag)
            tiles = tuple(int(x) for x in args[at + 1].split(","))
            own = cuda_ops._linear_tiles
            cuda_ops._linear_tiles = (
                lambda m, n, k, shared, own=own, tiles=tiles, head=head:
                tiles if m <= 16 and (n > 8192) == head else own(m, n, k, shared))
            print(f"{flag} at up to 16 rows: {tiles}")
            del args[at : at + 2]
    m = smollm2_shaped().compile()
    if "--logits64" in args:
        args.remove("--logits64")
        m.logits_dtype = torch.int64
    if "--outputs64" in args:
        args.remove("--outputs64")
        m._int32_outputs = {}
    if "--split-rows" in args:
        args.remove("--split-rows")
        m.row_linear = False
    print("logits", m.logits_dtype, "one-row kernels", m.row_linear,
          "int32 outputs", len(m._int32_outputs))
    codec = EngineCodec(m, 1)
    for b, variant in [(int(a), v) for a in args or (1024, 1) for v in variants]:
        undo = [assign(x) for x in variant]
        print(f"#### {b} streams, variant: {' '.join(variant) or 'as set'}")
        streams = torch.randint(0, m.spec.vocab, (b, 256)).tolist()
        words = codec.encode(streams)
        g = _DecodeGroup(codec, b, 320, max(w.size for w in words) + 2)
        g._load(VectorRansDecoder(words, m.device), [256] * b, [[]] * b)
        g._side_step(g._span(0))
        graph = g._graph(g._span(1))
        times = []
        for step in range(1, 256):
            if step == 120:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        graph.replay()
                    torch.cuda.synchronize()
            if 120 <= step < 130:
                continue
            torch.cuda.synchronize()
            t = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            times.append((step, time.perf_counter() - t))
        torch.cuda.synchronize()
        print(f"== {b} streams, every token decoded exactly: "
              f"{g.out[:, :256].cpu().tolist() == streams}")
        for lo, hi in ((1, 32), (32, 96), (96, 160), (160, 256)):
            sel = [dt for s, dt in times if lo <= s < hi]
            print(f"== {b} streams, steps {lo}-{hi}: {sum(sel) / len(sel) * 1e3:.3f} ms/step")
        print(f"== {b} streams, profile at positions 120-130:")
        kernel_table(prof, 10, 14)
        del g
        for owner, name, before in undo:
            setattr(owner, name, before)


if __name__ == "__main__":
    main()
