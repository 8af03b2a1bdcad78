"""GPU throughput of seqkv's per-vector quantizers: quantize / dequantize GB/s of bf16 input.

    python benchmarks/gpu_quantizers.py --out DIR            # on a CUDA machine, d = 128
    python benchmarks/gpu_quantizers.py --out DIR --smoke    # tiny sizes, runs on the CPU too

Writes DIR/gpu_quantizers.json (rewritten after every row, so a cut-off run keeps its rows).
For every method and bit width it times the library's default path (``compile="auto"``: what a
user gets, torch.compile'd kernels on CUDA, eager on the CPU) and the eager kernels
(``compile="never"``) for reference. Throughput = bytes of bf16 input (quantize) or bf16
output (dequantize) per second, CUDA events after warm-up, median of --iters runs. The first
call of each (compile included) is reported as ``first_call_s``. Every row also reports the
relative distortion of its own output and whether the default path fell back to eager, so a
fast but wrong path shows up. A failing method records its error and the run goes on.
``--budget-s`` bounds the whole run (rows past it are recorded as skipped). The PyPI peer
pyturboquant is timed when installed. Needs no network.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch


def _import_quant():
    """Import seqkv.quant without running seqkv/__init__.py.

    The package's __init__ pulls in the token codec (transformers, constriction); the
    quantizers need only torch and numpy, and the GPU box may lack the rest.
    """
    import importlib
    import types

    root = Path(__file__).resolve().parents[1] / "seqkv"
    if "seqkv" not in sys.modules:
        pkg = types.ModuleType("seqkv")
        pkg.__path__ = [str(root)]
        sys.modules["seqkv"] = pkg
    return importlib.import_module("seqkv.quant")


_quant = _import_quant()
get_quantizer = _quant.get_quantizer
jit = sys.modules["seqkv.quant.jit"]

CONFIGS = [
    *[("turboquant-mse", b, {}) for b in (1, 2, 3, 4)],
    *[("turboquant-prod", b, {}) for b in (2, 3, 4)],
    ("turboquant-outlier", 2.5, {}),
    ("turboquant-outlier", 3.5, {}),
    ("kivi", 2, {"axis": "token"}),
    ("kivi", 4, {"axis": "token"}),
    ("kivi", 2, {"axis": "channel"}),
    ("fp8", 8, {}),
    ("int8", 8, {}),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timer(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call (CUDA events on GPUs, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_call(fn, device: torch.device):
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def rel_mse(x: torch.Tensor, xh: torch.Tensor, rows: int = 65536) -> float:
    """Mean over vectors of ||x - x~||^2 / ||x||^2 (= the unit-vector MSE for these methods)."""
    d = x.shape[-1]
    a, b = x.reshape(-1, d)[:rows].float(), xh.reshape(-1, d)[:rows].float()
    return float((((a - b) ** 2).sum(-1) / (a**2).sum(-1).clamp_min(1e-30)).mean())


def measure(method, bits, extra, mode, x, xin, gb, device, args) -> dict:
    q = get_quantizer(method, bits, compile=mode, **extra)
    failed_before = set(jit._failed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qt, tq0 = first_call(lambda: q.quantize(xin), device)
        xh, td0 = first_call(lambda: q.dequantize(qt), device)
        row = {
            "bits_per_component": qt.bits / qt.numel,
            "first_call_s": {"quantize": tq0, "dequantize": td0},
            "rel_mse": rel_mse(xin, xh),
        }
        del xh
        tq = timer(lambda: q.quantize(xin), device, args.warmup, args.iters)
        td = timer(lambda: q.dequantize(qt), device, args.warmup, args.iters)
    row |= {"quantize_GBps": gb / tq, "dequantize_GBps": gb / td}
    fell = sorted({k[0].__name__ for k in set(jit._failed) - failed_before})
    if fell or caught:
        row["eager_fallbacks"] = fell
        row["warnings"] = sorted({str(w.message)[:300] for w in caught})
    if mode == "auto":
        row["compiled"] = jit.wants_compile("auto", device) and not fell
    return row


def run(args, write) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    d = args.dim
    n = args.vectors
    t_start = time.perf_counter()
    torch.manual_seed(0)
    x = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    gb = x.numel() * x.element_size() / 1e9
    report = {
        "device": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "argv": sys.argv,
        "dim": d,
        "vectors": n,
        "input_GB_bf16": gb,
        "warmup": args.warmup,
        "iters": args.iters,
        "default_path": "compile='auto': torch.compile on CUDA, eager on the CPU",
        "results": [],
        "peers": [],
    }
    results = report["results"]
    for method, bits, extra in CONFIGS:
        # KIVI and the outlier split expect (..., T, d): tokens on axis -2, as in a cache.
        xin = x.reshape(64, n // 64, d) if method in ("kivi", "turboquant-outlier") else x
        for variant, mode in (("default", "auto"), ("eager", "never")):
            row = {"method": method, "bits": bits, **extra, "variant": variant, "compile": mode}
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                row["skipped"] = f"time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"
            else:
                try:
                    row |= measure(method, bits, extra, mode, x, xin, gb, device, args)
                except Exception as e:  # noqa: BLE001 - one method failing must not lose the others
                    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                    traceback.print_exc()
            row["elapsed_s"] = time.perf_counter() - t_start
            results.append(row)
            print(json.dumps(row), flush=True)
            write(report)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    peers = report["peers"]
    try:
        from pyturboquant.core import MSEQuantizer

        xf = x.float()
        for bits in (1, 2, 3, 4):
            p = MSEQuantizer(d, bits, device=device)
            pt = p.quantize(xf)
            tq = timer(lambda p=p: p.quantize(xf), device, args.warmup, args.iters)
            td = timer(lambda p=p, pt=pt: p.dequantize(pt), device, args.warmup, args.iters)
            peers.append(
                {
                    "peer": "pyturboquant",
                    "method": "mse",
                    "bits": bits,
                    "quantize_GBps": gb / tq,
                    "dequantize_GBps": gb / td,
                }
            )
            print(json.dumps(peers[-1]), flush=True)
    except ImportError:
        peers.append({"peer": "pyturboquant", "skipped": "not installed"})
    except Exception as e:  # noqa: BLE001
        peers.append({"peer": "pyturboquant", "error": f"{type(e).__name__}: {e}"})
    report["total_s"] = time.perf_counter() - t_start
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--vectors", type=int, default=None, help="default 8M (2 GB bf16); smoke 4096")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=230.0, help="skip rows started after this")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test)")
    ap.add_argument("--cpu", action="store_true", help="force the CPU")
    args = ap.parse_args()
    if args.vectors is None:
        args.vectors = 4096 if args.smoke else 8 * 1024 * 1024
    if args.smoke:
        args.warmup, args.iters = 1, 2
    args.vectors -= args.vectors % 64
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_quantizers.json"

    def write(report: dict) -> None:
        path.write_text(json.dumps(report, indent=2) + "\n")

    report = run(args, write)
    write(report)
    print(f"wrote {path} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
