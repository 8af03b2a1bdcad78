"""Do decode groups that run side by side on their own CUDA streams beat one group of all the
streams? (dev; CUDA.) 1,024 streams x 256 steps as 1 x 1,024, 2 x 512 and 4 x 256 groups, each
group's graph replayed on its own stream. SmolLM2-shaped engine with random weights, compiled, capacity 320.

    python3 benchmarks/dev/h200_concurrent_groups.py [TOTAL] [--rounds N] [--set NAME=VALUE]

(from the repository root; default 1,024 streams, 2 rounds, every layout once a round.)
"""

import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped  # noqa: E402

from seqkv.core.decoders import VectorRansDecoder  # noqa: E402
from seqkv.engine import EngineCodec, cuda_attention  # noqa: E402
from seqkv.engine.codec import _DecodeGroup  # noqa: E402

STEPS = 256


def groups_of(codec: EngineCodec, words: list, parts: int) -> list[_DecodeGroup]:
    per = len(words) // parts
    out = []
    for i in range(parts):
        w = words[i * per : (i + 1) * per]
        g = _DecodeGroup(codec, per, 320, max(x.size for x in w) + 2)
        g.words = w
        out.append(g)
    return out


def load(g: _DecodeGroup) -> None:
    g._load(VectorRansDecoder(g.words, g.model.device), [STEPS] * len(g.words),
            [[]] * len(g.words))


def run(groups: list[_DecodeGroup], concurrent: bool) -> float:
    streams = [torch.cuda.Stream() for _ in groups]
    for g in groups:
        load(g)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for step in range(STEPS):
        for g, s in zip(groups, streams):
            with torch.cuda.stream(s if concurrent else torch.cuda.current_stream()):
                g._graph(g._span(step)).replay()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    args = sys.argv[1:]
    while "--set" in args:  # a cuda_attention constant, as in h200_decode_positions.py
        at = args.index("--set")
        name, value = args[at + 1].split("=")
        setattr(cuda_attention, name, int(value))
        print(f"cuda_attention.{name} = {value}")
        del args[at : at + 2]
    rounds = 2
    if "--rounds" in args:
        at = args.index("--rounds")
        rounds = int(args[at + 1])
        del args[at : at + 2]
    total = int(args[0]) if args else 1024
    m = smollm2_shaped().compile()
    codec = EngineCodec(m, 1)
    streams = torch.randint(0, m.spec.vocab, (total, STEPS)).tolist()
    words = codec.encode(streams)
    want = None
    layouts = [(1, False), (2, True), (4, True), (8, True)]
    built = {}
    for parts in sorted({p for p, _ in layouts}):
        gs = groups_of(codec, words, parts)
        for g in gs:  # eager step, capture
            load(g)
            g._side_step(g._span(0))
            g._graph(g._span(1))
        built[parts] = gs
    for r in range(rounds):
        for parts, concurrent in layouts:
            gs = built[parts]
            dt = run(gs, concurrent)
            out = torch.cat([g.out[:, :STEPS] for g in gs]).cpu()
            if want is None:
                want = out
            exact = bool(torch.equal(out, want)) and out[:, :STEPS].tolist() == streams
            print(f"round {r}: {parts} x {total // parts} {'side by side' if concurrent else 'in turn'}: "
                  f"{dt:.3f} s, {total * STEPS / dt:,.0f} tokens/s, exact {exact}", flush=True)


if __name__ == "__main__":
    main()
