"""The engine's CPU kernels: cpu_kernels.c, compiled once per machine, called through ctypes.

Each kernel computes exactly the integers of the torch code it replaces (model.py, intops.py):
integer arithmetic, and the same IEEE float64 operations in the same order on exact integers
(built with -ffp-contract=off). A decode step costs six calls per layer instead of ~60 torch
operations, and its GEMMs read the weights once in VNNI's tile layout (AVX2 widens them as it
reads). The library is built with the system's C compiler at first use, into
``$SEQKV_CACHE/kernels`` (or ``~/.cache/seqkv``); where there is no compiler, neither AVX-512
VNNI nor AVX2, or ``SEQKV_CPU_KERNELS=0``, ``available()`` is False and the engine runs its
torch code (the same integers, slower).
A kernel whose scratch memory cannot be allocated raises MemoryError (``_ALLOCATING``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from .intops import kv_integers

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-fast-math",
          "-fPIC", "-shared"]
_lib: ctypes.CDLL | None = None
_tried = False
_enabled = True
_threads = 0
_load_lock = threading.Lock()
MAX_HEAD_DIM = 512  # the attention kernels' per-head buffers on the stack (cpu_kernels.c)
_i64, _ptr, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_SIGNATURES = {
    "set_threads": [_i64],
    "pack_weights": [_ptr, _i64, _i64, _ptr, _ptr],
    "linear": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64],
    "rms_norm": [_ptr, _i64, _i64, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64],
    "add_rows": [_ptr, _ptr, _i64],
    "gated_activation": [_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr],
    "decode_attention": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64,
                         _ptr, _ptr, _i64, _i64, _ptr, _i64, _f64, _f64, _ptr, _ptr],
    "pmf_rows": [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr],
    "norm_linear": [_ptr, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64,
                    _ptr, _ptr, _ptr, _ptr],
    "prefill_attention": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64,
                          _f64, _f64, _ptr],
    "interval_rows": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr],
    "prefill_heads": [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64,
                      _ptr, _ptr, _ptr],
    "fail_allocation": [_i64],
}
# the kernels that allocate scratch memory: they return 0, or the bytes they could not get
# (-1: a size past int64); every call of them through the library raises MemoryError then,
# cpu_step's direct calls included (ctypes' errcheck)
_ALLOCATING = {"linear", "norm_linear", "decode_attention", "interval_rows",
               "prefill_attention"}


def _check_allocation(result: int, fn: Any, args: tuple) -> int:
    if result > 0:
        raise MemoryError(f"seqkv CPU kernel {fn.__name__}: cannot allocate {result:,} bytes "
                          "of scratch memory (a smaller batch or shorter input needs less)")
    if result < 0:
        raise MemoryError(f"seqkv CPU kernel {fn.__name__}: its scratch memory's size "
                          "overflows (input too large)")
    return result


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    """core.models.cache_dir()'s directory (the engine does not import the layer above it)."""
    root = os.environ.get("SEQKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqkv")
    return Path(root)


def _private_temp_dir() -> Path | None:
    """This user's own directory under the temporary directory (mode 0700, checked: a
    library loaded from a directory others can write to could be anybody's code)."""
    root = Path(tempfile.gettempdir()) / f"seqkv-kernels-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = root.lstat()
    except OSError:
        return None
    if not root.is_dir() or root.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    return root


def _build() -> ctypes.CDLL | None:
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    key = hashlib.blake2b(source + repr((compiler, _FLAGS, _cpu_flags())).encode(),
                          digest_size=8).hexdigest()
    for root_of in (lambda: _cache_dir() / "kernels", _private_temp_dir):
        root = root_of()  # the temporary one only made where the cache fails
        if root is None:
            continue
        path = root / f"engine_cpu_{key}.so"
        try:
            if not path.exists():
                root.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    out = Path(tmp) / path.name
                    subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(out), "-lm"],
                                   check=True, capture_output=True, timeout=120)
                    os.replace(out, path)
            break
        except OSError:  # a read-only or unusable cache: build in the temporary directory
            continue
    else:
        return None
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = _i64 if name in _ALLOCATING else None
        if name in _ALLOCATING:
            fn.errcheck = _check_allocation
    return lib


def _probe(lib: ctypes.CDLL) -> bool:
    """The kernel GEMM against intops.RowGemm on saturated weights and extreme rows: a build
    that differs is not used."""
    from .intops import RowGemm

    g = torch.Generator().manual_seed(0)
    n, k = 37, 70
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w[0], w[1], w[n - 1] = 127, -127, -127
    scale = torch.ldexp(torch.randint(1 << 14, 1 << 15, (n,), generator=g).double(),
                        -torch.randint(12, 40, (n,), generator=g))
    bias = torch.randint(-(1 << 30), 1 << 30, (n,), generator=g)
    v = torch.randint(-(1 << 45), 1 << 45, (5, k), generator=g)
    v[0], v[1], v[2, ::3] = 0, 1 << 13, -(1 << 50)
    tile = torch.empty(3 * 18 * 64, dtype=torch.int8)
    rowsum = torch.empty(3 * 16, dtype=torch.int32)
    lib.pack_weights(w.data_ptr(), n, k, tile.data_ptr(), rowsum.data_ptr())
    out = torch.empty((5, n), dtype=torch.int64)
    lib.linear(v.data_ptr(), 5, k, k, tile.data_ptr(), rowsum.data_ptr(), n, scale.data_ptr(),
               bias.data_ptr(), out.data_ptr(), n)
    return torch.equal(out, RowGemm(v, w, scale, bias).all())


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built or are switched off; their
    thread count follows torch.get_num_threads()."""
    global _lib, _tried, _threads
    if not _tried:
        with _load_lock:  # one build and probe; other threads wait for its outcome
            if not _tried:
                lib = None
                if os.environ.get("SEQKV_CPU_KERNELS", "1") != "0":
                    try:
                        lib = _build()
                        lib = lib if lib is not None and _probe(lib) else None
                    except (OSError, subprocess.SubprocessError):
                        lib = None
                _lib, _tried = lib, True
    n = torch.get_num_threads()
    if _lib is not None and n != _threads:
        _lib.set_threads(n)
        _threads = n
    return _lib


def available() -> bool:
    return _enabled and library() is not None


def set_enabled(on: bool) -> bool:
    """Switch the kernels on or off in this process (benchmarks and tests compare both paths);
    returns the previous setting."""
    global _enabled
    was, _enabled = _enabled, bool(on)
    return was


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# -- weights, packed once ------------------------------------------------------------------
_packs: dict[int, tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor]]] = {}


def packed(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w int8 [N, K] in the kernels' tile layout, and its channels' sums (cached with w)."""
    hit = _packs.get(id(w))
    if hit is not None and hit[0]() is w:
        return hit[1]
    n, k = w.shape
    tiles, k4 = (n + 15) // 16, (k + 3) // 4
    tile = torch.empty(tiles * k4 * 64, dtype=torch.int8)
    rowsum = torch.empty(tiles * 16, dtype=torch.int32)
    w = w.contiguous()
    library().pack_weights(_p(w), n, k, _p(tile), _p(rowsum))
    _packs[id(w)] = (weakref.ref(w), (tile, rowsum))
    weakref.finalize(w, _packs.pop, id(w), None)  # the packed copy goes with its weights
    return tile, rowsum


# -- kernels ---------------------------------------------------------------------------------
def linear(v: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """intops.RowGemm(v, w, scale, bias).all() for int64 rows v [M, K] (unit column stride)."""
    m, k = v.shape
    n = w.shape[0]
    tile, rowsum = packed(w)
    if out is None:
        out = torch.empty((m, n), dtype=torch.int64)
    library().linear(_p(v), m, k, v.stride(0), _p(tile), _p(rowsum), n, _p(scale), _p(bias),
                     _p(out), out.stride(0))
    return out


def norm_linear(h: torch.Tensor, delta: torch.Tensor | None, post, norm, w: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor | None, frac: int,
                out: torch.Tensor | None = None, tmp: torch.Tensor | None = None
                ) -> torch.Tensor:
    """h += delta (normed by ``post`` first, where given), in place; returns
    linear(rms_norm(h, norm)): model.norm_linear in one call, for contiguous int64 h [M, K].
    ``post`` and ``norm`` are IntNorms (gain, frac, eps32); frac is the activations' (FRAC).
    ``out`` [M, N] and ``tmp`` [M, K] (int64, contiguous): buffers to use, else new ones."""
    m, k = h.shape
    n = w.shape[0]
    tile, rowsum = packed(w)
    out = torch.empty((m, n), dtype=torch.int64) if out is None else out
    tmp = torch.empty((m, k), dtype=torch.int64) if tmp is None else tmp
    library().norm_linear(
        _p(h), _p(delta), m, k, _p(post.gain) if post is not None else None,
        frac - post.frac if post is not None else 0, post.eps32 if post is not None else 0,
        _p(norm.gain), frac - norm.frac, norm.eps32, _p(tile), _p(rowsum), n, _p(scale),
        _p(bias), _p(out), _p(tmp))
    return out


def rms_norm(h: torch.Tensor, gain: torch.Tensor, shift: int, eps32: int, groups: int = 1,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """model.rms_norm over rows of h [M, groups * d] (each group of d its own row); shift is
    FRAC - norm.frac. ``out`` may be h itself."""
    m, width = h.shape
    out = torch.empty_like(h) if out is None else out
    library().rms_norm(_p(h), m, groups, width // groups, h.stride(0), _p(gain), shift, eps32,
                       _p(out), out.stride(0))
    return out


def add_(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    library().add_rows(_p(h), _p(delta), h.numel())
    return h


def gated_activation(gate_up: torch.Tensor, table: torch.Tensor, frac: int, in_bits: int,
                     out_bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    m, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((m, width), dtype=torch.int64) if out is None else out
    library().gated_activation(_p(gate_up), m, width, _p(table), table.shape[0], frac, in_bits,
                               out_bits, _p(out))
    return out


def pmf_rows(logits: torch.Tensor, exp_prob: torch.Tensor, shift: int, total: int) -> torch.Tensor:
    m, v = logits.shape
    out = torch.empty((m, v + 2), dtype=torch.int64)
    library().pmf_rows(_p(logits), m, v, logits.stride(0), _p(exp_prob), exp_prob.shape[0],
                       shift, total, _p(out))
    return out


def interval_rows(logits: torch.Tensor, tokens: torch.Tensor, exp_prob: torch.Tensor, shift: int,
                  total: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, v = logits.shape
    start, freq = torch.empty(m, dtype=torch.int64), torch.empty(m, dtype=torch.int64)
    tokens = tokens.contiguous()
    library().interval_rows(_p(logits), m, v, logits.stride(0), _p(tokens), _p(exp_prob),
                            exp_prob.shape[0], shift, total, _p(start), _p(freq))
    return start, freq


def prefill_heads(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  heads: int, kv: int, rope_shift: int, vshift: int, limit: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """model._heads for contiguous int64 rows qkv [B, T, (heads + 2 kv) d] at positions pos [B,
    T] (rope tables cos, sin [., d]): rotated queries [B, kv, rep, T, d], keys and values [B,
    kv, T, d] rounded as caches hold them, all int64."""
    b, t, width = qkv.shape
    d = width // (heads + 2 * kv)
    q = torch.empty((b, kv, heads // kv, t, d), dtype=torch.int64)
    k, v = (torch.empty((b, kv, t, d), dtype=torch.int64) for _ in range(2))
    pos = pos.contiguous()  # (kept alive through the call)
    library().prefill_heads(_p(qkv), b, t, heads, kv, d, _p(pos), _p(cos), _p(sin),
                            rope_shift, vshift, limit, _p(q), _p(k), _p(v))
    return q, k, v


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                      exp_table: torch.Tensor, index_scale: float,
                      out_mult: float) -> torch.Tensor:
    """model._attend for int64 queries [B, Hkv, rep, T, d], keys and values [B, Hkv, S, d] and
    visibility allowed [B, 1, 1, T, S]: Q16 [B, T, Hkv * rep * d]."""
    b, hkv, rep, t, d = q.shape
    s = k.shape[2]
    q, k, v = (q.to(torch.int64).contiguous(), kv_integers(k).contiguous(),
               kv_integers(v).contiguous())
    mask = allowed.expand(b, 1, 1, t, s).reshape(b, t, s).contiguous()
    out = torch.empty((b, t, hkv * rep * d), dtype=torch.int64)
    library().prefill_attention(_p(q), _p(k), _p(v), b, hkv, rep, t, s, d, _p(mask),
                                _p(exp_table), exp_table.shape[0], index_scale, out_mult,
                                _p(out))
    return out
