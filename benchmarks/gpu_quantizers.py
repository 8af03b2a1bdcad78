"""GPU throughput of seqkv's per-vector quantizers: quantize / dequantize GB/s of bf16 input.

    python benchmarks/gpu_quantizers.py --out DIR            # on a CUDA machine, d = 128
    python benchmarks/gpu_quantizers.py --out DIR --smoke    # tiny sizes, runs on the CPU too

Writes DIR/gpu_quantizers.json. Throughput = bytes of bf16 input (quantize) or of bf16 output
(dequantize) per second, timed with CUDA events after warm-up, median of --iters runs. Each
method is also checked for distortion on unit vectors (relative MSE) so a fast but wrong path
shows up. Optional torch.compile variants (--compile) and the PyPI peer pyturboquant (skipped
when not installed). Needs no network.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
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


get_quantizer = _import_quant().get_quantizer

CONFIGS = [
    *[("turboquant-mse", b, {}) for b in (1, 2, 3, 4)],
    *[("turboquant-prod", b, {}) for b in (2, 3, 4)],
    ("turboquant-mse", 3.5, {}),
    ("kivi", 2, {"axis": "token"}),
    ("kivi", 4, {"axis": "token"}),
    ("kivi", 2, {"axis": "channel"}),
    ("fp8", 8, {}),
    ("int8", 8, {}),
]


def timer(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call (CUDA events on GPUs, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
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


def distortion(q, d: int, device: torch.device) -> float:
    x = torch.randn(4096, d, device=device)
    x = (x / x.norm(dim=-1, keepdim=True)).to(torch.bfloat16)
    xh = q.dequantize(q.quantize(x)).float()
    return float(((x.float() - xh) ** 2).sum(-1).mean())


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    d = args.dim
    n = args.vectors
    x = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    gb = x.numel() * x.element_size() / 1e9
    results = []
    for method, bits, extra in CONFIGS:
        row = {"method": method, "bits": bits, **extra, "variant": "eager"}
        try:
            q = get_quantizer(method, bits, **extra)
            # KIVI expects (..., T, d): tokens on axis -2, as in a cache.
            xin = x.reshape(64, n // 64, d) if method == "kivi" else x
            qt = q.quantize(xin)
            row["bits_per_component"] = qt.bits / qt.numel
            tq = timer(lambda q=q, xin=xin: q.quantize(xin), device, args.warmup, args.iters)
            td = timer(lambda q=q, qt=qt: q.dequantize(qt), device, args.warmup, args.iters)
            row |= {
                "quantize_GBps": gb / tq,
                "dequantize_GBps": gb / td,
                "mse_unit": distortion(q, d, device),
            }
            del qt
            if args.compile and method.startswith("turboquant"):
                # Fresh, static compilation per method: otherwise dynamo turns the bit width
                # into a symbolic int on the second quantizer and fails tracing `1 << bits`.
                torch._dynamo.reset()
                cq = torch.compile(q.quantize, dynamic=False)
                cd = torch.compile(q.dequantize, dynamic=False)
                qt = cq(xin)
                tq = timer(lambda cq=cq, xin=xin: cq(xin), device, args.warmup, args.iters)
                td = timer(lambda cd=cd, qt=qt: cd(qt), device, args.warmup, args.iters)
                results.append(
                    {
                        **row,
                        "variant": "torch.compile",
                        "quantize_GBps": gb / tq,
                        "dequantize_GBps": gb / td,
                    }
                )
                del qt
        except Exception as e:  # noqa: BLE001 - one method failing must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        results.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peers = []
    try:
        from pyturboquant.core import InnerProductQuantizer, MSEQuantizer

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
        del InnerProductQuantizer
    except ImportError:
        peers.append({"peer": "pyturboquant", "skipped": "not installed"})
    except Exception as e:  # noqa: BLE001
        peers.append({"peer": "pyturboquant", "error": f"{type(e).__name__}: {e}"})
    return {
        "device": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dim": d,
        "vectors": n,
        "input_GB_bf16": gb,
        "warmup": args.warmup,
        "iters": args.iters,
        "results": results,
        "peers": peers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--vectors", type=int, default=None, help="default 8M (2 GB bf16); smoke 4096")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test)")
    ap.add_argument("--cpu", action="store_true", help="force the CPU")
    args = ap.parse_args()
    if args.vectors is None:
        args.vectors = 4096 if args.smoke else 8 * 1024 * 1024
    if args.smoke:
        args.warmup, args.iters = 1, 2
    args.vectors -= args.vectors % 64
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    path = args.out / "gpu_quantizers.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
