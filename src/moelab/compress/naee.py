"""NAEE expert pruning: keep, per layer, the expert subset that best reconstructs the layer's output.

Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models" (ACL 2024, arXiv:2402.14800; Lucky-Lance/Expert_Sparsity,
``model/wrapper.py::enumerate``). For every MoE layer with input ``X`` (calibration hidden states) and
output ``F(X)``, keep the subset ``S`` of ``|S| = kept`` experts minimising

    L(S) = sum_sequences || F(x) - F_S(x) ||_F          (summed over the layer's calibration sequences)

where ``F_S`` is the same block with only the experts of ``S`` routable: router logits of the other
experts are set to -inf before the softmax/sigmoid and top-k, so the kept experts' weights are
renormalised exactly as in the pruned checkpoint (router rows removed). As in the official code the
norm is the (unsquared) Frobenius norm of each sequence's error, in float64, and each layer is
searched on the *unpruned* model's inputs (their ``layerwise_pruning``).

The search is exhaustive over the ``C(E, kept)`` subsets when that count is at most ``limit``;
beyond, a beam search removes experts one at a time (width ``beam``; 1 is greedy backward
elimination). ``plan.meta["search"]`` reports per layer the mode, the size of the subset space and
the number of subsets evaluated.

The dynamic skipping half of the paper (skip the second expert of a token when its weight is below
``beta`` times the first's) changes inference, not the checkpoint: :func:`install_skipping` at the end of this module.

Shape legend: T tokens, H hidden, E experts, K top-k, N subsets, Q calibration sequences.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
import torch
from torch import Tensor, nn

from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.plan import LayerPlan, Plan
from moelab.compress.simulate import masked_block
from moelab.compress.spec import CompressSpec
from moelab.compress.stats import ExpertStats, accumulate, gates
from moelab.errors import MoelabError
from moelab.models import (
    ModelView,
    MoEBlockView,
    RoutingEvent,
    expert_forward,
    reference_forward,
    reference_route,
)
from moelab.nn.hf import patch, router_from_view, unpatch
from moelab.nn.routing import Routing

CHUNK_ELEMENTS = 1 << 24  # expert outputs [T_chunk, E, H] / Grams [T_chunk, E, E] held at once (float64: 128 MiB)


@dataclass
class LayerInputs:
    """What one MoE block received over the calibration data: hidden states, each token's sequence,
    and its routing statistics (:class:`moelab.compress.stats.ExpertStats`, counts and gate sums)."""

    hidden_TH: Tensor  # float64
    seq_T: Tensor  # int64 index of the calibration sequence of each token
    num_seqs: int
    stats: ExpertStats

    @property
    def freq_E(self) -> Tensor:
        """Top-k selections of each expert, ``|T_e|`` (float64)."""
        return self.stats.count_E

    @property
    def weight_E(self) -> Tensor:
        """Sum of each expert's gates, ``sum_{t in T_e} g_{t,e}`` (float64; :mod:`moelab.compress.stats`)."""
        return self.stats.gate_sum_E


def check_calibration(calib: Calibration | None, method: str, min_tokens: int) -> Calibration:
    """Fail clearly when a planner that needs data got none, or too little."""
    if calib is None:
        raise MoelabError(f"calib: {method} needs calibration data (see moelab.compress.calibration_batches)")
    if calib.num_tokens < min_tokens:
        raise MoelabError(f"calib: {method} got {calib.num_tokens} calibration tokens, needs at least "
                          f"{min_tokens} (option min_tokens)")
    return calib


def kept_counts(view: ModelView, spec: CompressSpec, kept: int | dict[int, int] | None,
                method: str) -> dict[int, int]:
    """Experts each layer keeps: ``spec`` under the per-layer budget, or the ``kept`` override."""
    if spec.budget != "layer":
        raise MoelabError(f"budget: {method} plans each layer on its own; expected 'layer', got {spec.budget!r}")
    out = {}
    for b in view.blocks:
        n = spec.kept_per_layer(b.num_experts) if kept is None else (
            kept if isinstance(kept, int) else kept.get(b.layer, spec.kept_per_layer(b.num_experts)))
        if not 1 <= n <= b.num_experts:
            raise MoelabError(f"kept: layer {b.layer} would keep {n} of its {b.num_experts} experts; "
                              f"expected 1..{b.num_experts}")
        out[b.layer] = int(n)
    return out


@torch.no_grad()
def layer_inputs(view: ModelView, calib: Calibration) -> dict[int, LayerInputs]:
    """``layer -> LayerInputs`` from one routing pass over the calibration batches (float64, CPU).

    The statistics are accumulated as :func:`moelab.compress.stats.expert_statistics` does (without
    expert output norms), in the same pass that records the hidden states.
    """
    parts: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks}
    zero = {b.layer: torch.zeros(b.num_experts, dtype=torch.float64) for b in view.blocks}
    stats = {layer: ExpertStats(layer, 0, z.clone(), z.clone(), z.clone(), z.clone()) for layer, z in zero.items()}

    def collect(ev: RoutingEvent) -> None:
        parts[ev.block.layer].append(ev.hidden_TH.detach().to("cpu", torch.float64))
        accumulate(stats[ev.block.layer], ev.ids_TK, gates(ev.block, ev.weights_TK), None)

    routing_pass(view, calib, collect)
    seq_len = int(calib.batches[0].shape[1])
    out = {}
    for layer, xs in parts.items():
        hidden_TH = torch.cat(xs)
        T = hidden_TH.shape[0]
        out[layer] = LayerInputs(hidden_TH, torch.arange(T) // seq_len, -(-T // seq_len), stats[layer])
    return out


def _cpu_block(block: MoEBlockView) -> MoEBlockView:
    """A float64 CPU copy of the block's routed part (the search runs on the CPU, where
    :func:`moelab.compress.simulate.masked_block` puts its router biases). Shared experts and the
    output bias are left out: they cancel in ``F(x) - F_S(x)``."""
    names = ("router_weight", "router_bias", "correction_bias", "gate", "up", "down", "gate_bias", "up_bias",
             "down_bias")
    cpu = {n: None if getattr(block, n) is None else getattr(block, n).detach().to("cpu", torch.float64)
           for n in names}
    return replace(block, shared=None, output_bias=None, **cpu)


def dense_weights(ids_TK: Tensor, w_TK: Tensor, num_experts: int) -> Tensor:
    """The combine weights as a dense ``[T, E]`` float64 matrix (0 for experts a token did not pick)."""
    return torch.zeros(ids_TK.shape[0], num_experts, dtype=torch.float64).scatter_add_(
        1, ids_TK, w_TK.to(torch.float64))


class SubsetLoss:
    """Evaluates ``L(S)`` for many subsets of one layer's experts, chunking tokens to bound memory.

    ``F_S`` routes with :func:`moelab.compress.simulate.masked_block` (the reference that pruning
    to S equals), on a float64 CPU copy of the block.

    For ``combine='output'`` blocks the routed output is ``F(x_t) = sum_e W[t, e] y_e(x_t)``, so the
    error of a subset is a quadratic form in the weight change ``d = W - W_S``:

        ||F(x_t) - F_S(x_t)||^2 = d_t^T G_t d_t,     G_t[e, f] = <y_e(x_t), y_f(x_t)>

    The Gram matrices ``G_TEE`` are computed once per chunk (cached across calls while they fit
    ``cache_elements``); each subset then costs a routing and ``T E^2`` multiply-adds. Other blocks
    (Llama4 scales expert inputs) fall back to :func:`moelab.models.reference_forward` per subset.
    """

    def __init__(self, block: MoEBlockView, inputs: LayerInputs, cache_elements: int = 1 << 27) -> None:
        self.block, self.inputs = _cpu_block(block), inputs
        x_TH = inputs.hidden_TH
        E, H = block.num_experts, block.hidden_size
        step = max(1, CHUNK_ELEMENTS // (E * max(H, E)))
        self.chunks = [(x_TH[i:i + step], inputs.seq_T[i:i + step]) for i in range(0, len(x_TH), step)]
        self.fast = block.combine == "output"
        self.keep_cache = E * E * len(x_TH) <= cache_elements
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.evaluated = 0

    def _gram(self, c: int) -> tuple[Tensor, Tensor]:
        """Gram matrices ``G_TEE`` of the expert outputs and the full routing ``W_TE`` of chunk ``c``."""
        if c in self.cache:
            return self.cache[c]
        x_TH = self.chunks[c][0]
        y_TEH = torch.stack([expert_forward(self.block, e, x_TH) for e in range(self.block.num_experts)], 1)
        _, ids_TK, w_TK = reference_route(self.block, x_TH)
        out = (y_TEH @ y_TEH.transpose(1, 2), dense_weights(ids_TK, w_TK, self.block.num_experts))
        if self.keep_cache:
            self.cache[c] = out
        return out

    def _chunk_errors(self, c: int, subsets: list[tuple[int, ...]]) -> Tensor:
        """Squared error ``[N, T_chunk]`` of every subset on the tokens of chunk ``c``."""
        x_TH = self.chunks[c][0]
        E = self.block.num_experts
        out = torch.empty(len(subsets), x_TH.shape[0], dtype=torch.float64)
        if self.fast:
            g_TEE, w_TE = self._gram(c)
        else:
            z_TH = reference_forward(self.block, x_TH).to(torch.float64)
        for n, keep in enumerate(subsets):
            masked = masked_block(self.block, list(keep))
            if self.fast:
                _, ids_TK, ws_TK = reference_route(masked, x_TH)
                d_TE = w_TE - dense_weights(ids_TK, ws_TK, E)
                out[n] = torch.einsum("te,tef,tf->t", d_TE, g_TEE, d_TE).clamp_min(0.0)
            else:
                out[n] = (z_TH - reference_forward(masked, x_TH).to(torch.float64)).pow(2).sum(-1)
        return out

    @torch.no_grad()
    def __call__(self, subsets: list[tuple[int, ...]]) -> np.ndarray:
        """``L(S)`` of each subset, ``[N]`` float64."""
        sq_NQ = torch.zeros(len(subsets), self.inputs.num_seqs, dtype=torch.float64)
        for c, (_, seq_T) in enumerate(self.chunks):
            sq_NQ.index_add_(1, seq_T, self._chunk_errors(c, subsets))
        self.evaluated += len(subsets)
        return sq_NQ.sqrt().sum(1).numpy()


def exhaustive_search(loss: SubsetLoss, num_experts: int, kept: int, batch: int = 256
                      ) -> tuple[tuple[int, ...], float]:
    """The subset of ``kept`` experts with the smallest loss, over all ``C(E, kept)`` (first on ties)."""
    best, best_loss = None, math.inf
    pending = []
    for s in [*combinations(range(num_experts), kept), None]:
        if s is not None:
            pending.append(s)
        if pending and (s is None or len(pending) == batch):
            values = loss(pending)
            i = int(np.argmin(values))
            if values[i] < best_loss:
                best, best_loss = pending[i], float(values[i])
            pending = []
    return best, best_loss


def beam_search(loss: SubsetLoss, num_experts: int, kept: int, beam: int = 1) -> tuple[tuple[int, ...], float]:
    """Backward elimination: from all experts, drop one at a time, keeping the ``beam`` best subsets."""
    frontier = [tuple(range(num_experts))]
    values = np.zeros(1)
    for _ in range(num_experts - kept):
        candidates = sorted({tuple(e for e in s if e != d) for s in frontier for d in s})
        values = loss(candidates)
        order = np.argsort(values, kind="stable")[:beam]
        frontier = [candidates[i] for i in order]
        values = values[order]
    return frontier[0], float(values[0])


def plan_naee(view: ModelView, calib: Calibration | None, spec: CompressSpec, *, limit: int = 5000,
              beam: int = 1, kept: int | dict[int, int] | None = None, min_tokens: int = 32) -> Plan:
    """NAEE pruning plan (see the module docstring).

    Options: ``limit`` largest ``C(E, kept)`` searched exhaustively; ``beam`` width of the search
    beyond it; ``kept`` overrides the experts kept (an int for every layer or ``{layer: n}``);
    ``min_tokens`` least calibration tokens accepted.
    """
    start = time.perf_counter()
    if limit < 1 or beam < 1:
        raise MoelabError(f"limit/beam: expected >= 1, got limit={limit}, beam={beam}")
    calib = check_calibration(calib, "naee", min_tokens)
    counts = kept_counts(view, spec, kept, "naee")
    inputs = layer_inputs(view, calib)
    layers, search = {}, {}
    for b in view.blocks:
        E, n = b.num_experts, counts[b.layer]
        space = math.comb(E, n)
        loss = SubsetLoss(b, inputs[b.layer])
        if space <= limit:
            best, value = exhaustive_search(loss, E, n)
            mode = "exhaustive"
        else:
            best, value = beam_search(loss, E, n, beam)
            mode = "greedy" if beam == 1 else f"beam{beam}"
        layers[b.layer] = LayerPlan.keep(b.layer, sorted(best))
        search[str(b.layer)] = {"mode": mode, "space": space, "evaluated": loss.evaluated, "loss": value,
                                "kept": sorted(best)}
    meta = {"method": "naee", "ratio": spec.ratio, "seed": spec.seed, "limit": limit, "beam": beam,
            "calibration": calib.describe(), "search": search, "seconds": time.perf_counter() - start}
    return Plan("naee", layers, meta=meta)




# --- dynamic expert skipping (NAEE section 3.2) -------------------------------------------------------

class SkipRouter(nn.Module):
    """NAEE dynamic skipping around a router: a token's non-first slot is skipped when its weight is
    below ``beta`` times the token's largest weight (``w_k < beta * w_1``). With ``renormalize`` the
    kept weights are rescaled to the token's original total (Mixtral's top-2 renormalisation, as in
    the official ``DynamicSkippingMixtralSparseMoeBlockWrapper``); ``beta=0`` returns the inner
    router's routing untouched.

    Counters (plain attributes, never saved): ``tokens`` routed, ``candidates`` non-first real slots,
    ``skipped`` slots skipped.
    """

    def __init__(self, router: nn.Module, beta: float, renormalize: bool = True) -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and 0 <= beta <= 1):
            raise MoelabError(f"beta: expected a fraction of the first expert's weight in [0, 1], got {beta!r}")
        self.router, self.beta, self.renormalize = router, float(beta), renormalize
        self.tokens = self.candidates = self.skipped = 0

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(self, x_TH: Tensor, **kwargs) -> Routing:
        r = self.router(x_TH, **kwargs)
        real_TK = r.real_mask()
        w_TK = r.weights_TK
        masked_TK = w_TK.float().masked_fill(~real_TK, -math.inf)
        first_TK = torch.zeros_like(real_TK).scatter(1, masked_TK.argmax(-1, keepdim=True), True)
        skip_TK = real_TK & ~first_TK & (masked_TK < self.beta * masked_TK.max(-1, keepdim=True).values)
        self.tokens += int(w_TK.shape[0])
        self.candidates += int((real_TK & ~first_TK).sum())
        n_skip = int(skip_TK.sum())
        self.skipped += n_skip
        if n_skip == 0:
            return r
        keep_TK = real_TK & ~skip_TK
        new_TK = torch.where(keep_TK, w_TK, torch.zeros((), dtype=w_TK.dtype, device=w_TK.device))
        if self.renormalize:
            total_T1 = torch.where(real_TK, w_TK, 0.0).sum(-1, keepdim=True)
            new_TK = new_TK * (total_T1 / new_TK.sum(-1, keepdim=True))
        return Routing(r.logits_TE, r.ids_TK, new_TK, keep_TK, r.aux)


class SkipHandle:
    """Returned by :func:`install_skipping`: skip statistics per layer, and ``remove()`` (or a ``with`` block)."""

    def __init__(self, model: nn.Module, routers: dict[int, SkipRouter]) -> None:
        self.model, self.routers = model, routers

    def skip_rate(self, layer: int | None = None) -> float:
        """Share of non-first expert slots skipped so far (one layer, or all together)."""
        rs = list(self.routers.values()) if layer is None else [self.routers[layer]]
        cand = sum(r.candidates for r in rs)
        return sum(r.skipped for r in rs) / cand if cand else 0.0

    def stats(self) -> dict[int, dict[str, float]]:
        """``layer -> {beta, tokens, skipped, skip_rate}`` (plain numbers, JSON-serialisable)."""
        return {layer: {"beta": r.beta, "tokens": r.tokens, "skipped": r.skipped, "skip_rate": self.skip_rate(layer)}
                for layer, r in self.routers.items()}

    def reset(self) -> None:
        for r in self.routers.values():
            r.tokens = r.candidates = r.skipped = 0

    def remove(self) -> None:
        unpatch(self.model)

    def __enter__(self) -> SkipHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_skipping(model: nn.Module | ModelView, beta: float | dict[int, float],
                     renormalize: bool = True) -> SkipHandle:
    """Turn on NAEE dynamic skipping in every MoE block of ``model`` (in place).

    ``beta``: one fraction for all layers, or ``{layer: beta}`` (e.g. from :func:`calibrate_skipping`;
    layers not listed get 0, no skipping). Runs through :func:`moelab.nn.hf.patch` (moelab's layer
    over the same weights, every family's routing reproduced), so a family it cannot patch raises
    :class:`~moelab.errors.UnsupportedModelError`. ``handle.remove()`` restores the original blocks.
    """
    module = model.model if isinstance(model, ModelView) else model
    routers: dict[int, SkipRouter] = {}

    def make(block: MoEBlockView) -> SkipRouter:
        b = beta.get(block.layer, 0.0) if isinstance(beta, dict) else beta
        routers[block.layer] = SkipRouter(router_from_view(block), b, renormalize)
        return routers[block.layer]

    patch(module, router=make)
    return SkipHandle(module, routers)


@torch.no_grad()
def calibrate_skipping(view: ModelView, calib: Calibration, quantile: float = 0.5) -> dict[int, float]:
    """NAEE's per-layer ``beta``: the ``quantile`` (median in the paper) of ``w_2 / w_1`` over calibration tokens."""
    if not 0 <= quantile <= 1:
        raise MoelabError(f"quantile: expected a value in [0, 1], got {quantile!r}")
    ratios: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks}

    def collect(ev: RoutingEvent) -> None:
        if ev.weights_TK.shape[1] >= 2:
            w_TK = ev.weights_TK.detach().to(torch.float64).sort(-1, descending=True).values
            ratios[ev.block.layer].append((w_TK[:, 1] / w_TK[:, 0].clamp_min(1e-30)).cpu())

    routing_pass(view, check_calibration(calib, "calibrate_skipping", 1), collect)
    return {layer: float(torch.quantile(torch.cat(r), quantile)) if r else 0.0 for layer, r in ratios.items()}


__all__ = ["LayerInputs", "SkipHandle", "SkipRouter", "SubsetLoss", "beam_search", "calibrate_skipping", "dense_weights",
           "check_calibration", "exhaustive_search", "install_skipping", "kept_counts", "layer_inputs",
           "plan_naee"]
