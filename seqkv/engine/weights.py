"""From an HF causal LM to the engine's integer weights, and which architectures map.

Linear weights become int8 per output channel with a dyadic multiplier per channel
(mantissa * 2**-exponent), norm gains int16 with a shared fractional width, biases Q16:
derived once on the CPU from the float weights with IEEE-exact numpy steps, then hashed, so
a blob names the very integers it was coded under.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .tables import EXP_STEP

FRAC = 16  # the residual stream and every activation between GEMMs: int64 Q16


@dataclass(frozen=True)
class ArchSpec:
    """The few facts that tell one supported architecture from another."""

    family: str  # "llama" (Llama, Qwen2, Qwen3) or "gemma3"
    n_layers: int
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    eps: float
    thetas: tuple[float, ...]  # rotary base of each layer
    windows: tuple[int, ...]  # sliding window of each layer, 0 for global attention
    attn_scale: float
    act: str  # "silu" or "gelu_tanh"
    qk_norm: bool
    sandwich: bool  # Gemma's extra norms after attention and around the MLP
    norm_offset: float  # Gemma's RMSNorm multiplies by (1 + w)
    embed_scale: float
    max_positions: int


@dataclass
class IntLinear:
    w: torch.Tensor  # int8 [out, in]
    mant: torch.Tensor  # int64 [out]
    exp: torch.Tensor  # int64 [out]
    bias: torch.Tensor | None = None  # int64 [out], Q16
    scale: torch.Tensor | None = None  # float64 [out]: mant * 2**-exp, exact

    def __post_init__(self) -> None:
        if self.scale is None:  # int_matmul returns twice the product in step units
            self.scale = torch.ldexp(self.mant.to(torch.float64), -self.exp - 1)


@dataclass
class IntNorm:
    gain: torch.Tensor  # int64 [dim], Q(frac)
    frac: int
    eps32: int  # floor(eps * 2**32)


@dataclass
class IntLayer:
    attn_norm: IntNorm
    qkv: IntLinear
    o: IntLinear
    mlp_norm: IntNorm
    gate_up: IntLinear
    down: IntLinear
    q_norm: IntNorm | None = None
    k_norm: IntNorm | None = None
    post_attn_norm: IntNorm | None = None
    post_mlp_norm: IntNorm | None = None


@dataclass
class IntWeights:
    spec: ArchSpec
    embed: torch.Tensor  # int16 [vocab, hidden]
    embed_mant: torch.Tensor  # int64 [vocab]: input embedding multiplier (embed_scale folded in)
    embed_exp: torch.Tensor
    layers: list[IntLayer]
    final_norm: IntNorm
    head: IntLinear
    digest: bytes = field(default=b"")

    def to(self, device: torch.device | str) -> IntWeights:
        def move(x):
            if isinstance(x, torch.Tensor):
                return x.to(device)
            if isinstance(x, (IntLinear, IntNorm, IntLayer)):
                return type(x)(**{k: move(v) for k, v in vars(x).items()})
            return x

        return IntWeights(self.spec, move(self.embed), move(self.embed_mant),
                          move(self.embed_exp), [move(layer) for layer in self.layers],
                          move(self.final_norm), move(self.head), self.digest)


class Unsupported(Exception):
    """The architecture has no integer mapping; callers fall back to the HF procedure."""


def _rope_theta(cfg, layer_type: str | None = None) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise Unsupported(f"rope type {rope_type!r}")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise Unsupported("no rope theta")
    return float(theta)


def arch_spec(config) -> ArchSpec:
    """The spec of a supported config, or Unsupported."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = getattr(cfg, "model_type", "")
    if kind not in ("llama", "qwen2", "qwen3", "mistral", "gemma3_text"):
        raise Unsupported(f"model type {kind!r}")
    n = int(cfg.num_hidden_layers)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    common = dict(
        n_layers=n, hidden=int(cfg.hidden_size), n_heads=int(cfg.num_attention_heads),
        n_kv=int(cfg.num_key_value_heads), head_dim=head_dim, vocab=int(cfg.vocab_size),
        eps=float(cfg.rms_norm_eps), max_positions=int(cfg.max_position_embeddings),
    )
    if kind in ("llama", "qwen2", "qwen3", "mistral"):
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise Unsupported(f"activation {act!r}")
        if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
            if kind != "qwen2":
                raise Unsupported("biases")
        window = getattr(cfg, "sliding_window", None)
        if kind in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
            window = None
        if window and kind != "mistral":
            raise Unsupported("sliding window")
        theta = _rope_theta(cfg)
        return ArchSpec(family="llama", thetas=(theta,) * n, windows=(int(window or 0),) * n,
                        attn_scale=head_dim**-0.5, act="silu", qk_norm=kind == "qwen3",
                        sandwich=False, norm_offset=0.0, embed_scale=1.0, **common)
    if kind == "gemma3_text":
        if getattr(cfg, "final_logit_softcapping", None) or getattr(
            cfg, "attn_logit_softcapping", None
        ):
            raise Unsupported("logit soft-capping")
        types = list(cfg.layer_types)
        windows = tuple(int(cfg.sliding_window) if t == "sliding_attention" else 0 for t in types)
        thetas = tuple(_rope_theta(cfg, t) for t in types)
        return ArchSpec(family="gemma3", thetas=thetas, windows=windows,
                        attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5, act="gelu_tanh",
                        qk_norm=True, sandwich=True, norm_offset=1.0,
                        embed_scale=float(cfg.hidden_size) ** 0.5, **common)
    raise Unsupported(f"model type {kind!r}")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _dyadic(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scale = mant * 2**-exp with mant in [2**14, 2**15] (0 for 0), exactly as frexp says."""
    frac, ex = np.frexp(scale)
    mant = np.rint(frac * (1 << 15)).astype(np.int64)
    return mant, (15 - ex).astype(np.int64)


def _linear(weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None,
            scale: float = 1.0, levels: int = 127) -> IntLinear:
    """Per-row symmetric quantization to +-levels (int8 GEMM weights; int16 embeddings).

    Engine 1 added an int8 matrix of the rounding residuals (x 256): a third GEMM product per
    weight and twice the weights' bytes, for 0.1% of bits on SmolLM2's Brown chunks (1.00002x
    -> 1.0011x the float model's cross-entropy; BENCHMARKS.md)."""
    w = np.concatenate([_np(x) for x in weights]) * scale
    amax = np.abs(w).max(axis=1)
    step = amax / float(levels)
    safe = np.where(step > 0, step, 1.0)
    exact = w / safe[:, None]
    q = np.clip(np.rint(exact), -levels, levels).astype(np.int8 if levels < 128 else np.int16)
    mant, ex = _dyadic(step)
    bias = None
    if biases is not None and any(b is not None for b in biases):
        b = np.concatenate([_np(x) if x is not None else np.zeros(n.shape[0])
                            for x, n in zip(biases, weights, strict=True)])
        bias = torch.from_numpy(np.rint(b * (1 << FRAC)).astype(np.int64))
    return IntLinear(torch.from_numpy(q), torch.from_numpy(mant),
                     torch.from_numpy(ex), bias)


def _norm(module, spec: ArchSpec) -> IntNorm:
    g = _np(module.weight) + spec.norm_offset
    top = float(np.abs(g).max())
    frac = 15 - math.frexp(top)[1] if top > 0 else 15
    gain = np.rint(np.ldexp(g, frac)).astype(np.int64)
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", spec.eps)))
    return IntNorm(torch.from_numpy(gain), frac, int(math.floor(eps * 2**32)))


def integerize(model: torch.nn.Module) -> IntWeights:
    """The engine's integer weights of an HF model (any device), or Unsupported."""
    spec = arch_spec(model.config)
    body = model.model
    layers = []
    for block in body.layers:
        att, mlp = block.self_attn, block.mlp
        projs = [att.q_proj, att.k_proj, att.v_proj]
        layer = IntLayer(
            attn_norm=_norm(block.input_layernorm, spec),
            qkv=_linear([p.weight for p in projs], [p.bias for p in projs]),
            o=_linear([att.o_proj.weight]),
            mlp_norm=_norm(block.pre_feedforward_layernorm if spec.sandwich
                           else block.post_attention_layernorm, spec),
            gate_up=_linear([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=_linear([mlp.down_proj.weight]),
        )
        if spec.qk_norm:
            layer.q_norm, layer.k_norm = _norm(att.q_norm, spec), _norm(att.k_norm, spec)
        if spec.sandwich:
            layer.post_attn_norm = _norm(block.post_attention_layernorm, spec)
            layer.post_mlp_norm = _norm(block.post_feedforward_layernorm, spec)
        layers.append(layer)
    head_w = model.get_output_embeddings().weight
    embed_w = body.embed_tokens.weight
    head = _linear([head_w])
    # The input embedding is a lookup, not a GEMM: int16 rows cost nothing in speed and
    # int8 rows put 1% of noise into the residual stream before the first layer.
    embed = _linear([embed_w], scale=spec.embed_scale, levels=32767)
    weights = IntWeights(spec, embed.w, embed.mant, embed.exp, layers,
                         _norm(body.norm, spec), head)
    weights.digest = digest(weights)
    return weights


def digest(weights: IntWeights) -> bytes:
    """blake2b of the spec, the table parameters and every integer: the engine's model id."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((weights.spec, EXP_STEP)).encode())

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            h.update(str(x.dtype).encode())
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(x, (IntLinear, IntNorm, IntLayer)):
            for v in vars(x).values():
                feed(v)
        elif x is not None:
            h.update(repr(x).encode())

    for part in (weights.embed, weights.embed_mant, weights.embed_exp, *weights.layers,
                 weights.final_norm, weights.head):
        feed(part)
    return h.digest()


def _flatten(weights: IntWeights) -> dict[str, torch.Tensor]:
    out = {"embed": weights.embed, "embed_mant": weights.embed_mant,
           "embed_exp": weights.embed_exp}

    def put(prefix: str, part) -> None:
        for name, value in vars(part).items():
            if isinstance(value, torch.Tensor):
                out[f"{prefix}.{name}"] = value
            elif isinstance(value, (IntLinear, IntNorm)):
                put(f"{prefix}.{name}", value)
            elif isinstance(value, int):
                out[f"{prefix}.{name}"] = torch.tensor(value, dtype=torch.int64)

    for i, layer in enumerate(weights.layers):
        put(f"layers.{i}", layer)
    put("final_norm", weights.final_norm)
    put("head", weights.head)
    return {k: v.contiguous() for k, v in out.items()}


def save(weights: IntWeights, path) -> None:
    """Write integer weights (safetensors), so a model is integerized once per machine."""
    from safetensors.torch import save_file

    save_file(_flatten(weights), str(path), metadata={"digest": weights.digest.hex()})


def load(path, spec: ArchSpec) -> IntWeights:
    """Integer weights saved by ``save``; the digest is recomputed and must match."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        recorded = (f.metadata() or {}).get("digest")

    def lin(p: str) -> IntLinear:
        return IntLinear(t[f"{p}.w"], t[f"{p}.mant"], t[f"{p}.exp"], t.get(f"{p}.bias"))

    def norm(p: str) -> IntNorm | None:
        if f"{p}.gain" not in t:
            return None
        return IntNorm(t[f"{p}.gain"], int(t[f"{p}.frac"]), int(t[f"{p}.eps32"]))

    layers = [
        IntLayer(norm(f"layers.{i}.attn_norm"), lin(f"layers.{i}.qkv"), lin(f"layers.{i}.o"),
                 norm(f"layers.{i}.mlp_norm"), lin(f"layers.{i}.gate_up"),
                 lin(f"layers.{i}.down"), norm(f"layers.{i}.q_norm"),
                 norm(f"layers.{i}.k_norm"), norm(f"layers.{i}.post_attn_norm"),
                 norm(f"layers.{i}.post_mlp_norm"))
        for i in range(spec.n_layers)
    ]
    weights = IntWeights(spec, t["embed"], t["embed_mant"], t["embed_exp"], layers,
                         norm("final_norm"), lin("head"))
    weights.digest = digest(weights)
    if recorded != weights.digest.hex():
        raise ValueError("integer weights file does not match its recorded digest")
    return weights
