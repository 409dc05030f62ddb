"""`MultiGateMoE` (MMoE / PLE / one HoME level) and `HoME` (two levels) for multi-task learning.

MMoE (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD): every expert sees every sample; task t has its own softmax gate,

    y_t(x) = sum_e g_{t,e}(x) o_e(x),   g_t(x) = softmax(W_t x + b_t).

HoME (Wang et al. 2024, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
Kuaishou", arXiv:2408.05430) fixes MMoE's expert collapse, degradation and underfitting with:
- expert normalisation + Swish: each expert layer is ``o = swish(norm(W v + b))`` with batch or
  layer norm, so expert outputs share one scale and few activations are exactly zero;
- a hierarchy mask: global shared experts, category experts (shared by the tasks of one category)
  and task-specific experts; task t's gate only sees shared + category(t) + own(t) experts
  (gates over the rest are masked to 0 before the softmax);
- feature gates: each expert e gets a private view of its input, a LoRA-shaped gate
  ``v_e = v * 2 sigmoid(v A_e B_e)`` (A_e [D,l], B_e [l,D]), 1 on average at initialisation;
- self-gates: a residual over the task's own experts,
  ``y_t += sum_{e in own(t)} s_{t,e} o_e`` with ``s_t = sigmoid(U_t v)`` for one own expert and
  ``softmax(U_t v)`` for several, so sparse tasks keep a direct path to their own experts.
`HoME` stacks two levels: a meta level whose "tasks" are the categories (with a global gate over
all its experts giving the shared representation), then a task level whose shared experts read the
shared representation and whose category/task experts read their category's representation.
The exact wiring of HoME's gates is described in words and figures in the paper; the formulas above
are moelab's reading of it.

Every forward returns a `MultiGateOutput` with what ``moelab.analysis.multitask`` needs
(gates per task over all experts, expert hidden activations and outputs, expert ownership).

Shape legend: N samples, D input size, F expert hidden units, H expert output size, E experts
(global order: shared, then category experts by category, then task experts by task),
T tasks (gates), C categories, L feature-gate rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.routing import RoutingError

NORMS = ("none", "batch", "layer")
ACTS = {"relu": F.relu, "swish": F.silu}


def _f32(t: Tensor) -> Tensor:
    """At least float32 for gate softmaxes (float64 stays float64 for the reference tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _positive(name: str, v, zero_ok: bool = False) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero_ok else 1):
        what = "a non-negative int" if zero_ok else "a positive int"
        raise RoutingError(f"MultiGateConfig.{name} must be {what}, got {v!r}")


@dataclass(kw_only=True)
class MultiGateConfig:
    """One multi-gate level. Defaults give MMoE (shared ReLU experts, one softmax gate per task)."""

    input_size: int
    hidden_size: int
    output_size: int
    num_tasks: int
    num_shared: int = 4
    task_category: tuple[int, ...] | None = None  # category of each task; None: no categories
    num_category_experts: int = 0  # per category
    num_task_experts: int = 0  # per task
    norm: str = "none"  # HoME: "batch" (or "layer")
    activation: str = "relu"  # HoME: "swish"
    feature_gate_rank: int = 0  # 0: off
    self_gate: bool = False
    global_gate: bool = False  # an extra gate over every expert (HoME's meta level)

    def __post_init__(self) -> None:
        for name in ("input_size", "hidden_size", "output_size", "num_tasks"):
            _positive(name, getattr(self, name))
        for name in ("num_shared", "num_category_experts", "num_task_experts", "feature_gate_rank"):
            _positive(name, getattr(self, name), zero_ok=True)
        if self.norm not in NORMS:
            raise RoutingError(f"MultiGateConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTS:
            raise RoutingError(
                f"MultiGateConfig.activation must be one of {sorted(ACTS)}, got {self.activation!r}"
            )
        if self.task_category is not None:
            cats = tuple(self.task_category)
            if len(cats) != self.num_tasks or any(not isinstance(c, int) or c < 0 for c in cats):
                raise RoutingError(
                    f"MultiGateConfig.task_category must give a category id >= 0 for each of the "
                    f"{self.num_tasks} tasks, got {self.task_category!r}"
                )
            if sorted(set(cats)) != list(range(max(cats) + 1)):
                raise RoutingError(
                    f"MultiGateConfig.task_category must use categories 0..C-1 without gaps, got {cats}"
                )
            self.task_category = cats
        elif self.num_category_experts:
            raise RoutingError("MultiGateConfig.num_category_experts > 0 needs task_category")
        if self.num_shared + self.num_category_experts + self.num_task_experts == 0:
            raise RoutingError("MultiGateConfig: every task's gate must see at least one expert")
        if self.self_gate and not self.num_task_experts:
            raise RoutingError("MultiGateConfig.self_gate needs num_task_experts >= 1")

    @property
    def num_categories(self) -> int:
        return 0 if self.task_category is None else max(self.task_category) + 1

    @property
    def num_experts(self) -> int:
        c = self.num_categories * self.num_category_experts
        return self.num_shared + c + self.num_tasks * self.num_task_experts

    def layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``owner_E`` (-1 shared or category, else the task), ``category_E`` (-1 unless a category
        expert) and ``input_E`` (0: the shared input, 1+c: category c's, 1+C+t: task t's)."""
        C, T = self.num_categories, self.num_tasks
        kc, kt = self.num_category_experts, self.num_task_experts
        owner = [-1] * (self.num_shared + C * kc) + [t for t in range(T) for _ in range(kt)]
        cat = [-1] * self.num_shared + [c for c in range(C) for _ in range(kc)] + [-1] * (T * kt)
        inp = [0] * self.num_shared + [1 + c for c in range(C) for _ in range(kc)]
        inp += [1 + C + t for t in range(T) for _ in range(kt)]
        return np.array(owner), np.array(cat), np.array(inp)

    def visible(self) -> np.ndarray:
        """[T, E] bool: the hierarchy mask (shared + own category + own task experts)."""
        owner, cat, _ = self.layout()
        t_ = np.arange(self.num_tasks)[:, None]
        tc = np.array(self.task_category or [-2] * self.num_tasks)[:, None]
        return (owner[None] == -1) & (cat[None] == -1) | (cat[None] == tc) | (owner[None] == t_)


@dataclass
class MultiGateOutput:
    """What one level computed. ``gates_TNE`` is 0 where the hierarchy mask hides an expert."""

    y_TNH: Tensor
    gates_TNE: Tensor
    hidden_NEF: Tensor  # expert hidden activations (after norm + activation)
    outputs_NEH: Tensor  # expert outputs
    owner_E: np.ndarray
    category_E: np.ndarray
    self_gates_TNE: Tensor | None = None
    y_global_NH: Tensor | None = None
    global_gates_NE: Tensor | None = None

    def analysis_inputs(self) -> dict[str, np.ndarray]:
        """float64 numpy arrays for ``moelab.analysis.multitask`` (``gates_TNE``, ``owner_E``,
        ``shared_E``, ``hidden_NEF``, ``outputs_NEH``); category experts count as shared."""
        def np64(t: Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy()

        return {"gates_TNE": np64(self.gates_TNE), "owner_E": self.owner_E,
                "shared_E": self.owner_E == -1, "hidden_NEF": np64(self.hidden_NEF),
                "outputs_NEH": np64(self.outputs_NEH)}


class MultiGateMoE(nn.Module):
    """``forward(x_ND, x_category_CND=None, x_task_TND=None) -> MultiGateOutput``.

    Shared experts and the global gate read ``x``; category c's experts read ``x_category[c]``
    (default ``x``); task t's experts, gate and self-gate read ``x_task[t]`` (default its category's
    input, else ``x``).
    """

    def __init__(self, config: MultiGateConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = c = config
        kw = {"device": device, "dtype": dtype}
        E, D, Fh, H, T = c.num_experts, c.input_size, c.hidden_size, c.output_size, c.num_tasks
        owner, cat, inp = c.layout()
        self.owner_E, self.category_E = owner, cat
        self.register_buffer("input_E", torch.as_tensor(inp, device=device), persistent=False)
        self.register_buffer("visible_TE", torch.as_tensor(c.visible(), device=device), persistent=False)
        self.w1 = nn.Parameter(torch.empty(E, Fh, D, **kw))
        self.b1 = nn.Parameter(torch.zeros(E, Fh, **kw))
        self.w2 = nn.Parameter(torch.empty(E, H, Fh, **kw))
        self.b2 = nn.Parameter(torch.zeros(E, H, **kw))
        self.norms = nn.ModuleList(
            [_ExpertNorm(c.norm, E, n, **kw) for n in (Fh, H)] if c.norm != "none" else []
        )
        self.gate_w = nn.Parameter(torch.zeros(T, E, D, **kw))
        self.gate_b = nn.Parameter(torch.zeros(T, E, **kw))
        L = c.feature_gate_rank
        self.fg_a = nn.Parameter(torch.empty(E, D, L, **kw)) if L else None
        self.fg_b = nn.Parameter(torch.zeros(E, L, D, **kw)) if L else None
        self.self_w = nn.Parameter(torch.zeros(T, c.num_task_experts, D, **kw)) if c.self_gate else None
        self.global_w = nn.Parameter(torch.zeros(E, D, **kw)) if c.global_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts like nn.Linear; gates start uniform (zero logits); feature gates start at 1."""
        for w in (self.w1, self.w2, self.fg_a):
            if w is not None:
                bound = 1.0 / w.shape[-1] ** 0.5 if w is not self.fg_a else 1.0 / w.shape[1] ** 0.5
                nn.init.uniform_(w, -bound, bound)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def _inputs(self, x_ND: Tensor, x_cat: Tensor | None, x_task: Tensor | None) -> Tensor:
        """[G, N, D] stacked inputs: x, then one per category, then one per task."""
        c = self.config
        if x_ND.dim() != 2 or x_ND.shape[1] != c.input_size:
            raise RoutingError(f"MultiGateMoE: x must be [N, D={c.input_size}], got {tuple(x_ND.shape)}")
        C, T = c.num_categories, c.num_tasks
        for name, t, n in (("x_category", x_cat, C), ("x_task", x_task, T)):
            if t is not None and tuple(t.shape) != (n, *x_ND.shape):
                raise RoutingError(
                    f"MultiGateMoE: {name} must be [{n}, N={x_ND.shape[0]}, D={c.input_size}], "
                    f"got {tuple(t.shape)}"
                )
        if x_cat is None:
            x_cat = x_ND.expand(C, *x_ND.shape)
        if x_task is None:
            idx = torch.as_tensor(c.task_category or [0] * T, device=x_ND.device)
            x_task = x_cat[idx] if C else x_ND.expand(T, *x_ND.shape)
        return torch.cat([x_ND.unsqueeze(0), x_cat, x_task])

    def forward(
        self, x_ND: Tensor, x_category_CND: Tensor | None = None, x_task_TND: Tensor | None = None
    ) -> MultiGateOutput:
        c = self.config
        x_GND = self._inputs(x_ND, x_category_CND, x_task_TND)
        v_END = x_GND[self.input_E]
        if self.fg_a is not None:
            v_END = v_END * 2 * torch.sigmoid(torch.bmm(torch.bmm(v_END, self.fg_a), self.fg_b))
        act = ACTS[c.activation]
        h_ENF = torch.baddbmm(self.b1.unsqueeze(1), v_END, self.w1.transpose(1, 2))
        h_ENF = act(self.norms[0](h_ENF) if self.norms else h_ENF)
        o_ENH = torch.baddbmm(self.b2.unsqueeze(1), h_ENF, self.w2.transpose(1, 2))
        o_ENH = act(self.norms[1](o_ENH) if self.norms else o_ENH)
        # task gates: logits from each task's own input, float32 softmax over the visible experts
        x_TND = x_GND[1 + c.num_categories :]
        logits_TNE = torch.baddbmm(self.gate_b.unsqueeze(1), x_TND, self.gate_w.transpose(1, 2))
        logits_TNE = _f32(logits_TNE).masked_fill(~self.visible_TE.unsqueeze(1), -torch.inf)
        gates_TNE = torch.softmax(logits_TNE, -1).to(x_ND.dtype)
        y_TNH = torch.einsum("tne,enh->tnh", gates_TNE, o_ENH)
        out = MultiGateOutput(y_TNH, gates_TNE, h_ENF.transpose(0, 1), o_ENH.transpose(0, 1),
                              self.owner_E, self.category_E)
        if self.self_w is not None:
            out.self_gates_TNE, y_self = self._self_gate(x_TND, o_ENH)
            out.y_TNH = y_TNH + y_self
        if self.global_w is not None:
            g_NE = torch.softmax(_f32(F.linear(x_ND, self.global_w)), -1).to(x_ND.dtype)
            out.global_gates_NE = g_NE
            out.y_global_NH = torch.einsum("ne,enh->nh", g_NE, o_ENH)
        return out

    def _self_gate(self, x_TND: Tensor, o_ENH: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        T, kt = c.num_tasks, c.num_task_experts
        s_logits = _f32(torch.einsum("tnd,tkd->tnk", x_TND, self.self_w))
        s_TNK = (torch.sigmoid(s_logits) if kt == 1 else torch.softmax(s_logits, -1)).to(x_TND.dtype)
        first = c.num_experts - T * kt  # task experts are last, task by task
        own_TKNH = o_ENH[first:].view(T, kt, *o_ENH.shape[1:])
        y_TNH = torch.einsum("tnk,tknh->tnh", s_TNK, own_TKNH)
        full = s_TNK.new_zeros(T, x_TND.shape[1], c.num_experts)
        for t in range(T):
            full[t, :, first + t * kt : first + (t + 1) * kt] = s_TNK[t]
        return full, y_TNH


class _ExpertNorm(nn.Module):
    """Per-expert batch norm (statistics over N per (e, unit)) or layer norm (over units)."""

    def __init__(self, kind: str, E: int, n: int, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.kind, self.eps, self.momentum = kind, 1e-5, 0.1
        self.weight = nn.Parameter(torch.ones(E, n, **kw))
        self.bias = nn.Parameter(torch.zeros(E, n, **kw))
        if kind == "batch":
            self.register_buffer("running_mean", torch.zeros(E * n, **kw))
            self.register_buffer("running_var", torch.ones(E * n, **kw))

    def forward(self, h_ENX: Tensor) -> Tensor:
        E, N, X = h_ENX.shape
        if self.kind == "layer":
            z = F.layer_norm(h_ENX, (X,), eps=self.eps)
            return z * self.weight.unsqueeze(1) + self.bias.unsqueeze(1)
        if self.training and N < 2:
            raise RoutingError("MultiGateMoE: batch norm in training needs at least 2 samples")
        z = F.batch_norm(h_ENX.transpose(0, 1).reshape(N, E * X), self.running_mean, self.running_var,
                         self.weight.reshape(-1), self.bias.reshape(-1), self.training,
                         self.momentum, self.eps)
        return z.view(N, E, X).transpose(0, 1)


def _reference_norm(norm: _ExpertNorm | None, rows: list[Tensor], e: int) -> list[Tensor]:
    """Per-sample loop version of `_ExpertNorm` for expert e (rows: one [X] vector per sample)."""
    if norm is None:
        return rows
    w, b = norm.weight[e], norm.bias[e]
    out = []
    for r in rows:
        if norm.kind == "layer":
            mean, var = sum(r) / len(r), sum((v - sum(r) / len(r)) ** 2 for v in r) / len(r)
        elif norm.training:
            mean = sum(rows) / len(rows)
            var = sum((q - mean) ** 2 for q in rows) / len(rows)  # biased, as batch norm
        else:
            X = r.shape[0]
            mean, var = norm.running_mean[e * X : (e + 1) * X], norm.running_var[e * X : (e + 1) * X]
        out.append((r - mean) / torch.sqrt(var + norm.eps) * w + b)
    return out


def multigate_reference(
    moe: MultiGateMoE, x_ND: Tensor, x_category_CND: Tensor | None = None,
    x_task_TND: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Slow, obvious per-sample/per-expert/per-task loops: ``(y_TNH, gates_TNE)``."""
    c = moe.config
    x_GND = moe._inputs(x_ND, x_category_CND, x_task_TND)
    act = ACTS[c.activation]
    N, E, T = x_ND.shape[0], c.num_experts, c.num_tasks
    n1, n2 = (moe.norms[0], moe.norms[1]) if moe.norms else (None, None)
    outs = []  # outs[e][n]
    for e in range(E):
        vs = []
        for n in range(N):
            v = x_GND[int(moe.input_E[e]), n]
            if moe.fg_a is not None:
                v = v * 2 * torch.sigmoid((v @ moe.fg_a[e]) @ moe.fg_b[e])
            vs.append(v)
        h = [act(q) for q in _reference_norm(n1, [moe.w1[e] @ v + moe.b1[e] for v in vs], e)]
        outs.append([act(q) for q in _reference_norm(n2, [moe.w2[e] @ q + moe.b2[e] for q in h], e)])
    vis = c.visible()
    first = E - T * c.num_task_experts
    ys, gates = [], torch.zeros(T, N, E, dtype=x_ND.dtype)
    for t in range(T):
        rows = []
        for n in range(N):
            xt = x_GND[1 + c.num_categories + t, n]
            seen = [e for e in range(E) if vis[t, e]]
            z = torch.stack([moe.gate_w[t, e] @ xt + moe.gate_b[t, e] for e in seen])
            g = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
            y = sum(g[i] * outs[e][n] for i, e in enumerate(seen))
            gates[t, n, seen] = g.detach()
            if moe.self_w is not None:
                own = list(range(first + t * c.num_task_experts, first + (t + 1) * c.num_task_experts))
                s = torch.stack([moe.self_w[t, k] @ xt for k in range(len(own))])
                s = torch.sigmoid(s) if len(own) == 1 else torch.exp(s) / torch.exp(s).sum()
                y = y + sum(s[i] * outs[e][n] for i, e in enumerate(own))
            rows.append(y)
        ys.append(torch.stack(rows))
    return torch.stack(ys), gates


@dataclass(kw_only=True)
class HoMEConfig:
    """HoME's two levels. Meta level: ``num_shared`` global experts and ``num_category_experts``
    per category, one gate per category plus a global gate. Task level: ``num_task_shared`` experts
    on the global representation, ``num_task_category_experts`` per category and
    ``num_task_experts`` per task on the category's representation."""

    input_size: int
    hidden_size: int
    output_size: int
    task_category: tuple[int, ...]
    num_shared: int = 2
    num_category_experts: int = 2
    num_task_shared: int = 1
    num_task_category_experts: int = 1
    num_task_experts: int = 1
    norm: str = "batch"
    activation: str = "swish"
    feature_gate_rank: int = 8
    self_gate: bool = True

    def __post_init__(self) -> None:
        self.levels()  # validates every field through MultiGateConfig

    def levels(self) -> tuple[MultiGateConfig, MultiGateConfig]:
        common = {"hidden_size": self.hidden_size, "output_size": self.output_size,
                  "norm": self.norm, "activation": self.activation,
                  "feature_gate_rank": self.feature_gate_rank, "self_gate": self.self_gate}
        cats = tuple(self.task_category)
        num_cats = max(cats) + 1 if cats and all(isinstance(c, int) for c in cats) else 1
        meta = MultiGateConfig(input_size=self.input_size, num_tasks=num_cats,
                               num_shared=self.num_shared, num_task_experts=self.num_category_experts,
                               global_gate=True, **common)
        task = MultiGateConfig(input_size=self.output_size, num_tasks=len(cats), task_category=cats,
                               num_shared=self.num_task_shared,
                               num_category_experts=self.num_task_category_experts,
                               num_task_experts=self.num_task_experts, **common)
        return meta, task


@dataclass
class HoMEOutput:
    y_TNH: Tensor
    meta: MultiGateOutput  # "tasks" of the meta level are the categories
    task: MultiGateOutput


class HoME(nn.Module):
    """``forward(x_ND) -> HoMEOutput``: meta level over x, task level over its representations."""

    def __init__(self, config: HoMEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        meta, task = config.levels()
        self.meta = MultiGateMoE(meta, device=device, dtype=dtype)
        self.task = MultiGateMoE(task, device=device, dtype=dtype)

    def forward(self, x_ND: Tensor) -> HoMEOutput:
        m = self.meta(x_ND)
        t = self.task(m.y_global_NH, x_category_CND=m.y_TNH)
        return HoMEOutput(t.y_TNH, m, t)
