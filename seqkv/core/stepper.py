"""The HF forward procedure that a coder's encoder and decoder both run, and the numerics
helpers every tier shares (device labels, determinism, attention path, the cache keyword).

Range decoding needs the decoder's probabilities bit-identical to the encoder's, and a
model's logits depend on how they were computed (measured on SmolLM2: prefill and
incremental logits differ by up to 7e-5 on a CPU in fp32 and 0.375 in bf16 on an H200, where
the batch size changes them too). The decoder can only go token by token, so both sides run
exactly ``run_lockstep``: a fixed group of streams advanced in lockstep, one token per stream
per step, from a fixed prime token at position 0, with a DynamicCache. Same group size, same
shapes, same kernels on both sides. It serves the architectures the integer engine
(seqkv.engine) does not cover, and the store's paths coded before the engine.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from .distribution import quantized_pmf
from .errors import ModelMismatchError
from .models import LoadedModel

PROCEDURE = "lockstep-v1"  # DynamicCache, one token per stream per step: any model, any device
# The HF fallback for architectures the integer engine (seqkv.engine) does not cover: exact
# only on the same device, dtype, attention path, group size and CPU thread count.
PROCEDURES = (PROCEDURE,)

# on_step(step, pmf [B, V+2] int64, logits [B, V]) -> the tokens at this step [B] (long)
StepFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NumericsProfile:
    """Everything that decides the bits of the coder's probabilities, recorded in every blob."""

    procedure: str
    device: str
    dtype: str
    attn: str
    batch: int
    threads: int  # CPU float kernels split their sums by thread count; 0 on accelerators

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, recorded: dict) -> None:
        """Refuse to decode a blob whose numerics this machine cannot reproduce.

        Blobs of seqkv 0.1 recorded no thread count: they are decoded as they come, and a
        failure is reported as that format's (``compress.decompress_tokens``)."""
        for key in ("procedure", "device", "dtype", "attn", "batch", "threads"):
            if key == "threads" and key not in recorded:
                continue
            if recorded.get(key) != getattr(self, key):
                raise ModelMismatchError(
                    f"blob was coded with numerics {key}={recorded.get(key)!r}; "
                    f"this decoder has {key}={getattr(self, key)!r}"
                )


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def configure_determinism(device: torch.device) -> None:
    """Deterministic kernels on GPUs; set before the first cuBLAS call of the process."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def numerics_profile(lm: LoadedModel, batch: int, procedure: str = PROCEDURE) -> NumericsProfile:
    use_repeatable_attention(lm)
    return NumericsProfile(
        procedure=procedure,
        device=device_label(lm.device),
        dtype=lm.fingerprint.dtype,
        attn=str(getattr(lm.config, "_attn_implementation", None) or "default"),
        batch=batch,
        threads=torch.get_num_threads() if lm.device.type == "cpu" else 0,
    )


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in late 5.x; accept both."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def use_repeatable_attention(lm: LoadedModel) -> None:
    """On GPUs, code with the eager attention path.

    Measured on the H200 (bf16, transformers 5.17, torch 2.11): SDPA's decode kernels gave
    different probabilities for the same sequence run twice once 128 positions were cached;
    the eager path was repeatable. The choice is recorded in every blob's numerics profile.
    """
    if lm.device.type != "cpu" and lm.config._attn_implementation != "eager":
        lm.model.set_attn_implementation("eager")


@torch.inference_mode()
def run_lockstep(
    lm: LoadedModel, n_streams: int, n_steps: int, on_step: StepFn, procedure: str = PROCEDURE
) -> None:
    """Advance n_streams streams n_steps tokens; on_step picks each step's tokens.

    It runs the model as configured: callers that code (TokenCodec, the store) fix the
    attention path through ``use_repeatable_attention`` / ``numerics_profile`` first, so a
    measurement can still run it under another path (benchmarks/gpu_tokens.py does, for SDPA).
    """
    if procedure not in PROCEDURES:
        raise ModelMismatchError(f"unknown coding procedure {procedure!r}")
    device = lm.device
    configure_determinism(device)
    cache = DynamicCache(config=lm.config)
    inputs = torch.full((n_streams, 1), lm.prime_token(), dtype=torch.long, device=device)
    kwarg = cache_kwarg(lm.model)
    for step in range(n_steps):
        out = lm.model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{kwarg: cache})
        logits = out.logits[:, -1, :]
        tokens = on_step(step, quantized_pmf(logits), logits)
        inputs = tokens.view(n_streams, 1).to(device=device, dtype=torch.long)
