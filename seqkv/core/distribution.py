"""Fixed-point next-token distributions: the bridge between a model's logits and the coder.

The coder sees integer frequencies summing to exactly 2**PRECISION. Every token gets at
least 1 (so any token can be coded), and two dummy symbols that are never coded sit at
both ends of the alphabet. Because of them, each real token's interval [start, start+freq)
is strictly inside (0, 2**PRECISION), so a token can be coded under the three-symbol model
[start, freq, rest] with exactly the bits it costs under the full distribution: the
encoder only ever needs (start, freq) per token, not the whole distribution.
"""

from __future__ import annotations

import numpy as np
import torch

PRECISION = 24
TOTAL = 1 << PRECISION


def quantized_pmf(logits: torch.Tensor) -> torch.Tensor:
    """Integer frequencies [..., V + 2] (int64) summing to 2**PRECISION; token t is symbol t + 1.

    Deterministic for bit-identical logits on one device: softmax, floor and an exact
    integer sum; the rounding remainder goes to the most probable token.
    """
    vocab = logits.shape[-1]
    budget = TOTAL - (vocab + 2)
    probs = torch.softmax(logits.float(), dim=-1)
    freq = torch.floor(probs * budget).to(torch.int64)
    remainder = budget - freq.sum(dim=-1, keepdim=True)
    freq.scatter_add_(-1, probs.argmax(dim=-1, keepdim=True), remainder)
    ones = torch.ones_like(freq[..., :1])
    return torch.cat([ones, freq + 1, ones], dim=-1)


def symbol_intervals(pmf: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, freq) of each token's interval under its row's pmf."""
    symbols = (tokens + 1).unsqueeze(-1)
    freq = pmf.gather(-1, symbols).squeeze(-1)
    start = (pmf.cumsum(dim=-1) - pmf).gather(-1, symbols).squeeze(-1)
    return start, freq


def reduced_weights(start: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Rows [start, freq, rest] - 1 as float64: constriction's Categorical(perfect=False)
    maps these exact integer weights back to the exact frequencies (free weight = total - n).
    The coded symbol is always 1."""
    start = start.astype(np.int64)
    freq = freq.astype(np.int64)
    rows = np.stack([start, freq, TOTAL - start - freq], axis=-1)
    return (rows - 1).astype(np.float64)


def full_weights(pmf_row: np.ndarray) -> np.ndarray:
    """The full distribution in the same exact form constriction decodes under."""
    return (pmf_row.astype(np.int64) - 1).astype(np.float64)


def model_bits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own cross-entropy of each token, in bits (float64), for overhead reports."""
    logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return -logp / np.log(2.0)
