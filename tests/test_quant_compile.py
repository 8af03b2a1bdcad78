"""The compile switch of the quantizers (seqkv.quant.jit) and the CPU kernels' exactness."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from seqkv.core.errors import SeqkvError
from seqkv.quant import get_quantizer, jit, packing
from seqkv.quant.turboquant import cell_thresholds, float_codes

CASES = [
    ("turboquant-mse", 3, {}),
    ("turboquant-prod", 3, {}),
    ("turboquant-outlier", 2.5, {}),
    ("kivi", 2, {"axis": "channel"}),
    ("kivi", 4, {"axis": "token"}),
    ("fp8", 8, {}),
    ("int8", 8, {}),
]


def _same(a, b) -> None:
    assert a.bits == b.bits and a.data.keys() == b.data.keys()
    for k in a.data:
        assert torch.equal(a.data[k], b.data[k]), k


def test_modes_resolve_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not jit.wants_compile("auto", cpu) and jit.wants_compile("auto", cuda)
    assert jit.wants_compile(True, cpu) and jit.wants_compile("always", cpu)
    assert not jit.wants_compile(False, cuda) and not jit.wants_compile("never", cuda)
    with pytest.raises(SeqkvError):
        get_quantizer("turboquant-mse", 3, compile="sometimes")


@pytest.mark.parametrize("name,bits,extra", CASES)
def test_auto_on_cpu_is_eager_and_identical(name, bits, extra, monkeypatch):
    x = torch.randn(2, 64, 128)
    auto = get_quantizer(name, bits, **extra)
    eager = get_quantizer(name, bits, compile="never", **extra)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled on the CPU"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        qa, qe = auto.quantize(x), eager.quantize(x)
        _same(qa, qe)
        assert torch.equal(auto.dequantize(qa), eager.dequantize(qe))


def test_cpu_row_blocks_do_not_change_results(monkeypatch):
    x = torch.randn(1000, 128)
    for name, bits in (("turboquant-mse", 2), ("turboquant-mse", 3), ("turboquant-prod", 4)):
        q = get_quantizer(name, bits)
        whole = q.quantize(x)
        xw = q.dequantize(whole)
        monkeypatch.setattr(jit, "CPU_BLOCK_ROWS", 96)
        blocked = q.quantize(x)
        _same(whole, blocked)
        assert torch.equal(q.dequantize(blocked), xw)
        monkeypatch.undo()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_float_codes_equal_bucketize_including_ties(bits):
    thr = cell_thresholds(128, bits)
    b = torch.tensor(thr)
    ties = torch.cat([b, -b, b.nextafter(b + 1), b.nextafter(b - 1), torch.tensor([0.0, -0.0])])
    u = torch.cat([torch.randn(4000) * 0.12, ties, torch.tensor([5.0, -5.0])])
    assert torch.equal(float_codes(u.clone(), thr).long(), torch.bucketize(u, b))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_float_packing_equals_byte_packing(bits):
    codes = torch.randint(0, 1 << bits, (7, 128))
    assert torch.equal(packing.pack_float_codes(codes.float(), bits), packing.pack(codes, bits))


def _breaks_graph(x: torch.Tensor, *, k: int) -> torch.Tensor:
    torch._dynamo.graph_break()  # no full graph: compiling must fail
    return x * 4 * k


def test_failed_compilation_falls_back_to_eager_with_one_warning():
    x = torch.ones(4)
    with pytest.warns(RuntimeWarning, match="_breaks_graph"):
        out = jit.run(_breaks_graph, "always", (x,), {"k": 2})
    assert torch.equal(out, x * 8)  # the eager result
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(jit.run(_breaks_graph, "always", (x,), {"k": 3}), x * 12)
        assert torch.equal(jit.run(_breaks_graph, "always", (x,), {"k": 2}), x * 8)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
@pytest.mark.parametrize("name,bits,extra", [CASES[0], CASES[3], CASES[6]])
def test_forced_compile_on_cpu_matches_eager(name, bits, extra):
    eager = get_quantizer(name, bits, compile="never", **extra)
    comp = get_quantizer(name, bits, compile="always", **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        for t in (64, 96):  # a second token count: one dynamic-shape recompile
            x = torch.randn(2, t, 128)
            qe, qc = eager.quantize(x), comp.quantize(x)
            assert qe.bits == qc.bits
            for k in qe.data:
                if qe.data[k].dtype in (torch.uint8, torch.int8):
                    assert (qe.data[k] != qc.data[k]).float().mean() < 1e-2, k  # rounding ties
                else:
                    torch.testing.assert_close(
                        qe.data[k].float(), qc.data[k].float(), rtol=2e-3, atol=1e-5
                    )
            torch.testing.assert_close(comp.dequantize(qe), eager.dequantize(qe))
