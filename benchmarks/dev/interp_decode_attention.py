"""decode_attention's GPU kernels checked on the CPU under Triton's interpreter (dev): the
cases of tests/test_cuda_attention.py::test_decode_kernels_at_the_bounds (queries, keys and
values at the engine's bounds; split heads and one program per head; windows; a key-major
copy stale in each stream's last run; float16 and int32 caches), plus longer caches with 4 and
2 query heads a key head, each against IntModel._attend integer for integer; with a key-major
copy, the runs it should hold copied over.

    pip install --target /tmp/tsite --no-deps triton==3.6.0
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/tsite:. python benchmarks/dev/interp_decode_attention.py

Takes ~20 s on the 2-core CPU. Output of 2026-12-02: every case exact.
"""

import itertools
import sys

import torch

sys.path.insert(0, ".")
from seqkv.engine import IntModel, cuda_attention, cuda_ops, integerize  # noqa: E402
from seqkv.engine.intops import split_rows  # noqa: E402
from seqkv.engine.model import FRAC, QKV_FRAC  # noqa: E402
from tests.test_cuda_ops import cached  # noqa: E402
from tests.test_engine import MODELS  # noqa: E402


def exact(programs: int, window: int, major: bool, kv_dtype: torch.dtype, b: int = 3,
          n_kv: int = 2, rep: int = 3, d: int = 64, cap: int = 75,
          pos: list[int] | None = None) -> bool:
    cuda_attention.TARGET_PROGRAMS = programs
    model = IntModel(integerize(MODELS["llama"]().model), "cpu")
    g = torch.Generator().manual_seed(11)
    lim = model._qkv_limit
    q = torch.randint(-lim, lim + 1, (b, n_kv, rep, 1, d), generator=g)
    k = torch.randint(-lim, lim + 1, (b, n_kv, cap, d), generator=g)
    v = torch.randint(-lim, lim + 1, (b, n_kv, cap, d), generator=g)
    q[0, 0, 0, 0], k[0, 0, :3], v[0, 0, :5] = lim, lim, -lim
    q[1 % b, n_kv - 1, rep - 1] = 0  # every score equal
    k, v = cached(k, kv_dtype), cached(v, kv_dtype)
    copy = cuda_attention.major_keys(b, n_kv, cap, d, "cpu", kv_dtype)
    run = cuda_attention.major_run(copy)
    pos = torch.tensor(pos if pos is not None else [cap - 1, 3 * run - 1, 3])
    kpos = torch.arange(cap)[None, :]
    allowed = (kpos <= pos[:, None]) & ((pos[:, None] - kpos < window) if window else True)
    want = split_rows(model._attend(q, k, v, allowed[:, None, None, None, :])[:, 0])
    if major:
        cuda_attention.fill_major(copy, k)
        whole = copy.clone()
        for i, p in enumerate(pos.tolist()):
            copy[i, :, :, p - p % run:] = 777  # each stream's last run: not in the copy yet
            done = (p + 1) - (p + 1) % run  # the runs the step leaves whole
            whole[i, :, :, done:] = copy[i, :, :, done:]
    got = cuda_attention.decode_attention(q, k, v, pos, window, model.exp_attn_f,
                                          model._index_scale_t, 1 << (FRAC - QKV_FRAC),
                                          major=copy if major else None)
    same = all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    return same and (not major or torch.equal(copy, whole))


def main() -> None:
    cuda_ops.available = lambda device: True  # the interpreter runs the kernels on the CPU
    cuda_ops._shared_memory = lambda device: 232448  # an H200's, for the GEMM tiles
    cases = [dict(programs=p, window=w, major=m, kv_dtype=t)
             for p, w, m, t in itertools.product((1, 2048), (0, 5), (False, True),
                                                 (torch.float16, torch.int32))]
    cases += [dict(programs=1, window=0, major=True, kv_dtype=torch.float16, cap=320, b=2,
                   pos=[130, 300], rep=4, n_kv=1),
              dict(programs=1, window=40, major=True, kv_dtype=torch.float16, cap=320, b=2,
                   pos=[130, 300], rep=2, d=32)]
    for case in cases:
        print(case, "exact" if exact(**case) else "MISMATCH", flush=True)


if __name__ == "__main__":
    main()
