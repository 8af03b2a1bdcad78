"""Plot the delta tier's measured ratios: one bar per predictor and mode, per restoring machine.

    python benchmarks/plot_delta.py   # reads benchmarks/results/delta_*.json, writes delta.png
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CAP = 2e5
SOURCES = [  # (file, label, where: None = every row)
    ("delta_cpu_smollm2_bf16_batched.json", "CPU cache, CPU restore", None),
    ("delta_h200.json", "H200 cache, H200 restore", "gpu"),
    ("delta_cpu_restores_h200_cache.json", "H200 cache, CPU restore", None),
]


def label(row: dict) -> str:
    p = row["predictor"]
    if p == "recompute":
        p += f" {row.get('dtype') or 'fp32'}" + (f"/{row['attn']}" if row.get("attn") else "")
    for key, name in (("max_abs_error", "|e|<="), ("rel_mse", "relMSE<=")):
        if row.get(key) is not None:
            p += f", {name}{row[key]:g}"
    return p


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, title, where in SOURCES:
        path = RESULTS / name
        if not path.exists():
            continue
        rows = [r for r in json.loads(path.read_text())["rows"]
                if r.get("source", "bf16") in ("bf16", "bf16-batched") or "safetensors" in
                str(r.get("source"))]
        rows = [r for r in rows if (where is None or r.get("where") == where)
                and r.get("bits_per_component") is not None and r.get("text", 0) == 0]
        panels.append((title, rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        names = [label(r) for r in rows]
        # A residual of 0 bits (the prediction was the cache) is drawn at the axis' end.
        ratios = [16.0 / r["bits_per_component"] if r["bits_per_component"] else CAP
                  for r in rows]
        colors = ["tab:blue" if not r["bits_per_component"] else
                  "tab:green" if "max_abs_error" not in r and "rel_mse" not in r
                  else "tab:orange" for r in rows]
        ax.barh(names, ratios, color=colors)
        ax.set_xscale("log")
        ax.set_xlim(1, CAP)
        ax.axvline(8, color="k", ls="--", lw=1)
        ax.text(8, -0.8, " 8x goal", fontsize=8)
        ax.axvline(1.45, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("bf16 bits / residual bits (log)\ngreen lossless, orange lossy, "
                      "blue: predicted exactly (0 residual bits)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("Delta tier on SmolLM2-135M bf16 caches (512 tokens)")
    fig.tight_layout()
    fig.savefig(RESULTS / "delta.png", dpi=110)
    print(RESULTS / "delta.png")


if __name__ == "__main__":
    main()
