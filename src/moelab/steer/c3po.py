"""C3PO: test-time re-mixing of a sample's core experts in its critical layers, from its neighbours.

Li et al. 2025, "C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization for
Test-Time Expert Re-Mixing" (arXiv:2504.07964; code tianyi-lab/C3PO). Written for language
modelling on moelab's corpus; every choice the paper leaves to the task is a parameter here.

Reference set: the samples (token windows) of a pool the model handles best (lowest next-token
loss), each with its embedding ``e_i`` (mean over positions of the model's last hidden state: the
model's own embedding, no external encoder) and, per critical layer l (the last ``critical_layers``
MoE layers), its routing-weight vector ``w_il [E]`` (the dense combine weights, mean over tokens).
For a test sample with embedding e: its m nearest references by cosine similarity, kernel weights
``K_i = softmax_i(cos(e, e_i) / tau)``, and per layer the core experts ``C_l``: the ``core_experts``
largest entries of ``w̄_l = sum_i K_i w_il``. Three surrogates give the target ``ω_l``:

    kernel regression   ω_l = w̄_l
    mode finding        ω ← a·ω + (1 − a)·sum_i k_i(ω) w_il,  k_i(ω) ∝ K_i·exp(−||ω − w_il||² / h²),
                        from the sample's own w_l, ``mode_steps`` times (a mean shift toward the
                        densest neighbour routing)
    neighbourhood GD    from w̄_l, Adam on  sum_i K_i · loss(x_i; ω)  (the neighbours' loss)
    oracle              Adam on the sample's own loss (its labels: the bound the surrogates are
                        measured against, not a method), once from the sample's own w_l and once
                        from w̄_l (from its own weights an unchosen expert gets no gradient); the
                        better fit is kept, or no re-mixing at all where neither beats the model

The sample then runs with re-mixed routing (:func:`remixed`, a routing edit): each token's dense
weights ``d_E`` become ``d_E + mix·1[C_l]·(ω_l − d_E)`` on the core experts (``mix`` = 1 replaces
them, as the paper does; less keeps some of each token's own routing), the top-k of that is kept,
rescaled to the token's original total weight.

Shape legend: N samples, S positions, T tokens, E experts, K slots, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView
from moelab.run.loss import next_token_nll
from moelab.steer._fit import FitConfig, FitReport, minimise
from moelab.steer.edit_kit import EditHandle, edit_view, install_edit

SURROGATES = ("kernel", "mode", "ngd", "oracle")


@dataclass(frozen=True)
class C3POConfig:
    critical_layers: int = 2
    core_experts: int | None = None  # None: twice the layer's top_k
    neighbours: int = 3
    tau: float = 0.1
    mode_a: float = 0.5
    mode_steps: int = 5
    mode_bandwidth: float = 0.5
    mix: float = 1.0
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=10, lr=0.05))

    def __post_init__(self) -> None:
        for name in ("critical_layers", "neighbours", "mode_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MoelabError(f"C3PO: {name} must be an int >= 1, got {v!r}")
        if self.core_experts is not None and self.core_experts < 1:
            raise MoelabError(f"C3PO: core_experts must be >= 1, got {self.core_experts}")
        if not 0 < self.mix <= 1:
            raise MoelabError(f"C3PO: mix must be in (0, 1], got {self.mix!r}")
        if not 0 <= self.mode_a < 1 or self.tau <= 0 or self.mode_bandwidth <= 0:
            raise MoelabError("C3PO: mode_a must be in [0, 1), tau and mode_bandwidth > 0")


@dataclass
class ReferenceSet:
    """``ids_NS`` the kept samples, ``embed_ND`` their embeddings, ``weights[layer] [N, E]`` their
    mean routing weights, ``loss_N`` their next-token loss; ``vocab_size`` ties them to a tokenizer."""

    ids_NS: Tensor
    embed_ND: Tensor
    weights: dict[int, Tensor]
    loss_N: Tensor
    vocab_size: int


def critical_layers(view: ModelView, cfg: C3POConfig) -> list[int]:
    return [b.layer for b in view.blocks][-cfg.critical_layers:]


def profile(view: ModelView, ids_NS: Tensor, layers: list[int]) -> tuple[Tensor, dict[int, Tensor], Tensor]:
    """``(embed_ND, weights {layer: [N, E]}, loss_N)`` of every sample, under the current edits."""
    seen: dict[int, Tensor] = {}
    handles = [view.block(layer).register_routing_hook(
        lambda ev, layer=layer: seen.__setitem__(layer, ev.routing.dense_weights(view.block(layer).num_experts)))
        for layer in layers]
    try:
        with torch.no_grad():
            out = view.model(input_ids=ids_NS, use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    N, S = ids_NS.shape
    weights = {layer: w.float().reshape(N, S, -1).mean(1) for layer, w in seen.items()}
    loss_N = torch.stack([next_token_nll(out.logits[i:i + 1], ids_NS[i:i + 1]) for i in range(N)])
    return out.hidden_states[-1].float().mean(1), weights, loss_N


def build_reference(model: ModelView | nn.Module, pool_NS: Tensor, keep: int, cfg: C3POConfig = C3POConfig()) -> ReferenceSet:
    """The ``keep`` samples of ``pool_NS`` with the lowest next-token loss, profiled."""
    view = edit_view(model)
    if not 1 <= keep <= pool_NS.shape[0]:
        raise MoelabError(f"C3PO: keep must be in [1, {pool_NS.shape[0]}] (the pool's size), got {keep}")
    embed, weights, loss = profile(view, pool_NS, critical_layers(view, cfg))
    best = loss.argsort()[:keep]
    return ReferenceSet(pool_NS[best], embed[best], {k: v[best] for k, v in weights.items()}, loss[best],
                        int(view.model.config.vocab_size))


def check_reference(view: ModelView, ref: ReferenceSet, cfg: C3POConfig) -> None:
    vocab = int(view.model.config.vocab_size)
    if ref.vocab_size != vocab or int(ref.ids_NS.max()) >= vocab:
        raise MoelabError(f"C3PO: the reference set was tokenised for a vocabulary of {ref.vocab_size}, "
                          f"the model has {vocab}")
    want = critical_layers(view, cfg)
    if sorted(ref.weights) != sorted(want) or any(
            ref.weights[layer].shape[1] != view.block(layer).num_experts for layer in want):
        raise MoelabError(f"C3PO: the reference set holds layers {sorted(ref.weights)}; this model and config "
                          f"need {want} with their expert counts")


def neighbours(ref: ReferenceSet, embed_D: Tensor, cfg: C3POConfig) -> tuple[Tensor, Tensor]:
    """``(idx_m, K_m)``: the nearest references by cosine similarity and their kernel weights."""
    cos_N = torch.nn.functional.cosine_similarity(ref.embed_ND, embed_D.unsqueeze(0), dim=-1)
    m = min(cfg.neighbours, cos_N.shape[0])
    top = cos_N.topk(m)
    return top.indices, torch.softmax(top.values / cfg.tau, dim=0)


def remixed(model: ModelView | nn.Module, targets: dict[int, tuple[Tensor, Tensor]], mix: float = 1.0) -> EditHandle:
    """Routing edit: ``{layer: (omega_E, core_E bool)}`` re-mixes every token's weights by ``mix``
    (see above); ``omega_E`` may require grad."""
    view = edit_view(model)

    def make(block: MoEBlockView, value):
        omega, core = value
        if omega.shape != (block.num_experts,) or core.shape != (block.num_experts,):
            raise MoelabError(f"C3PO: layer {block.layer}: omega and core must have shape [E={block.num_experts}]")

        def body(block, hidden_TH, routing):
            d_TE = routing.dense_weights(block.num_experts)
            mixed_TE = d_TE + mix * core.to(d_TE.dtype) * (omega.to(d_TE.dtype) - d_TE)
            w_TK, ids_TK = mixed_TE.topk(routing.ids_TK.shape[1], dim=-1)
            total_T1 = d_TE.sum(-1, keepdim=True)
            w_TK = w_TK * total_T1 / w_TK.sum(-1, keepdim=True).clamp(min=1e-30)
            return routing.replace(ids_TK=ids_TK, weights_TK=w_TK.to(routing.weights_TK.dtype), mask_TK=None), {}

        return body

    return install_edit(view, "c3po.remixed", targets, make)


def _core(w_E: Tensor, block: MoEBlockView, cfg: C3POConfig) -> Tensor:
    n = min(cfg.core_experts or 2 * block.top_k, block.num_experts)
    return torch.zeros(block.num_experts, dtype=torch.bool).scatter(0, w_E.topk(n).indices, True)


def _mode(own_E: Tensor, w_mE: Tensor, K_m: Tensor, cfg: C3POConfig) -> Tensor:
    omega = own_E
    for _ in range(cfg.mode_steps):
        k = K_m * torch.exp(-((w_mE - omega) ** 2).sum(-1) / cfg.mode_bandwidth ** 2)
        omega = cfg.mode_a * omega + (1 - cfg.mode_a) * (k[:, None] * w_mE).sum(0) / k.sum().clamp(min=1e-30)
    return omega


def surrogate(model: ModelView | nn.Module, ref: ReferenceSet, ids_1S: Tensor, method: str,
              cfg: C3POConfig = C3POConfig()) -> tuple[dict[int, tuple[Tensor, Tensor]], FitReport | None]:
    """The re-mixing targets ``{layer: (omega_E, core_E)}`` for one sample, by ``method`` (SURROGATES)."""
    view = edit_view(model)
    if method not in SURROGATES:
        raise MoelabError(f"C3PO: method must be one of {', '.join(SURROGATES)}, got {method!r}")
    check_reference(view, ref, cfg)
    layers = critical_layers(view, cfg)
    embed, own, _ = profile(view, ids_1S, layers)
    idx, K = neighbours(ref, embed[0], cfg)
    mean = {layer: (K[:, None] * ref.weights[layer][idx]).sum(0) for layer in layers}
    core = {layer: _core(mean[layer], view.block(layer), cfg) for layer in layers}
    if method == "kernel":
        return {layer: (mean[layer], core[layer]) for layer in layers}, None
    if method == "mode":
        return {layer: (_mode(own[layer][0], ref.weights[layer][idx], K, cfg), core[layer]) for layer in layers}, None
    if method == "ngd":
        return _fit(view, layers, mean, core, ref.ids_NS[idx], K, cfg)
    own_start = {layer: own[layer][0] for layer in layers}
    fits = [_fit(view, layers, start, core, ids_1S, torch.ones(1), cfg) for start in (own_start, mean)]
    best = min(fits, key=lambda f: f[1].losses[f[1].best_step])
    with torch.no_grad():
        base = float(next_token_nll(view.model(input_ids=ids_1S, use_cache=False).logits, ids_1S))
    if best[1].losses[best[1].best_step] >= base:  # no re-mixing beats the model's own routing: keep it
        return {layer: (mean[layer], torch.zeros_like(core[layer])) for layer in layers}, best[1]
    return best


def _fit(view: ModelView, layers: list[int], start: dict[int, Tensor], core: dict[int, Tensor], samples_NS: Tensor,
         kernel_N: Tensor, cfg: C3POConfig) -> tuple[dict[int, tuple[Tensor, Tensor]], FitReport]:
    """Targets fitted from ``start`` to the kernel-weighted next-token loss of ``samples_NS``."""
    omega = {layer: start[layer].clone().requires_grad_(True) for layer in layers}

    def loss() -> Tensor:
        logits = view.model(input_ids=samples_NS, use_cache=False).logits
        per = torch.stack([next_token_nll(logits[i:i + 1], samples_NS[i:i + 1]) for i in range(samples_NS.shape[0])])
        return (kernel_N.to(per.dtype) * per).sum()

    was_training = view.model.training
    view.model.eval()
    try:
        with remixed(view, {layer: (omega[layer], core[layer]) for layer in layers}, cfg.mix):
            report = minimise(list(omega.values()), loss, cfg.fit)
    finally:
        view.model.train(was_training)
    return {layer: (omega[layer].detach(), core[layer]) for layer in layers}, report


__all__ = ["C3POConfig", "ReferenceSet", "SURROGATES", "build_reference", "critical_layers", "neighbours",
           "profile", "remixed", "surrogate"]
