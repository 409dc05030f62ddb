"""Stacked experts: E feed-forward networks stored as three [E, out, in] tensors.

Shape legend: T tokens, H hidden, E experts, K slots per token, I expert inner dim.

Expert e computes ``down_e( act(gate_e x + bg_e) * (up_e x + bu_e) ) + bd_e`` (gated: SwiGLU,
GeGLU) or ``down_e( act(up_e x + bu_e) ) + bd_e`` (plain GELU/ReLU/SiLU MLP), with
``gate [E,I,H]``, ``up [E,I,H]``, ``down [E,H,I]`` — the layout of the model view.

Fine-grained experts (DeepSeekMoE, Dai et al. 2024, arXiv:2401.06066) are a config of this class:
split each of E experts into m experts of inner size I/m and route to m*k of the E*m
(``ExpertsConfig.fine_grained(m)``; ``split_experts`` does it to trained weights, exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn import _dispatch
from moelab.nn.routing import RoutingError


def _gpt_oss_swiglu(g: Tensor, u: Tensor, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    """GPT-OSS clamped SwiGLU: ``(clamp(u) + 1) * g' * sigmoid(alpha g')``, ``g' = min(g, limit)``."""
    g = g.clamp(max=limit)
    return (u.clamp(min=-limit, max=limit) + 1) * g * torch.sigmoid(alpha * g)


def _swiglu(g: Tensor, u: Tensor) -> Tensor:
    return F.silu(g) * u


def _swiglu_grad(g: Tensor, u: Tensor, da: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form ``(d/dg, d/du)`` of ``silu(g) * u`` (the dispatch backward's fast path)."""
    s = torch.sigmoid(g)
    silu = g * s
    du = da * silu
    # silu'(g) = s + g s (1 - s) = s (1 + g - silu)
    dg = da.mul_(u).mul_((g - silu).add_(1).mul_(s))
    return dg, du


_swiglu.grad = _swiglu_grad  # read by moelab.nn._dispatch; other activations use autograd
_swiglu.native = "swiglu"  # read by moelab.nn._native: its one-token kernel computes it in C

# name -> (function, gated). Gated functions take (h_gate, h_up); plain ones take h_up.
ACTIVATIONS = {
    "swiglu": (_swiglu, True),
    "geglu": (lambda g, u: F.gelu(g, approximate="tanh") * u, True),
    "geglu_exact": (lambda g, u: F.gelu(g) * u, True),
    "reglu": (lambda g, u: F.relu(g) * u, True),
    "gpt_oss_swiglu": (_gpt_oss_swiglu, True),
    "gelu": (F.gelu, False),
    "gelu_tanh": (lambda h: F.gelu(h, approximate="tanh"), False),
    "relu": (F.relu, False),
    "silu": (F.silu, False),
}


# the model view's GLU activation names (moelab.models) -> their entry in ACTIVATIONS
VIEW_ACTIVATIONS = {
    "silu": "swiglu",
    "gelu": "geglu_exact",
    "gelu_tanh": "geglu",
    "relu": "reglu",
    "gpt_oss_swiglu": "gpt_oss_swiglu",
}


def make_activation(name: str, params: dict[str, float] | None = None):
    """The activation function of ``name`` with its parameters bound (GPT-OSS: alpha, limit)."""
    fn, _ = ACTIVATIONS[name]
    if params:
        return lambda *h: fn(*h, **params)
    return fn


@dataclass(kw_only=True)
class ExpertsConfig:
    """E experts of hidden size H and inner size I.

    ``activation`` is one of ``ACTIVATIONS``; the ``*glu`` ones have a gate projection.
    ``impl`` picks the dispatch: ``"loop"`` (per-expert GEMMs with a hand-written backward,
    default; inference with fewer than 4 rows per expert on average, e.g. decoding, switches to
    ``grouped_mm`` where torch accepts the tensors) or ``"grouped_mm"`` (always).
    """

    num_experts: int
    hidden_size: int
    inner_size: int
    activation: str = "swiglu"
    act_params: dict[str, float] | None = None
    bias: bool = False
    impl: str = "loop"

    def __post_init__(self) -> None:
        for name in ("num_experts", "hidden_size", "inner_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RoutingError(f"ExpertsConfig.{name} must be a positive int, got {v!r}")
        if self.activation not in ACTIVATIONS:
            raise RoutingError(
                f"ExpertsConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.impl not in ("loop", "grouped_mm"):
            raise RoutingError(
                f"ExpertsConfig.impl must be 'loop' or 'grouped_mm', got {self.impl!r}"
            )

    @property
    def gated(self) -> bool:
        return ACTIVATIONS[self.activation][1]

    def fine_grained(self, m: int) -> ExpertsConfig:
        """DeepSeekMoE fine-grained segmentation: E*m experts of inner size I/m (route to m*k)."""
        if not isinstance(m, int) or m < 1 or self.inner_size % m:
            raise RoutingError(
                f"fine_grained: m={m!r} must be a positive int dividing inner_size={self.inner_size}"
            )
        return replace(self, num_experts=self.num_experts * m, inner_size=self.inner_size // m)


class Experts(nn.Module):
    """E stacked experts; ``forward(x_TH, ids_TK, weights_TK, mask_TK=None) -> y_TH``.

    ``y_t = sum_k weights[t,k] * expert_{ids[t,k]}(x_t)`` over slots with ``mask[t,k]`` True.
    """

    def __init__(self, config: ExpertsConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        E, H, I = config.num_experts, config.hidden_size, config.inner_size
        kw = {"device": device, "dtype": dtype}
        self.gate = nn.Parameter(torch.empty(E, I, H, **kw)) if config.gated else None
        self.up = nn.Parameter(torch.empty(E, I, H, **kw))
        self.down = nn.Parameter(torch.empty(E, H, I, **kw))
        self.gate_bias = (
            nn.Parameter(torch.empty(E, I, **kw)) if config.bias and config.gated else None
        )
        self.up_bias = nn.Parameter(torch.empty(E, I, **kw)) if config.bias else None
        self.down_bias = nn.Parameter(torch.empty(E, H, **kw)) if config.bias else None
        self.act = make_activation(config.activation, config.act_params)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    def reset_parameters(self) -> None:
        """Kaiming-uniform like nn.Linear, per expert; biases zero."""
        for w in (self.gate, self.up, self.down):
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[-1])
                nn.init.uniform_(w, -bound, bound)
        for b in (self.gate_bias, self.up_bias, self.down_bias):
            if b is not None:
                nn.init.zeros_(b)

    def _weights(self):
        # the parameters dict, not six Module.__getattr__ calls (cold at decode: see _one_token);
        # an absent gate or bias is a plain None attribute, so not in it
        p = self._parameters
        return (p.get("gate"), p.get("up"), p.get("down"), p.get("gate_bias"), p.get("up_bias"),
                p.get("down_bias"))

    def check(
        self, x_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor, mask_TK: Tensor | None
    ) -> None:
        self._check_shapes(x_TH, ids_TK, weights_TK, mask_TK)
        real = ids_TK if mask_TK is None else ids_TK[mask_TK]
        if real.numel():
            self._check_range(int(real.min()), int(real.max()))

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.num_experts:
            raise RoutingError(
                f"experts: ids must lie in [0, E={self.num_experts}) where mask is True; got range "
                f"[{lo}, {hi}] (router and experts disagree on the expert count?)"
            )

    def _check_shapes(self, x_TH, ids_TK, weights_TK, mask_TK) -> None:
        if x_TH.dim() != 2 or x_TH.shape[1] != self.up.shape[2]:
            raise RoutingError(
                f"experts: x must be [T, H={self.up.shape[2]}], got {tuple(x_TH.shape)}"
            )
        if (
            ids_TK.dim() != 2
            or ids_TK.shape[0] != x_TH.shape[0]
            or weights_TK.shape != ids_TK.shape
        ):
            raise RoutingError(
                f"experts: ids {tuple(ids_TK.shape)} and weights {tuple(weights_TK.shape)} must both be [T={x_TH.shape[0]}, K]"
            )
        if mask_TK is not None and mask_TK.shape != ids_TK.shape:
            raise RoutingError(
                f"experts: mask {tuple(mask_TK.shape)} must match ids {tuple(ids_TK.shape)}"
            )

    def forward(
        self, x_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor, mask_TK: Tensor | None = None
    ) -> Tensor:
        if mask_TK is None and x_TH.dim() == 2 and x_TH.shape[0] == 1:
            y_TH = self._one_token(x_TH, ids_TK, weights_TK)
            if y_TH is not None:
                return y_TH
        self.check(x_TH, ids_TK, weights_TK, mask_TK)
        plan = _dispatch.make_plan(ids_TK, mask_TK, self.num_experts)
        return self.run(x_TH, weights_TK, plan)

    def _one_token(self, x_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor | None:
        """``_dispatch.one_token_forward`` where ``run`` would take the decode path (the loop
        implementation, inference, CPU, the weights' dtype) and the ids are distinct and valid;
        else None, and the general path runs (and raises on bad shapes or ids).

        NOTE: at decode this module's Python objects are cold (other layers ran since) and every
        attribute or torch op touched costs ~10 us (bench/moe_layer.py's flushed runs), so the
        weights are looked up once and the checks read them from there."""
        weights = self._weights()
        up = weights[1]
        E, _, H = up.shape
        if (self.config.impl != "loop" or x_TH.device.type != "cpu" or x_TH.dtype != up.dtype
                or x_TH.shape[1] != H or ids_TK.dim() != 2 or ids_TK.shape[0] != 1
                or weights_TK.shape != ids_TK.shape
                or _needs_grad(x_TH, weights_TK, weights)):
            return None
        ids_K = ids_TK.tolist()[0]  # not ids_TK[0]: one torch op fewer
        if not ids_K or len(set(ids_K)) != len(ids_K) or min(ids_K) < 0 or max(ids_K) >= E:
            return None  # repeated ids: the plan's groups; out of range: the general path's error
        return _dispatch.one_token_forward(x_TH, ids_K, weights_TK, *weights, self.act)

    def run(
        self, x_MH: Tensor, weights_MK: Tensor, plan: _dispatch.Plan,
        stats: _dispatch.SlotStats | None = None,
    ) -> Tensor:
        """The experts on an already dispatched input (see `moelab.nn.dispatcher`): ``plan`` sorts
        the slots of ``weights_MK`` by expert; returns ``y_MH``, the weighted sum per row of x."""
        if x_MH.dtype != self.up.dtype:
            raise RoutingError(
                f"experts: x dtype {x_MH.dtype} != expert weights dtype {self.up.dtype}"
            )
        return run_experts(x_MH, weights_MK, plan, self._weights(), self.act,
                           impl=self.config.impl, stats=stats)

    def expert(self, e: int, x_RH: Tensor) -> Tensor:
        """Expert e on rows x_RH, with plain autograd ops (the reference)."""
        gate, up, down, bg, bu, bd = self._weights()
        h_up = F.linear(x_RH, up[e], None if bu is None else bu[e])
        if gate is None:
            a = self.act(h_up)
        else:
            a = self.act(F.linear(x_RH, gate[e], None if bg is None else bg[e]), h_up)
        return F.linear(a, down[e], None if bd is None else bd[e])

    def reference(
        self, x_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor, mask_TK: Tensor | None = None
    ) -> Tensor:
        """Slow, obvious per-token, per-slot loop; the oracle for the fast path."""
        self.check(x_TH, ids_TK, weights_TK, mask_TK)
        rows = []
        for t in range(x_TH.shape[0]):
            y = torch.zeros_like(x_TH[t])
            for k in range(ids_TK.shape[1]):
                if mask_TK is None or bool(mask_TK[t, k]):
                    y = (
                        y
                        + weights_TK[t, k].to(x_TH.dtype)
                        * self.expert(int(ids_TK[t, k]), x_TH[t : t + 1])[0]
                    )
            rows.append(y)
        return torch.stack(rows) if rows else x_TH.new_zeros(x_TH.shape)


_GROUPED_DTYPES = (torch.float32, torch.bfloat16)


def run_experts(
    x_TH: Tensor,
    w_TK: Tensor,
    plan: _dispatch.Plan,
    weights: tuple[Tensor | None, ...],
    act,
    *,
    impl: str = "loop",
    stats: _dispatch.SlotStats | None = None,
) -> Tensor:
    """Grouped experts on a dispatch plan: ``y_t = sum_slots w * expert_e(x_t)``, ``[T, H]``.

    ``weights`` = ``(gate, up, down, gate_bias, up_bias, down_bias)`` stacked ``[E, I, H]`` /
    ``[E, H, I]`` (gate and biases may be None), indexed by the plan's expert numbers; gradients
    reach whatever tensors are passed (parameters or differentiable views of them). ``impl``: see
    `ExpertsConfig`. ``stats`` (optional) is filled with each slot's output norm and
    down-projection input maximum.
    """
    x_TH = x_TH.contiguous()
    gate, up, down, bg, bu, bd = weights
    has_bias = any(b is not None for b in (bg, bu, bd))
    if impl == "grouped_mm":
        return _grouped_mm_forward(x_TH, w_TK, plan, weights, act, stats)
    if _needs_grad(x_TH, w_TK, weights):
        if plan.rows is not None:
            raise RoutingError("run_experts: a plan whose groups map to weight rows (plan.rows, an "
                               "offloading cache's slots) is for inference; no gradients")
        return _dispatch.GroupedExperts.apply(x_TH, w_TK, *weights, plan, act, stats)
    if stats is None and _decode_ok(plan):
        return _dispatch.decode_forward(x_TH, w_TK, plan, *weights, act)
    if _few_rows_grouped_ok(x_TH, plan, gate, up, down, has_bias):
        return _grouped_mm_forward(x_TH, w_TK, plan, weights, act, stats)
    return _dispatch.experts_forward(x_TH, w_TK, plan, *weights, act, stats)


def _needs_grad(x_TH: Tensor, w_TK: Tensor, weights) -> bool:
    """Whether a forward must keep what backward needs: grad mode on and any input requiring grad."""
    return torch.is_grad_enabled() and (
        x_TH.requires_grad or w_TK.requires_grad or any(p is not None and p.requires_grad for p in weights)
    )


def _decode_ok(plan) -> bool:
    """One token (decoding): ``_dispatch.decode_forward``'s ``torch.mv`` per expert measured
    ~10-30 % faster than ``grouped_mm`` and the ``mm`` loop there; at 2 tokens on par, from 4
    tokens ``grouped_mm`` is faster (bench/decode_gemv.py)."""
    return plan.T == 1 and plan.num_real > 0


def _few_rows_grouped_ok(x_TH: Tensor, plan, gate, up, down, has_bias: bool) -> bool:
    """Inference with few rows per expert (decoding): one ``grouped_mm`` call per projection
    beats a Python loop of ~8 small ops per active expert, whose dispatch overhead then costs
    as much as reading the weights. Only where ``grouped_mm`` accepts the tensors."""
    if not hasattr(F, "grouped_mm") or has_bias or x_TH.dtype not in _GROUPED_DTYPES:
        return False
    if not 0 < plan.num_real < 4 * up.shape[0]:
        return False
    align = 16 // x_TH.element_size()
    ws = [w for w in (gate, up, down) if w is not None]
    return all(_grouped_mm_layout_ok(w, align) for w in ws) and all(
        d % align == 0 for d in up.shape[1:]
    )


def _grouped_mm_layout_ok(w: Tensor, align: int) -> bool:
    """``grouped_mm`` takes strided views (e.g. the gate rows of transformers' fused
    ``gate_up_proj``) if one of the matrix dims is dense and the rest is 16-byte aligned."""
    if w.dtype not in _GROUPED_DTYPES or w.data_ptr() % 16:
        return False
    if 1 not in (w.stride(-1), w.stride(-2)):
        return False
    return all(s % align == 0 for s in w.stride() if s != 1)


def _fused_gate_up(gate: Tensor | None, up: Tensor) -> Tensor | None:
    """The ``[E, 2I, H]`` tensor whose row halves ``gate`` and ``up`` are (transformers' fused
    ``gate_up_proj``), when no gradient is needed through them; else None."""
    if gate is None or not _dispatch.halves_of_one(gate, up):
        return None
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return None  # a view built from ``gate`` alone would send up's gradient to gate
    E, i, h = gate.shape
    return gate.as_strided((E, 2 * i, h), (2 * i * h, h, 1), gate.storage_offset())


def _grouped_mm_forward(x_TH: Tensor, w_TK: Tensor, plan, weights, act, stats=None) -> Tensor:
    """Same maths through ``F.grouped_mm`` (autograd by torch); float32/bf16, aligned shapes only."""
    if not hasattr(F, "grouped_mm"):
        raise RoutingError(
            "ExpertsConfig.impl='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.10)"
        )
    gate, up, down, bg, bu, bd = weights
    if any(b is not None for b in (bg, bu, bd)):
        raise RoutingError(
            "ExpertsConfig.impl='grouped_mm' does not support biases; use impl='loop'"
        )
    xs_RH = x_TH.index_select(0, plan.tok_R)
    offs = None if plan.rows is not None else (
        torch.tensor(plan.counts, device=x_TH.device).cumsum(0).to(torch.int32))
    fused = _fused_gate_up(gate, up)
    if fused is not None:  # one call on the dense [E, 2I, H] storage beats two on its strided halves
        i = up.shape[1]
        h_gu = _gmm(xs_RH, fused, plan, offs)
        a = act(h_gu[:, :i], h_gu[:, i:])
    elif gate is None:
        a = act(_gmm(xs_RH, up, plan, offs))
    else:
        h_up = _gmm(xs_RH, up, plan, offs)
        a = act(_gmm(xs_RH, gate, plan, offs), h_up)
    o_RH = _gmm(a, down, plan, offs)
    if stats is not None:
        stats.act_max_R.copy_(a.detach().abs().amax(dim=1))
        stats.out_norm_R.copy_(torch.linalg.vector_norm(o_RH.detach(), dim=1))
        stats.out_max_R.copy_(o_RH.detach().abs().amax(dim=1))
    w_R = _dispatch.slot_weights(w_TK, plan, x_TH.dtype)
    return _dispatch.scatter_tokens(o_RH * w_R[:, None], plan)


def _gmm(x_RI: Tensor, w_GOI: Tensor, plan, offs: Tensor | None) -> Tensor:
    """``x_r w_g^T`` for each slot row r of group g: one ``grouped_mm`` over the plan's groups, or,
    with ``plan.rows`` (a slot buffer of many rows, most unused: ``grouped_mm``'s cost grows with
    the groups, empty ones included), one ``mm`` per group on its weight row. ``grouped_mm`` on the
    CPU computes each group as that ``mm`` does, so the two give the same bits (tested)."""
    if offs is not None:
        return F.grouped_mm(x_RI, w_GOI.transpose(1, 2), offs=offs)
    return torch.cat([torch.mm(x_RI[s:s + n], w_GOI[r].t()) for r, s, n in _dispatch._rows(plan)])


def split_experts(experts: Experts, m: int) -> Experts:
    """Fine-grained copy: expert e becomes experts e*m .. e*m+m-1, each with I/m inner rows.

    Routing token t to all m pieces of e with e's weight reproduces the original output exactly,
    because the down projection is a sum over inner rows.
    """
    cfg = experts.config.fine_grained(m)
    if cfg.bias:
        raise RoutingError(
            "split_experts: experts with biases cannot be split exactly (down bias would count m times)"
        )
    out = Experts(cfg, device=experts.up.device, dtype=experts.up.dtype)
    E, I, H = experts.up.shape
    with torch.no_grad():
        if experts.gate is not None:
            out.gate.copy_(experts.gate.reshape(E * m, I // m, H))
        out.up.copy_(experts.up.reshape(E * m, I // m, H))
        out.down.copy_(
            experts.down.reshape(E, H, m, I // m).permute(0, 2, 1, 3).reshape(E * m, H, I // m)
        )
    return out
