"""`seqkv quantizers --json`: every method and bit width with honest numbers."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from seqkv.cli import build_app


def test_quantizers_json():
    res = CliRunner().invoke(
        build_app(), ["quantizers", "--dim", "64", "--vectors", "2048", "--json"]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    by = {(r["method"], r["bits"], r.get("axis")): r for r in rows}
    assert {"turboquant-mse", "turboquant-prod", "kivi", "fp8", "int8"} <= {
        r["method"] for r in rows
    }
    for r in rows:
        assert {"method", "bits", "mse", "ip_bias", "bits_per_component"} <= r.keys()
    tq3 = by[("turboquant-mse", 3, None)]
    assert abs(tq3["mse"] / tq3["mse_optimum"] - 1) < 0.03
    assert tq3["bits_per_component"] == 3 + (32 + 64 / 2048) / 64
    assert abs(by[("turboquant-prod", 3, None)]["ip_bias"]) < 0.03
    assert by[("turboquant-mse", 1, None)]["ip_bias"] < -0.3


def test_quantizers_bad_dim_is_one_line_error():
    res = CliRunner().invoke(build_app(), ["quantizers", "--dim", "1"])
    assert res.exit_code == 1
    assert "error" in res.output and "Traceback" not in res.output
