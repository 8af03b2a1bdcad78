"""Engine 2's int8 weights against engine 1's int8 + rounding residual, simulated in float (dev).

The fp32 SmolLM2 with every linear weight rounded per output channel to int8 (as engine 2
integerizes it), with the int8 rounding residual (engine 1), without it, or with it on the down
projections only; the cross-entropy of every 8th Brown chunk of brown256.npy (128 x 256 tokens
after the prime token) against the fp32 model's: aggregate, worst chunk, 90th percentile.

    python benchmarks/dev/residual_sensitivity.py brown256.npy     # CPU, ~4 minutes

Output of 2026-12-01 (2-core EPYC): benchmarks/results/engine_dev_cpu.txt.
"""

import sys

import numpy as np
import torch

from seqkv.core.models import load_model


def rounded(w: torch.Tensor, residual: bool) -> torch.Tensor:
    w = w.double()
    step = w.abs().amax(1) / 127
    step[step == 0] = 1
    exact = w / step[:, None]
    q = exact.round().clamp(-127, 127)
    if residual:
        q = q + ((exact - q) * 256).round().clamp(-127, 127) / 256
    return (q * step[:, None]).float()


def main() -> None:
    lm = load_model()
    model = lm.model.float().eval()
    ids = torch.from_numpy(np.load(sys.argv[1])[::8].astype(np.int64))
    inputs = torch.cat([torch.full_like(ids[:, :1], lm.prime_token()), ids[:, :-1]], 1)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.inference_mode()
    def chunk_bits() -> np.ndarray:
        out = []
        for b in range(0, len(ids), 16):
            logp = model(inputs[b : b + 16]).logits.double().log_softmax(-1)
            out.append(-logp.gather(-1, ids[b : b + 16, :, None]).squeeze(-1).sum(1).numpy())
        return np.concatenate(out)

    base = chunk_bits()
    variants = {"engine 1 (residual everywhere)": lambda n: True,
                "engine 2 (no residual)": lambda n: False,
                "residual on down projections only": lambda n: "down_proj" in n}
    for label, keep in variants.items():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.data.copy_(rounded(original[name], keep(name)))
        ratio = chunk_bits() / base
        print(f"{label}: {len(ids)} chunks, aggregate {ratio @ base / base.sum():.5f}x, "
              f"worst chunk {ratio.max():.4f}x, p90 {np.quantile(ratio, 0.9):.4f}x", flush=True)


if __name__ == "__main__":
    main()
