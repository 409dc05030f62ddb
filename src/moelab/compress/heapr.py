"""HEAPr: atomic expert pruning by a second-order criterion in output space.

Li et al. 2025, "HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space" (ICLR 2026,
arXiv 2509.22299; github.com/LLIKKE/HEAPr).

Atomic experts. An expert ``y = down @ act(gate @ x, up @ x)`` is a sum of ``I`` atoms, one per
intermediate neuron ``k``: gate row ``k``, up row ``k`` and down column ``w_k = down[:, k]``, with

    y(x) = sum_k a_k(x) * w_k (+ down_bias),    a_k(x) = act(gate[k] . x (+ gb_k), up[k] . x (+ ub_k))

so removing atom ``k`` changes the expert's output by exactly ``dy = -a_k(x) w_k``.

Criterion. A second-order (Optimal Brain Surgeon style) expansion of the calibration loss in the
expert's *output* space, at a trained model (first-order term dropped), with the output-space
Hessian replaced by the empirical Fisher ``G_e`` of the gradients w.r.t. the expert's output, and
the atom's activation decoupled from the curvature as the paper does::

    s(e, k) = 1/(2n) * sum_{t in e} a_{t,k}^2  *  w_k^T G_e w_k
    G_e     = 1/N_e  * sum_{t in e} g_{t,e} g_{t,e}^T                       [H, H]
    g_{t,e} = dLsum / dy_{t,e} = c_{t,e} * dLsum / do_t    (combine='output'; c = combine weight)
            = dLsum / do_t                                 (combine='input', Llama4: c scales x)

``Lsum`` is the summed next-token cross-entropy of a batch, ``o_t`` the MoE block's output at token
``t``, ``t in e`` the ``N_e`` calibration tokens routed to expert ``e`` and ``n`` the number of
predicted (label) tokens. ``s`` estimates the increase of the mean next-token loss (nats/token) when
the atom is removed. Writing the expectation over *all* calibration tokens (a token that does not
reach ``e`` contributes 0, hence ``sum_{t in e}`` over ``n``) keeps the load of each expert in the
score, so atoms of experts with different loads, and of different layers, compare as loss changes.
NOTE: ``G_e`` is never formed: ``w_k^T G_e w_k = 1/N_e sum_t (w_k . g_{t,e})^2``, so accumulating
``sum_t (down_e^T g_{t,e})^2`` (``[E, I]`` per layer) gives the same number at O(E*I) memory instead
of the paper's O(E*H^2) per layer.

Passes over the calibration batches (the paper's two forward passes and one backward pass):
    1. forward + backward: a routing hook (:meth:`MoEBlockView.register_routing_hook`) keeps each
       block's routing ``(ids, combine weights)``; a forward hook keeps each block's output; the
       gradient of the summed cross-entropy w.r.t. every block output is taken with
       :func:`torch.autograd.grad` (parameters' ``.grad`` untouched), and
       ``sum_t (down_e^T g_{t,e})^2`` and ``N_e`` are accumulated.
    2. forward (no grad): a routing hook on the experts' inputs computes ``a_{t,k}`` for the routed
       tokens from the view's weights and accumulates ``sum_t a_{t,k}^2``.
Statistics accumulate in float32 (float64 when the model is float64); hooks are removed and the
train/eval mode restored also on error; no ``requires_grad`` flag of the model is changed.

Budget. ``spec.ratio`` is the share of routed-expert parameters removed. Every atom holds ``3H``
parameters (``3H + 2`` with gate/up biases; the per-expert down bias stays), so removing a share
``ratio`` of the atoms removes that share of the routed experts' weights -- the same parameter
budget as removing ``ratio`` of the experts. Ranking is global across the experts of a layer and,
with ``spec.budget='global'`` (the paper's setting), across all MoE layers; with ``'layer'`` every
layer loses ``round(ratio * E * I)`` atoms. Shared experts are not atoms and are never pruned.

Checkpoint. The plan keeps every expert, each with a ``neuron_mask``. No transformers MoE family
stores experts of different widths (each holds one intermediate size per layer in its config and
stacked ``[E, ...]`` expert tensors), so for every family in :data:`moelab.models.SUPPORTED_FAMILIES`
(Mixtral, Qwen2/3-MoE, OLMoE, FlexOlmo, MiniMax, DeepSeek-V2/V3, GLM4-MoE, GraniteMoE(Shared),
PhiMoE, ERNIE-4.5-MoE, HunYuan-MoE, GPT-OSS, Llama4, DBRX, JetMoE) removed neurons are *zeroed*
(gate row, up row, down column) at fixed width: the output is exact, the stored size unchanged. An
expert left with no neuron outputs its down bias only (zero without biases).

Shape legend: B sequences per batch, S tokens per sequence, T = B*S tokens, H hidden, E experts,
K top-k, I expert width, N tokens routed to one expert, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moelab.compress.calib import Calibration
from moelab.compress.plan import LayerPlan, Member, OutExpert, Plan
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, RoutingEvent
from moelab.models.reference import expert_activations, expert_input
from moelab.routing import Routing
from moelab.run import run_batches
from moelab.run.loss import next_token_nll

# options that would ask an atomic method for a number of experts instead of a share of parameters
_EXPERT_COUNT_OPTIONS = ("num_experts", "n_experts", "experts", "keep", "keep_experts", "num_keep",
                         "remove", "remove_experts", "num_remove", "prune_experts", "count")
_OPTIONS = ("progress",)


class HeaprError(MoelabError):
    """Bad input to the HEAPr planner (spec, options or calibration data)."""


@dataclass
class AtomStats:
    """Calibration statistics of the atoms of one MoE layer (sums over the tokens routed to each expert).

    act_sq_EI:  sum_t a_{t,k}^2                (pass 2)
    proj_sq_EI: sum_t (w_k . g_{t,e})^2        (pass 1)
    tokens_E:   N_e, tokens routed to each expert
    """

    act_sq_EI: Tensor
    proj_sq_EI: Tensor
    tokens_E: Tensor


@dataclass
class HeaprStats:
    """Per-layer :class:`AtomStats` with ``label_tokens`` (n, predicted tokens) and ``tokens`` (all)."""

    layers: dict[int, AtomStats]
    label_tokens: int
    tokens: int

    def scores(self) -> dict[int, Tensor]:
        """``layer -> s [E, I]``: estimated loss increase (nats/token) of removing each atom."""
        out = {}
        for layer, st in self.layers.items():
            g_EI = st.proj_sq_EI / st.tokens_E.clamp(min=1).unsqueeze(-1)  # w_k^T G_e w_k
            out[layer] = st.act_sq_EI * g_EI / (2 * self.label_tokens)
        return out


def min_calibration_tokens(view: ModelView) -> int:
    """Fewest calibration tokens HEAPr accepts: ``max over layers of ceil(H * E / K)``.

    ``G_e`` is ``[H, H]`` with rank at most ``N_e``; with ``T`` tokens an expert receives ``T*K/E`` on
    average, so below ``H*E/K`` tokens the average expert's output-space Hessian is rank-deficient.
    """
    return max(math.ceil(b.hidden_size * b.num_experts / b.top_k) for b in view.blocks)


def _acc_dtype(view: ModelView) -> torch.dtype:
    """float64 for float64 models (tests), float32 otherwise."""
    dtype = next(view.model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_calibration(view: ModelView, calib: Any) -> list[Tensor]:
    """The calibration batches, checked: int tensors [B, S >= 2], ids in [0, V), enough tokens."""
    if calib is None or not hasattr(calib, "batches"):
        raise HeaprError("calib: HEAPr needs calibration data (a moelab.compress.Calibration from "
                         f"calibration_batches), got {type(calib).__name__}")
    vocab = view.model.get_input_embeddings().num_embeddings
    batches = []
    for i, b in enumerate(calib.batches):
        if not isinstance(b, Tensor) or b.ndim != 2 or b.dtype not in (torch.int64, torch.int32):
            raise HeaprError(f"calib.batches[{i}]: expected int64 token ids [B, S], got "
                             f"{getattr(b, 'dtype', type(b).__name__)} {tuple(getattr(b, 'shape', ()))}")
        if b.shape[1] < 2:
            raise HeaprError(f"calib.batches[{i}]: sequences of {b.shape[1]} token(s) predict nothing; "
                             "HEAPr needs sequences of 2 or more tokens")
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= vocab):
            raise HeaprError(f"calib.batches[{i}]: token ids must lie in [0, {vocab}) (the model's "
                             f"vocabulary), got [{int(b.min())}, {int(b.max())}]")
        batches.append(b.long())
    tokens, needed = sum(b.numel() for b in batches), min_calibration_tokens(view)
    if tokens < needed:
        raise HeaprError(
            f"calib: {tokens} calibration tokens are too few for HEAPr's second-order statistics; "
            f"it needs at least {needed} (hidden size x experts / top-k, so that an average expert "
            f"sees as many tokens as its [H, H] output-space Hessian has rows); pass more tokens to "
            f"calibration_batches")
    return batches


def _check_request(spec: Any, options: dict[str, Any]) -> None:
    """Reject an expert count (an atomic method takes a share of parameters) and unknown options."""
    count = next((k for k in options if k in _EXPERT_COUNT_OPTIONS), None)
    if isinstance(spec, int) and not isinstance(spec, bool):
        count = f"spec={spec}"
    elif count is not None:
        count = f"{count}={options[count]!r}"
    if count is not None:
        raise HeaprError(
            f"{count.split('=')[0]}: HEAPr is an atomic method and removes neurons, not experts; "
            f"give CompressSpec(ratio=...) with the share of routed-expert parameters to remove in "
            f"[0, 1) instead of an expert count (got {count})")
    if not isinstance(spec, CompressSpec):
        raise HeaprError(f"spec: expected a moelab.compress.spec.CompressSpec, got {type(spec).__name__}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise HeaprError(f"options: HEAPr takes {list(_OPTIONS)}, got unknown {unknown}")


def _routed(ids_TK: Tensor, w_TK: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """Tokens routed to expert ``e`` and their combine weights ``c [N]``."""
    tok_N, slot_N = torch.where(ids_TK == e)
    return tok_N, w_TK[tok_N, slot_N]


def _empty_stats(view: ModelView, dtype: torch.dtype) -> dict[int, AtomStats]:
    out = {}
    for b in view.blocks:
        E, I, dev = b.num_experts, b.intermediate_size, b.gate.device
        out[b.layer] = AtomStats(torch.zeros(E, I, dtype=dtype, device=dev),
                                 torch.zeros(E, I, dtype=dtype, device=dev),
                                 torch.zeros(E, dtype=torch.long, device=dev))
    return out


def _block_output_hook(layer: int, outs: dict[int, Tensor]) -> Callable:
    """Forward hook keeping a block's output ``[..., H]`` for the gradient (it returns nothing)."""

    def hook(_mod, _args, out):
        outs[layer] = out[0] if isinstance(out, tuple) else out

    return hook


def _weights_need_grad(block: MoEBlockView, hidden_TH: Tensor, routing: Routing) -> Routing:
    """Routing edit for a frozen model: combine weights that require grad (same values), so the
    block's output is part of the autograd graph and the loss can be differentiated by it."""
    if routing.weights_TK.requires_grad:
        return routing
    return routing.replace(weights_TK=routing.weights_TK.detach().requires_grad_())


def _gradient_pass(view: ModelView, batches: list[Tensor], stats: dict[int, AtomStats],
                   dtype: torch.dtype, advance: Callable[[int], None]) -> None:
    """Pass 1 (forward + backward): accumulate ``sum_t (down_e^T g_{t,e})^2`` and ``N_e``."""
    routing: dict[int, RoutingEvent] = {}
    outs: dict[int, Tensor] = {}
    handles = [b.register_routing_hook(lambda ev: routing.__setitem__(ev.block.layer, ev))
               for b in view.blocks]
    handles += [b.module.register_forward_hook(_block_output_hook(b.layer, outs)) for b in view.blocks]
    handles += [b.register_routing_edit(_weights_need_grad) for b in view.blocks]
    device = next(view.model.parameters()).device
    try:
        for ids_BS in batches:
            routing.clear()
            outs.clear()
            with torch.enable_grad():
                ids_BS = ids_BS.to(device)
                logits_BSV = view.model(input_ids=ids_BS, use_cache=False).logits
                loss = next_token_nll(logits_BSV, ids_BS, reduction="sum", dtype=dtype)
                missing = [b.layer for b in view.blocks if b.layer not in routing or b.layer not in outs]
                if missing:
                    raise HeaprError(f"model: the MoE blocks of layers {missing} did not run in the forward")
                grads = torch.autograd.grad(loss, [outs[b.layer] for b in view.blocks], allow_unused=True)
            for b, grad in zip(view.blocks, grads, strict=True):
                if grad is not None:
                    _accumulate_gradients(b, routing[b.layer], grad, stats[b.layer], dtype)
            advance(ids_BS.numel())
    finally:
        for h in handles:
            h.remove()
        routing.clear()
        outs.clear()


def _accumulate_gradients(block: MoEBlockView, ev: RoutingEvent, grad: Tensor, st: AtomStats,
                          dtype: torch.dtype) -> None:
    gamma_TH = grad.reshape(-1, block.hidden_size).to(dtype)  # dLsum / do_t
    w_TK = ev.weights_TK.to(dtype)
    for e in range(block.num_experts):
        tok_N, c_N = _routed(ev.ids_TK, w_TK, e)
        if tok_N.numel() == 0:
            continue
        g_NH = gamma_TH[tok_N] * c_N.unsqueeze(-1) if block.combine == "output" else gamma_TH[tok_N]
        proj_NI = g_NH @ block.down[e].to(dtype)  # w_k . g_{t,e} for every atom k
        st.proj_sq_EI[e] += proj_NI.square().sum(0)
        st.tokens_E[e] += tok_N.numel()


@torch.no_grad()
def _activation_pass(view: ModelView, batches: list[Tensor], stats: dict[int, AtomStats],
                     dtype: torch.dtype, advance: Callable[[int], None]) -> None:
    """Pass 2 (forward): accumulate ``sum_t a_{t,k}^2`` over the tokens routed to each expert."""

    def on_route(ev: RoutingEvent) -> None:
        block, st = ev.block, stats[ev.block.layer]
        x_TH, w_TK = ev.hidden_TH.to(dtype), ev.weights_TK.to(dtype)
        for e in range(block.num_experts):
            tok_N, c_N = _routed(ev.ids_TK, w_TK, e)
            if tok_N.numel() == 0:
                continue
            x_NH = expert_input(block, x_TH[tok_N], c_N)
            st.act_sq_EI[e] += expert_activations(block, e, x_NH, dtype).square().sum(0)

    handles = [b.register_routing_hook(on_route) for b in view.blocks]
    run_batches(view.model, batches, handles=handles, on_output=lambda ids_BS, _out: advance(ids_BS.numel()),
                use_cache=False)


def heapr_stats(view: ModelView, calib: Calibration, *, progress: bool = False) -> HeaprStats:
    """Run HEAPr's two forward passes and one backward pass over ``calib``; see the module docstring.

    The model runs in eval mode (restored after, also on error). Raises :class:`HeaprError` for
    missing, malformed or too small calibration data (see :func:`min_calibration_tokens`).
    """
    from moelab.trace.progress import token_progress

    batches = _check_calibration(view, calib)
    dtype = _acc_dtype(view)
    stats = _empty_stats(view, dtype)
    tokens = sum(b.numel() for b in batches)
    model, was_training = view.model, view.model.training
    model.eval()
    try:
        with token_progress(2 * tokens, enabled=progress, label="HEAPr statistics") as advance:
            _gradient_pass(view, batches, stats, dtype, advance)
            _activation_pass(view, batches, stats, dtype, advance)
    finally:
        model.train(was_training)
    label_tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    return HeaprStats(stats, label_tokens, tokens)


def heapr_scores(view: ModelView, calib: Calibration, *, progress: bool = False) -> dict[int, Tensor]:
    """``layer -> s [E, I]`` (float32/float64, on the model's device): the HEAPr score of every atom."""
    return heapr_stats(view, calib, progress=progress).scores()


def select_atoms(scores: dict[int, Tensor], ratio: float, budget: str) -> dict[int, Tensor]:
    """``layer -> keep [E, I]`` bool: drop the ``round(ratio * atoms)`` lowest-scored atoms, ranked
    across all layers (``budget='global'``) or within each layer (``'layer'``).

    Ties break by (layer, expert, neuron) order (stable sort), so the choice is deterministic.
    Raises :class:`HeaprError` when a layer would lose every neuron.
    """
    layers = sorted(scores)
    for layer in layers:
        if torch.isnan(scores[layer]).any():
            raise HeaprError(f"calib: HEAPr scores of layer {layer} are NaN (the model's loss or "
                             f"gradients are not finite on the calibration data)")
    groups = [layers] if budget == "global" else [[layer] for layer in layers]
    keep: dict[int, Tensor] = {}
    for group in groups:
        flat = torch.cat([scores[layer].detach().double().cpu().flatten() for layer in group])
        n_remove = math.floor(ratio * flat.numel() + 0.5)
        keep_flat = torch.ones(flat.numel(), dtype=torch.bool)
        keep_flat[torch.sort(flat, stable=True).indices[:n_remove]] = False
        sizes = [scores[layer].numel() for layer in group]
        for layer, part in zip(group, keep_flat.split(sizes), strict=True):
            keep[layer] = part.view(scores[layer].shape)
    for layer in layers:
        if not keep[layer].any():
            E, I = scores[layer].shape
            raise HeaprError(
                f"ratio: {ratio} with budget={budget!r} removes every neuron of layer {layer} "
                f"({E} experts x {I} neurons), which would delete the layer's routed experts; use a "
                f"smaller ratio" + (" or budget='layer'" if budget == "global" else ""))
    return keep


def _budget_meta(view: ModelView, keep: dict[int, Tensor]) -> dict[str, Any]:
    """Atoms and parameters removed (each atom: 3H weights, +2 with gate/up biases)."""
    removed_atoms = removed_params = 0
    for b in view.blocks:
        per_atom = 3 * b.hidden_size + (b.gate_bias is not None) + (b.up_bias is not None)
        gone = int((~keep[b.layer]).sum())
        removed_atoms += gone
        removed_params += gone * per_atom
    routed = sum(b.expert_params() for b in view.blocks)
    return {"atoms_total": sum(int(k.numel()) for k in keep.values()), "atoms_removed": removed_atoms,
            "params_removed": removed_params, "routed_params": routed,
            "param_share_removed": removed_params / routed}


def plan_heapr(view: ModelView, calib: Calibration, spec: CompressSpec, **options: Any) -> Plan:
    """The HEAPr plan: every expert kept, with a ``neuron_mask [I]`` (False = atom removed).

    ``spec.ratio`` is the share of routed-expert parameters removed, ``spec.budget`` 'global' ranks
    atoms across layers (the paper) and 'layer' within each layer. Option ``progress`` shows a bar.
    ``plan.meta`` has per layer ``kept_neurons`` (neurons kept per expert) and ``expert_scores``
    (sum of the expert's atom scores), the budget actually removed, calibration and seconds.
    """
    _check_request(spec, options)
    start = time.perf_counter()
    stats = heapr_stats(view, calib, progress=bool(options.get("progress", False)))
    scores = stats.scores()
    keep = select_atoms(scores, spec.ratio, spec.budget)
    layers = {
        layer: LayerPlan(layer, [OutExpert([Member(e)], neuron_mask=keep_EI[e].clone())
                                 for e in range(keep_EI.shape[0])])
        for layer, keep_EI in sorted(keep.items())
    }
    meta = {
        "method": "heapr", "ratio": spec.ratio, "budget": spec.budget, "seed": spec.seed,
        "calibration": calib.describe() if hasattr(calib, "describe") else {"tokens": stats.tokens},
        "passes": "2 forward + 1 backward", "score_units": "estimated loss increase, nats/token",
        "checkpoint": "fixed-width experts, removed neurons zeroed",
        **_budget_meta(view, keep),
        "kept_neurons": {str(layer): [int(n) for n in k.sum(1)] for layer, k in sorted(keep.items())},
        "expert_scores": {str(layer): [float(x) for x in s.sum(1)] for layer, s in sorted(scores.items())},
        "seconds": round(time.perf_counter() - start, 3),
    }
    return Plan("heapr", layers, None, meta)


__all__ = ["AtomStats", "HeaprError", "HeaprStats", "heapr_scores", "heapr_stats", "min_calibration_tokens",
           "plan_heapr", "select_atoms"]
