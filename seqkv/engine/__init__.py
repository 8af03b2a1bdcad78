"""The portable integer coder engine: the coder's probabilities as a pure integer function of
(the integerized weights, the tokens), identical on the CPU and any CUDA GPU, at any group
size and thread count, whether computed by prefill or step by step.

Rooms: ``tables`` (nonlinearities as exactly built tables), ``intops`` (exact integer
primitives and GEMMs), ``weights`` (HF model -> integer weights; which architectures map),
``model`` (the forward: prefill and step), ``codec`` (token streams coded and decoded with it).
"""

from ..core.version import ENGINE_ID
from .codec import EngineCodec
from .model import IntModel
from .weights import IntWeights, Unsupported, arch_spec, integerize

__all__ = ["ENGINE_ID", "EngineCodec", "IntModel", "IntWeights", "Unsupported", "arch_spec",
           "integerize"]
