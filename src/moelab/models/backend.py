"""moelab's experts backend on transformers models: the "experts execution seam".

Shape legend: T tokens, H hidden, E experts, K top-k, I expert width, n experts needed this call,
R real (routed) slots.

``open_model(model, experts_implementation="moelab")`` (or :func:`enable_experts_backend` on a view)
runs every MoE block's routed experts through ``moelab.nn``'s dropless dispatch
(``moelab.nn.dispatcher`` then :func:`moelab.nn.experts.run_experts`: sorted slots, one GEMM
chain per expert, hand-written backward) instead of transformers' eager loop or ``grouped_mm``:

* families whose experts class is decorated with transformers' ``@use_experts_implementation``
  get "moelab" registered in ``ExpertsInterface`` (:func:`register`) and selected with
  ``model.set_experts_implementation("moelab")``;
* the others (Llama4, DBRX, JetMoE) get the equivalent swap of one module's ``forward`` on the
  instance (the block for Llama4 and JetMoE, the experts for DBRX), described by their adapter;
  the module, its parameters and state_dict keys stay as they are, and the router is still
  called, so routing hooks and edits on it keep working. Their config keeps the experts
  implementation it had (transformers refuses to set one on these classes); use
  :func:`experts_backend` to ask whether a block runs moelab's. :func:`disable_experts_backend`
  undoes both kinds.

Per block, an :class:`ExpertsBackend` takes its expert weights from a **weights provider**
(:class:`WeightsProvider`): ``provider(block, expert_ids_n) -> ExpertWeights``, called once per
forward with the sorted ids of the experts that received at least one real slot. The default,
:func:`own_parameters`, returns differentiable views of the model's own parameters (gradients
reach them); an offloading provider pages the needed experts in and may return only those
(``[n, ...]`` in the order of ``expert_ids_n``).

**Observers** (:meth:`ExpertsBackend.add_observer`) receive an :class:`ExpertStats` per forward:
each slot's unweighted expert output norm and the maximum of the down projection's input
(|act(gate x) * up x|), computed inside the dispatch loop.

An **inputs transform** (``inputs(rows, where) -> rows``, :data:`InputsTransform`) changes what the
expert linears read: ``where`` is ``"gate_up"`` for the rows the gate/up projections receive and
``"down"`` for the down projection's input ``act(gate x) * up x``. It simulates low-precision
activations (``moelab.compress.quant.act``: per-token fake quantisation, W4A4); None (the default)
leaves the computation as it is.

**Masked slots**: a slot is skipped when ``mask_TK`` is False (an explicit keyword of the experts
call, e.g. added by a pre-hook) or when its id lies outside ``[0, E)`` (the sentinel transformers'
expert parallelism uses). A slot with weight 0 is *not* skipped: it still runs (and observers see
it), as in transformers.

Family knowledge (where the weights live, the layout, the swap) comes from the family's
:class:`ExpertsSpec` (``FamilyAdapter.experts_backend``) in ``moelab.models.families``.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from moelab.errors import MoelabError, UnsupportedModelError
from moelab.models.view import ModelView, MoEBlockView
from moelab.nn import _dispatch
from moelab.nn.dispatcher import Dispatcher, LocalDispatcher
from moelab.nn.experts import make_activation, run_experts

IMPLEMENTATION = "moelab"
_ATTR = "_moelab_experts_backend"  # attribute of a block's experts module holding its backend


@dataclass(eq=False)
class ExpertWeights:
    """Expert tensors in the view's convention: ``gate``/``up`` ``[E|n, I, H]``, ``down``
    ``[E|n, H, I]``, biases ``[E|n, I]`` / ``[E|n, H]`` or None. With a leading dim of E, row e is
    expert e; with n (< E) rows, row j is the j-th of the expert ids the provider was asked for."""

    gate: Tensor
    up: Tensor
    down: Tensor
    gate_bias: Tensor | None = None
    up_bias: Tensor | None = None
    down_bias: Tensor | None = None

    def as_tuple(self) -> tuple[Tensor | None, ...]:
        return (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)


@dataclass(eq=False)
class PlacedWeights:
    """Expert weights that live on different devices (Fiddler: some experts run where their copy
    is, e.g. the CPU). ``parts``: ``(weights, positions)``, the :class:`ExpertWeights` of the experts
    at ``positions`` of the provider's ``expert_ids_n`` (row j of ``weights`` is the j-th of them),
    each part on one device; every position in exactly one part. Each expert runs on its part's
    device (its rows moved there and back) with the per-expert loop's maths, and the outputs are
    summed per token in expert order, as the resident loop does."""

    parts: list[tuple[ExpertWeights, list[int]]]


@dataclass(eq=False)
class SlotWeights:
    """Expert weights held in a buffer of S slots (an offloading cache's fast tier): ``weights``
    has S rows, expert ``expert_ids_n[j]`` is row ``rows_n[j]``. The experts run on the buffer
    itself (no copy of the needed rows); each token's outputs are summed in expert order, so the
    result equals that of the same weights in expert order bit for bit."""

    weights: ExpertWeights
    rows_n: list[int]


class WeightsProvider(Protocol):
    """``provider(block, expert_ids_n) -> ExpertWeights | SlotWeights | PlacedWeights``;
    ``expert_ids_n``: sorted int64 ids of the experts with at least one real slot in this call."""

    def __call__(self, block: MoEBlockView, expert_ids_n: Tensor
                 ) -> ExpertWeights | SlotWeights | PlacedWeights: ...


@dataclass(frozen=True)
class ExpertsSpec:
    """How moelab's backend attaches to one family (``FamilyAdapter.experts_backend``).

    weights: the block's expert tensors as differentiable views of its parameters, all E experts.
    swap: None where the experts class is decorated with ``@use_experts_implementation`` (the
        backend then goes through ``ExpertsInterface``); otherwise which module's ``forward`` is
        replaced on the instance: 'block' (``block.module``) or 'experts' (``block.experts_module``).
    forward: with ``swap``, the replacement, called as ``forward(backend, *args, **kwargs)`` (bound
        to the backend, so a deep copy of the model runs its own copy); it must return what the
        original forward returns.
    params: the block's expert parameters, dotted names under ``block.module``; each holds the
        experts along dim 0, expert e in rows ``[e r, (e + 1) r)`` with ``r = rows // E`` (r = 1
        for ``[E, ...]`` stacks, I for DBRX's flat ``[E*I, H]``). Offloading pages these rows.
    from_params: ``from_params(block, tensors) -> ExpertWeights`` of the n experts whose rows
        ``tensors`` holds (``{name: param restricted to those experts' rows, in order}``);
        ``weights(block)`` is ``from_params`` of the block's own parameters (:func:`own_params`).
    """

    weights: Callable[[MoEBlockView], ExpertWeights]
    swap: str | None = None
    forward: Callable[..., Any] | None = None
    params: tuple[str, ...] = ()
    from_params: Callable[[MoEBlockView, dict[str, Tensor]], ExpertWeights] | None = None

    def __post_init__(self) -> None:
        if self.swap not in (None, "block", "experts") or (self.swap is None) != (
            self.forward is None
        ):
            raise ValueError("ExpertsSpec: swap must be None, 'block' or 'experts', with a forward")


@dataclass(eq=False)
class ExpertStats:
    """What an observer receives, per forward of one block (all ``[T, K]``, detached).

    out_norm_TK: ``||expert_e(x_t)||_2`` before the combine weight (for ``combine='input'``,
    Llama4, the expert's input is already ``w x``, so it is ``||expert_e(w x_t)||``);
    act_max_TK: ``max_i |a_i|`` of the down projection's input; out_max_TK: ``max_h |o_h|`` of the
    expert's output (before the combine weight); all 0 where ``mask_TK`` is False.
    """

    block: MoEBlockView
    ids_TK: Tensor
    mask_TK: Tensor
    out_norm_TK: Tensor
    act_max_TK: Tensor
    out_max_TK: Tensor


Observer = Callable[[ExpertStats], None]

# inputs(rows, where) -> rows of the same shape; where: "gate_up" (the experts' input rows) or
# "down" (the down projection's input, one row per routed slot)
InputsTransform = Callable[[Tensor, str], Tensor]


def own_parameters(block: MoEBlockView, expert_ids_n: Tensor) -> ExpertWeights:
    """The default provider: the model's own parameters (views, all E experts; no copy)."""
    return spec_for(block).weights(block)


def own_params(block: MoEBlockView, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The block's own expert parameters ``names`` (see ``ExpertsSpec.params``), by name."""
    return {n: block.module.get_parameter(n) for n in names}


def spec_for(block: MoEBlockView) -> ExpertsSpec:
    """The family's :class:`ExpertsSpec`; UnsupportedModelError if it has none."""
    from moelab.models.registry import _adapters

    for a in _adapters():
        if a.name == block.family:
            if a.experts_backend is None:
                break
            return a.experts_backend
    raise UnsupportedModelError(f"{block.family}: moelab's experts backend is not available")


class ExpertsBackend:
    """moelab's execution of one block's routed experts (no shared experts, no output bias).

    ``backend(x_TH, ids_TK, weights_TK, mask_TK=None) -> y_TH`` combines as the block does
    (``block.combine``); weights come from ``provider`` (default :func:`own_parameters`), routed
    rows travel through ``dispatcher`` (default ``LocalDispatcher``; see ``moelab.nn.dispatcher``);
    ``inputs`` (optional) transforms what the expert linears read (see the module docstring).
    """

    def __init__(
        self,
        block: MoEBlockView,
        provider: WeightsProvider | None = None,
        dispatcher: Dispatcher | None = None,
        inputs: InputsTransform | None = None,
    ) -> None:
        from moelab.nn.hf import _ACT  # view activation name -> moelab.nn activation

        if block.act not in _ACT or block.combine not in ("output", "input"):
            raise UnsupportedModelError(
                f"{block.path} ({block.family}): activation {block.act!r} / combine "
                f"{block.combine!r} is not supported by moelab's experts backend"
            )
        self.block = block
        self.spec = spec_for(block)
        self.provider: WeightsProvider = provider if provider is not None else own_parameters
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.act = make_activation(_ACT[block.act], dict(block.act_params) or None)
        self.inputs = inputs
        self._observers: OrderedDict[int, Observer] = OrderedDict()  # RemovableHandle needs it
        self._swapped: nn.Module | None = None  # set by enable_experts_backend
        self._previous = "eager"

    def add_observer(self, fn: Observer) -> RemovableHandle:
        """Call ``fn(stats)`` on every forward (:class:`ExpertStats`); ``handle.remove()`` stops it."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    def __call__(
        self, x_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor, mask_TK: Tensor | None = None
    ) -> Tensor:
        E = self.block.num_experts
        # NOTE: reshape and cast only where needed: at decode each torch op costs ~10 us cold
        # (bench/moe_layer.py's flushed one-token runs)
        if ids_TK.dim() != 2 or ids_TK.shape[0] != x_TH.shape[0] or ids_TK.dtype != torch.int64:
            ids_TK = ids_TK.reshape(x_TH.shape[0], -1).to(torch.int64)
        if weights_TK.shape != ids_TK.shape or weights_TK.dtype != x_TH.dtype:
            weights_TK = weights_TK.reshape(ids_TK.shape).to(x_TH.dtype)
        mask_TK = _slot_mask(ids_TK, mask_TK, E)
        if self.block.combine == "output":
            y_TH, stats = self._run(x_TH, ids_TK, weights_TK, mask_TK)
        else:  # Llama4: sum_k expert(w_tk x_t), one slot per row of a [T*K, H] input, weight 1
            T, K = ids_TK.shape
            xs_NH = (x_TH.unsqueeze(1) * weights_TK.unsqueeze(-1)).reshape(T * K, -1)
            flat = None if mask_TK is None else mask_TK.reshape(T * K, 1)
            y_NH, stats = self._run(
                xs_NH, ids_TK.reshape(T * K, 1), torch.ones_like(weights_TK).reshape(T * K, 1), flat
            )
            y_TH = y_NH.view(T, K, -1).sum(1)
        if stats is not None:
            self._notify(ids_TK, mask_TK, *stats)
        return y_TH

    def _run(self, x_TH, ids_TK, w_TK, mask_TK):
        """dispatch -> weights from the provider -> grouped experts -> combine."""
        d = self.dispatcher.dispatch(x_TH, ids_TK, w_TK, mask_TK, self.block.num_experts)
        plan = d.plan
        stats = None
        if self._observers:
            if plan.T * plan.K != ids_TK.numel():
                raise MoelabError(
                    f"{self.block.path}: observers need a dispatcher whose plan lists the tokens' "
                    f"own slots (LocalDispatcher); {type(self.dispatcher).__name__} does not"
                )
            stats = _dispatch.SlotStats.empty(plan, x_TH)
        if plan.num_real == 0:
            y_TH = self.dispatcher.combine(d.x_MH.new_zeros(d.x_MH.shape[0], x_TH.shape[1]), d)
            return y_TH, _flat_stats(stats, plan)
        if self.provider is own_parameters:  # the same, without looking the spec up again
            w = self.spec.weights(self.block)
            if w.up.shape[0] != self.block.num_experts:
                raise MoelabError(f"{self.block.path}: the experts spec gave {w.up.shape[0]} experts")
        else:
            needed = [e for e, n in enumerate(plan.counts) if n]
            ids_n = torch.tensor(needed, dtype=torch.int64, device=x_TH.device)
            w = self.provider(self.block, ids_n)
            if isinstance(w, PlacedWeights):
                if stats is not None:
                    raise MoelabError(f"{self.block.path}: observers are not supported with weights "
                                      f"placed on several devices (PlacedWeights)")
                y_TH = _placed_forward(d.x_MH, d.weights_MK, plan, needed, w, self.act)
                return self.dispatcher.combine(y_TH, d), None
            if isinstance(w, SlotWeights):
                w, plan = w.weights, self._plan_for(w.weights, plan, needed, w.rows_n)
            else:
                plan = self._plan_for(w, plan, needed)
        x_MH, act = d.x_MH, self.act
        if self.inputs is not None:
            inputs = self.inputs
            x_MH = inputs(x_MH, "gate_up")
            act = lambda *h: inputs(self.act(*h), "down")  # noqa: E731
        y_MH = run_experts(x_MH, d.weights_MK, plan, w.as_tuple(), act, stats=stats)
        return self.dispatcher.combine(y_MH, d), _flat_stats(stats, plan)

    def _plan_for(self, w: ExpertWeights, plan: _dispatch.Plan, needed: list[int],
                  rows_n: list[int] | None = None):
        """The plan over the provider's rows: all E experts, only the n needed ones in order, or
        (``rows_n``, :class:`SlotWeights`) the needed ones at those rows of a slot buffer."""
        E, n = self.block.num_experts, len(needed)
        rows = w.up.shape[0]
        want_i, H = self.block.intermediate_size, self.block.hidden_size
        slots_ok = rows_n is None or (len(rows_n) == n and all(0 <= r < rows for r in rows_n)
                                      and len(set(rows_n)) == n)
        if (rows_n is None and rows not in (E, n)) or not slots_ok or (
                w.up.shape[1:] != (want_i, H) or w.down.shape[1:] != (H, want_i)):
            raise MoelabError(
                f"{self.block.path}: the weights provider returned up {tuple(w.up.shape)}, down "
                f"{tuple(w.down.shape)}, slot rows {rows_n}; expected [{E} or {n}, {want_i}, {H}] "
                f"and [.., {H}, {want_i}] (all experts, or the {n} asked for, in order), or "
                f"SlotWeights with {n} distinct rows of its buffer"
            )
        if rows == E and rows_n is None:
            return plan
        counts = [plan.counts[e] for e in needed]
        return _dispatch.Plan(plan.slot_R, plan.tok_R, counts, plan.num_real, plan.T, plan.K,
                              rows=rows_n)

    def _notify(self, ids_TK, mask_TK, norm_N, amax_N, omax_N) -> None:
        shape = ids_TK.shape
        real = (
            mask_TK
            if mask_TK is not None
            else torch.ones(shape, dtype=torch.bool, device=ids_TK.device)
        )
        stats = ExpertStats(
            self.block, ids_TK.detach(), real, norm_N.view(shape), amax_N.view(shape),
            omax_N.view(shape),
        )
        for fn in list(self._observers.values()):
            fn(stats)


def _placed_forward(x_TH: Tensor, w_TK: Tensor, plan: _dispatch.Plan, needed: list[int],
                    placed: PlacedWeights, act) -> Tensor:
    """``y_TH`` of :class:`PlacedWeights`: ``moelab.nn._dispatch.ffn_forward``'s per-expert loop,
    each expert on its part's device, its output added back in expert order."""
    where = {needed[p]: (w, j) for w, positions in placed.parts for j, p in enumerate(positions)}
    if sorted(where) != needed:
        raise MoelabError(f"PlacedWeights: the parts cover experts {sorted(where)}, expected {needed}")
    w_R = _dispatch.slot_weights(w_TK, plan, x_TH.dtype)
    y_TH = x_TH.new_zeros(plan.T, x_TH.shape[1])
    for e, s, n in _dispatch._rows(plan):
        w, j = where[e]
        dev = w.up.device
        tok_e = plan.tok_R[s:s + n]
        x_e = x_TH.index_select(0, tok_e).to(dev)
        h_gate, h_up = _dispatch.project_in(x_e, j, w.gate, w.up, w.gate_bias, w.up_bias)
        w_e = w_R[s:s + n, None].to(dev)
        o_e = _dispatch.weighted_out(act, h_gate, h_up, w_e, w.down[j], None if w.down_bias is None else w.down_bias[j])
        y_TH.index_add_(0, tok_e, o_e.to(y_TH.device))
    return y_TH


def _slot_mask(ids_TK: Tensor, mask_TK: Tensor | None, E: int) -> Tensor | None:
    """The explicit mask, and-ed with ids in ``[0, E)``; None when every slot is real."""
    if mask_TK is None and ids_TK.shape[0] == 1 and ids_TK.device.type == "cpu":
        # a decode step: K ids checked in Python, not by five small ops (see __call__'s note)
        if all(0 <= e < E for e in ids_TK.tolist()[0]):
            return None
    valid = (ids_TK >= 0) & (ids_TK < E)
    if mask_TK is not None:
        if mask_TK.numel() != ids_TK.numel():
            raise MoelabError(
                f"experts backend: mask_TK {tuple(mask_TK.shape)} does not match ids "
                f"{tuple(ids_TK.shape)}"
            )
        return mask_TK.reshape(ids_TK.shape).to(torch.bool) & valid
    return None if bool(valid.all()) else valid


def _flat_stats(stats: _dispatch.SlotStats | None, plan: _dispatch.Plan):
    """Per-slot statistics in slot order ``[T*K]`` (0 for masked slots), or None."""
    if stats is None:
        return None
    N = plan.T * plan.K
    norm_N = stats.out_norm_R.new_zeros(N).index_copy_(0, plan.slot_R, stats.out_norm_R)
    amax_N = stats.act_max_R.new_zeros(N).index_copy_(0, plan.slot_R, stats.act_max_R)
    omax_N = stats.out_max_R.new_zeros(N).index_copy_(0, plan.slot_R, stats.out_max_R)
    return norm_N, amax_N, omax_N


def moelab_experts_forward(
    self: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor | None = None,
    top_k_weights: Tensor | None = None,
    *,
    mask_TK: Tensor | None = None,
    router_indices: Tensor | None = None,
    routing_weights: Tensor | None = None,
) -> Tensor:
    """The "moelab" entry of transformers' ``ExpertsInterface``: ``self`` is the experts module.

    ``router_indices``/``routing_weights`` are GPT-OSS's names for ids and weights.
    """
    backend = getattr(self, _ATTR, None)
    if backend is None:
        raise MoelabError(
            f"{type(self).__name__}: experts_implementation='moelab' needs moelab's backend on "
            f"this model; open it with moelab.models.open_model(model, "
            f"experts_implementation='moelab') (or enable_experts_backend(view))"
        )
    ids = top_k_index if top_k_index is not None else router_indices
    weights = top_k_weights if top_k_weights is not None else routing_weights
    return backend(hidden_states, ids, weights, mask_TK).to(hidden_states.dtype)


def register() -> None:
    """Register "moelab" in transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    if ExpertsInterface._global_mapping.get(IMPLEMENTATION) is not moelab_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION, moelab_experts_forward)


def valid_implementations() -> list[str]:
    """Experts implementations ``open_model`` accepts (transformers' registered ones, "moelab")."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    register()
    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


def enable_experts_backend(
    view: ModelView,
    provider: WeightsProvider | None = None,
    dispatcher: Dispatcher | None = None,
    inputs: InputsTransform | None = None,
) -> list[ExpertsBackend]:
    """Run every block of ``view`` through moelab's experts backend; one backend per block.

    ``provider``: where expert weights come from (default :func:`own_parameters`);
    ``dispatcher``: how routed rows reach the experts (default ``moelab.nn.LocalDispatcher``);
    ``inputs``: what the expert linears read (default: unchanged; see the module docstring).

    Raises UnsupportedModelError (before changing anything) if a block's family has no spec.
    Calling it again replaces the backends (e.g. with another provider).
    """
    backends = [ExpertsBackend(b, provider, dispatcher, inputs) for b in view.blocks]
    specs = [b.spec for b in backends]
    previous = _previous_implementation(view)
    disable_experts_backend(view, previous)
    register()
    if any(s.swap is None for s in specs):
        view.model.set_experts_implementation(IMPLEMENTATION)
    for block, spec, backend in zip(view.blocks, specs, backends, strict=True):
        backend._previous = previous
        object.__setattr__(block.experts_module, _ATTR, backend)
        if spec.swap is not None:
            module = block.module if spec.swap == "block" else block.experts_module
            module.forward = types.MethodType(spec.forward, backend)
            backend._swapped = module
    return backends


def disable_experts_backend(view: ModelView, implementation: str | None = None) -> None:
    """Undo :func:`enable_experts_backend`: restore swapped forwards and set ``implementation``
    (default: the one the model had before moelab's)."""
    previous = _previous_implementation(view)
    for block in view.blocks:
        backend = block.experts_module.__dict__.pop(_ATTR, None)
        module = getattr(backend, "_swapped", None)
        if module is not None:
            module.__dict__.pop("forward", None)
    if getattr(view.model.config, "_experts_implementation", None) == IMPLEMENTATION:
        view.model.set_experts_implementation(implementation or previous)


def _previous_implementation(view: ModelView) -> str:
    """The experts implementation the model had before moelab's backend was enabled."""
    for block in view.blocks:
        backend = block.experts_module.__dict__.get(_ATTR)
        if backend is not None:
            return backend._previous
    current = getattr(view.model.config, "_experts_implementation", None)
    return current if current not in (None, IMPLEMENTATION) else "eager"


def experts_backend(block: MoEBlockView) -> ExpertsBackend | None:
    """The backend running this block, or None when moelab's backend is off."""
    return block.experts_module.__dict__.get(_ATTR)


__all__ = [
    "IMPLEMENTATION",
    "ExpertStats",
    "ExpertWeights",
    "ExpertsBackend",
    "ExpertsSpec",
    "InputsTransform",
    "Observer",
    "PlacedWeights",
    "SlotWeights",
    "WeightsProvider",
    "disable_experts_backend",
    "enable_experts_backend",
    "experts_backend",
    "moelab_experts_forward",
    "own_parameters",
    "own_params",
    "register",
    "valid_implementations",
]
