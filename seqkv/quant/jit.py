"""The quantizers' one switch between eager kernels and torch.compile, and CPU row blocking.

Every quantizer's tensor work lives in plain functions (kernels) that take tensors plus a few
static Python values (bit widths, dtypes). :func:`run` calls a kernel:

* ``compile="auto"`` (the default): torch.compile on CUDA, where fusing the rotation's
  epilogue, the scalar quantizer and the bit packing into a few kernels is what makes
  quantization memory-bound; eager on the CPU (no compiler needed, no compile latency).
* ``True`` / ``"always"``: compile on any device (CPU needs a C++ compiler).
* ``False`` / ``"never"``: eager everywhere.

Each (kernel, static values) pair is compiled once, as its own code object: static values
stay Python constants (no recompiles when another bit width is used), each pair gets its own
dynamo recompile budget, and a varying token count turns into one dynamic-shape recompile.
If compilation or a compiled call fails, the kernel falls back to eager for the rest of the
process with one warning. Inside an outer torch.compile trace the kernel is simply inlined.

On the CPU in eager mode, :func:`run` feeds the kernel blocks of rows: every intermediate
then stays in cache and the allocator recycles blocks instead of page-faulting fresh
megabytes for each elementwise pass, which is most of the eager CPU cost otherwise.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ..core.errors import SeqkvError

CompileMode = bool | Literal["auto", "always", "never"]
CPU_BLOCK_ROWS = 2048  # 2048 x 128 float32 = 1 MiB per intermediate: stays in L2

_compiled: dict[tuple, Callable] = {}
_failed: set[tuple] = set()
_warned: set[str] = set()


def check_mode(mode: Any) -> None:
    if mode not in (True, False, "auto", "always", "never"):
        raise SeqkvError(f"compile must be 'auto', 'always', 'never', True or False, got {mode!r}")


def wants_compile(mode: CompileMode, device: torch.device) -> bool:
    """Whether ``mode`` compiles kernels for tensors on ``device``."""
    check_mode(mode)
    if mode in (True, "always"):
        return True
    if mode in (False, "never"):
        return False
    return device.type == "cuda"


def _specialize(fn: Callable, static: dict[str, Any], tag: int) -> Callable:
    """``fn`` with ``static`` bound as keyword defaults, under a code object of its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_seqkv{tag}")
    spec = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    spec.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **static}
    return spec


def compiled(fn: Callable, static: dict[str, Any]) -> Callable | None:
    """The compiled kernel for (fn, static), or None once it has failed."""
    key = (fn, tuple(sorted(static.items(), key=lambda kv: kv[0])))
    if key in _failed:
        return None
    c = _compiled.get(key)
    if c is None:
        c = torch.compile(_specialize(fn, static, len(_compiled)), fullgraph=True)
        _compiled[key] = c
    return c


def _fail(fn: Callable, static: dict[str, Any], err: BaseException) -> None:
    _failed.add((fn, tuple(sorted(static.items(), key=lambda kv: kv[0]))))
    if fn.__name__ not in _warned:
        _warned.add(fn.__name__)
        warnings.warn(
            f"seqkv: torch.compile of {fn.__name__} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); running it eagerly from now on",
            RuntimeWarning,
            stacklevel=3,
        )


def run(
    fn: Callable,
    mode: CompileMode,
    args: Sequence[Any],
    static: dict[str, Any],
    *,
    rows: int = 0,
):
    """``fn(*args, **static)``, compiled or eager per ``mode``.

    ``rows``: how many leading arguments are row-aligned (first dimension = vectors). In eager
    CPU mode those are fed in blocks of :data:`CPU_BLOCK_ROWS` and the kernel's outputs (a
    tensor or a tuple of tensors, each with the same first dimension) are assembled.
    """
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    with torch.no_grad():
        if torch.compiler.is_compiling():
            return fn(*args, **static)
        if wants_compile(mode, device):
            c = compiled(fn, static)
            if c is not None:
                try:
                    return c(*args)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly
                    _fail(fn, static, e)
        if device.type != "cpu" or rows == 0:
            return fn(*args, **static)
        return _blocked(fn, args, static, rows)


def _blocked(fn: Callable, args: Sequence[Any], static: dict[str, Any], rows: int):
    n = args[0].shape[0]
    if n <= CPU_BLOCK_ROWS:
        return fn(*args, **static)
    outs: list[torch.Tensor] | None = None
    single = False
    for s in range(0, n, CPU_BLOCK_ROWS):
        e = min(s + CPU_BLOCK_ROWS, n)
        part = fn(*(a[s:e] for a in args[:rows]), *args[rows:], **static)
        if outs is None:
            single = isinstance(part, torch.Tensor)
            parts = (part,) if single else part
            outs = [p.new_empty((n, *p.shape[1:])) for p in parts]
        else:
            parts = (part,) if single else part
        for o, p in zip(outs, parts, strict=True):
            o[s:e] = p
    assert outs is not None
    return outs[0] if single else tuple(outs)
