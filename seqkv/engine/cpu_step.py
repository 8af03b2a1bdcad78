"""The pieces of the engine's decode step on the CPU, through cpu_kernels: IntModel.step_logits
drives them (its StepOps) and gives its own integers, in six kernel calls per layer.

The step reads every weight once, in the kernels' tile layout, and keeps keys and values as
int32 (|x| <= 2**23), so a stream's step costs about the weights' bytes over the memory's
bandwidth plus a fraction of a millisecond of calls. The operations, their order and every
rounding are model.py's (tested position by position against the prefill, for every supported
architecture); a model the kernels cannot run (no compiler, neither AVX-512 VNNI nor AVX2) has
none.
"""

from __future__ import annotations

import threading

import torch

from . import cpu_kernels as ck
from . import tables
from .model import QKV_FRAC, IntModel, StepCache, cpu_norm_heads_
from .weights import FRAC, IntLinear, IntNorm


class CpuStep:
    """Decode steps of one IntModel on the CPU."""

    def __init__(self, model: IntModel) -> None:
        self.m, self.s, self.w = model, model.spec, model.w
        self.lib = ck.library()
        self.exp_attn = model.exp_attn_f.contiguous()
        self.exp_prob = model.exp_prob.contiguous()
        self.act = model.act_table.contiguous()
        # The step's intermediate rows, kept from step to step (per thread: a model's step is
        # shared by a server's threads): a one-stream step makes ~180 kernel calls, and a
        # fresh tensor for each output cost a few microseconds of its ~16 ms. Only what the
        # step consumes itself; the logits it returns are new each time.
        self._kept = threading.local()

    @staticmethod
    def for_model(model: IntModel) -> CpuStep | None:
        """The model's CPU step, or None where the kernels do not run (then use step_logits)."""
        if model.device.type != "cpu" or model.spec.head_dim > ck.MAX_HEAD_DIM:
            return None
        if not ck.available():
            return None
        step = getattr(model, "_cpu_step", None)
        if step is None:
            step = model._cpu_step = CpuStep(model)
        return step

    def new_cache(self, batch: int, capacity: int) -> StepCache:
        """An int32 cache (model.prefill_hidden writes a context's keys and values into it)."""
        s = self.s
        self.m.prepare(capacity)
        shape = (batch, s.n_kv, capacity, s.head_dim)
        return StepCache(keys=[torch.zeros(shape, dtype=torch.int32) for _ in range(s.n_layers)],
                         values=[torch.zeros(shape, dtype=torch.int32)
                                 for _ in range(s.n_layers)],
                         capacity=capacity)

    def _rows(self, key: tuple, m: int, n: int) -> torch.Tensor:
        """A kept int64 [m, n] buffer for one intermediate of the step (key: which one)."""
        kept = self._kept.__dict__.setdefault("rows", {})
        t = kept.get(key)
        if t is None or t.shape != (m, n):
            t = kept[key] = torch.empty((m, n), dtype=torch.int64)
        return t

    # -- the step's pieces (model.StepOps) -----------------------------------------------------
    def step_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.m.embed(tokens).contiguous()

    def linear(self, x: torch.Tensor, lin: IntLinear) -> torch.Tensor:
        out = self._rows((id(lin), "out"), x.shape[0], lin.w.shape[0])
        return ck.linear(x, lin.w, lin.scale, lin.bias, out)

    def norm_linear(self, h: torch.Tensor, delta: torch.Tensor | None, post: IntNorm | None,
                    norm: IntNorm, lin: IntLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """model.norm_linear: h += delta (normed by post where the model has one), in place,
        and linear(rms_norm(h, norm), lin) (the head's logits in a new tensor: the step's
        result)."""
        m, k = h.shape
        out = None if lin is self.w.head else self._rows((id(lin), "out"), m, lin.w.shape[0])
        return h, ck.norm_linear(h, delta, post, norm, lin.w, lin.scale, lin.bias, FRAC, out,
                                 self._rows((id(lin), "tmp"), m, k))

    def mlp_down(self, gate_up: torch.Tensor, down: IntLinear) -> torch.Tensor:
        act = ck.gated_activation(gate_up, self.act, FRAC, tables.SIGMOID_IN,
                                  tables.SIGMOID_OUT,
                                  self._rows((id(down), "act"), gate_up.shape[0],
                                             gate_up.shape[1] // 2))
        return self.linear(act, down)

    def step_attend(self, i: int, qkv: torch.Tensor, cache: StepCache, pos: torch.Tensor,
                    span: int) -> torch.Tensor:
        """The rotation, the cache write and the attention of layer i as one kernel (over
        each stream's own keys: ``span`` is not needed), then its output projection."""
        s, m = self.s, self.m
        layer = self.w.layers[i]
        nq, b = s.n_heads * s.head_dim, qkv.shape[0]
        if layer.q_norm is not None:
            cpu_norm_heads_(qkv, layer.q_norm, layer.k_norm, s)
        cos, sin = m.rope(s.thetas[i], cache.capacity)
        att, work = self._rows((i, "att"), b, nq), self._rows((i, "work"), b, nq)
        self.lib.decode_attention(
            qkv.data_ptr(), b, s.n_heads, s.n_kv, s.head_dim, pos.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), FRAC + tables.ROPE_BITS - QKV_FRAC, FRAC - QKV_FRAC, m._qkv_limit,
            cache.keys[i].data_ptr(), cache.values[i].data_ptr(), cache.capacity,
            s.windows[i], self.exp_attn.data_ptr(), self.exp_attn.shape[0], m._index_scale,
            float(1 << (FRAC - QKV_FRAC)), att.data_ptr(), work.data_ptr())
        return self.linear(att, layer.o)

    # -- the step ----------------------------------------------------------------------------
    def logits(self, cache: StepCache, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """IntModel.step_logits(cache, tokens, pos) through these kernels: Q16 logits [B, V]
        of the next token after feeding tokens [B] at positions pos [B]."""
        if cache.dtype != torch.int32 or bool((pos >= cache.capacity).any()):
            raise ValueError("CpuStep needs its own int32 cache, positions below its capacity")
        return self.m.step_logits(cache, tokens, pos.contiguous(), ops=self)

    def pmf(self, cache: StepCache, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """IntModel.pmf of the step's logits: frequencies [B, V + 2]."""
        from ..core.distribution import TOTAL

        return ck.pmf_rows(self.logits(cache, tokens, pos), self.exp_prob,
                           FRAC - tables.EXP_STEP, TOTAL)
