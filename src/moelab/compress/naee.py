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
from dataclasses import replace
from itertools import combinations

import numpy as np
import torch
from torch import Tensor, nn

from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.common import LayerInputs, check_calibration, planner_inputs
from moelab.compress.plan import LayerPlan, Plan
from moelab.compress.simulate import masked_block
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import (
    ModelView,
    MoEBlockView,
    RoutingEvent,
    expert_forward,
    open_model,
    reference_forward,
    reference_route,
)
from moelab.routing import Routing
from moelab.steer.edit_kit import EditHandle
from moelab.steer.edits import skip_below

CHUNK_ELEMENTS = 1 << 24  # expert outputs [T_chunk, E, H] / Grams [T_chunk, E, E] held at once (float64: 128 MiB)


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
    return Routing(None, ids_TK, w_TK.to(torch.float64)).dense_weights(num_experts)


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
    calib, counts, inputs = planner_inputs(view, calib, spec, kept, "naee", min_tokens)
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

class SkipHandle:
    """Returned by :func:`install_skipping`: skip statistics per layer, and ``remove()`` (or a ``with``
    block). The skipping itself is the stock routing edit :func:`moelab.steer.skip_below`."""

    def __init__(self, edit: EditHandle, beta: dict[int, float]) -> None:
        self.edit, self.beta = edit, beta

    def skip_rate(self, layer: int | None = None) -> float:
        """Share of non-first expert slots skipped so far (one layer, or all together)."""
        cs = list(self.edit.counts.values()) if layer is None else [self.edit.counts[layer]]
        cand = sum(c.get("candidates", 0) for c in cs)
        return sum(c.get("skipped", 0) for c in cs) / cand if cand else 0.0

    def stats(self) -> dict[int, dict[str, float]]:
        """``layer -> {beta, tokens, skipped, skip_rate}`` (plain numbers, JSON-serialisable)."""
        return {layer: {"beta": self.beta[layer], "tokens": c["tokens"], "skipped": c.get("skipped", 0),
                        "skip_rate": self.skip_rate(layer)}
                for layer, c in self.edit.counts.items()}

    def reset(self) -> None:
        self.edit.reset()

    def remove(self) -> None:
        self.edit.remove()

    def __enter__(self) -> SkipHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_skipping(model: nn.Module | ModelView, beta: float | dict[int, float],
                     renormalize: bool = True) -> SkipHandle:
    """Turn on NAEE dynamic skipping in every MoE block of ``model``: a token's non-first slot is
    skipped when its weight is below ``beta`` times the token's largest (``w_k < beta * w_1``); with
    ``renormalize`` the kept weights are rescaled to the token's original total (Mixtral's top-2
    renormalisation, as in the official ``DynamicSkippingMixtralSparseMoeBlockWrapper``).

    ``beta``: one fraction for all layers, or ``{layer: beta}`` (e.g. from :func:`calibrate_skipping`;
    layers not listed get 0, no skipping). A routing edit (:func:`moelab.steer.skip_below`), so every
    family runs its own forward; ``handle.remove()`` takes it off.
    """
    view = model if isinstance(model, ModelView) else open_model(model)
    betas = {b.layer: (beta.get(b.layer, 0.0) if isinstance(beta, dict) else beta) for b in view.blocks}
    for layer, b in betas.items():
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1:
            raise MoelabError(f"beta: expected a fraction in [0, 1] for layer {layer}, got {b!r}")
    return SkipHandle(skip_below(view, betas, renormalize=renormalize), betas)


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


__all__ = ["SkipHandle", "SubsetLoss", "beam_search", "calibrate_skipping", "dense_weights",
           "exhaustive_search", "install_skipping", "plan_naee"]
