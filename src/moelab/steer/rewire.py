"""Rewiring experts on the fly: router-logit offsets fitted to the context while generating.

"Rewiring Experts on the Fly: Continuous Rerouting for Better Online Adaptation in
Mixture-of-Expert Models" (2025, arXiv:2510.14853). In selected MoE layers l a vector
``delta_l [E]`` is added to the router logits (the routing edit :func:`moelab.steer.logit_offsets`,
so the family's own rule re-chooses the experts); the vectors are fitted with the model's own
next-token loss on the context already seen, with no external data:

    delta* = argmin_delta  (1 / (S - 1)) * sum_s  -log p(x_{s+1} | x_{<=s}; logits_l + delta_l)

at prefill and again every ``every`` generated tokens, and reset for each request. The model is
frozen; only the offsets move (Adam, :mod:`moelab.steer._fit`). The layers default to the last
``last_layers`` MoE layers (the paper picks high-confidence layers; which ones is a parameter here).

Shape legend: B sequences, S positions, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, open_model
from moelab.run.loss import next_token_nll
from moelab.steer._fit import FitConfig, FitReport, minimise
from moelab.steer.edit_kit import EditHandle
from moelab.steer.edits import logit_offsets


@dataclass(frozen=True)
class RewireConfig:
    """Which layers get offsets (``layers``, or the last ``last_layers`` MoE layers), how they are
    fitted (``fit``), and how often they are refitted while generating (every ``every`` tokens)."""

    layers: tuple[int, ...] | None = None
    last_layers: int = 2
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=5, lr=0.1))
    every: int = 16

    def __post_init__(self) -> None:
        if self.last_layers < 1:
            raise MoelabError(f"Rewire: last_layers must be >= 1, got {self.last_layers}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise MoelabError(f"Rewire: every must be an int >= 1, got {self.every!r}")


def rewire_layers(view: ModelView, cfg: RewireConfig) -> list[int]:
    moe = [b.layer for b in view.blocks]
    if cfg.layers is None:
        return moe[-cfg.last_layers:]
    bad = [layer for layer in cfg.layers if layer not in moe]
    if bad:
        raise MoelabError(f"Rewire: layers {bad} are not MoE layers (MoE layers: {moe})")
    return list(cfg.layers)


def fit_offsets(model: ModelView | nn.Module, ids_BS: Tensor, cfg: RewireConfig = RewireConfig()
                ) -> tuple[dict[int, Tensor], FitReport]:
    """Offsets ``{layer: delta_E}`` fitted to the next-token loss of ``ids_BS`` (formula above)."""
    view = model if isinstance(model, ModelView) else open_model(model)
    if ids_BS.shape[-1] < 2:
        raise MoelabError("Rewire: the context needs at least 2 tokens to fit offsets on")
    weight = view.blocks[0].router_weight
    offsets = {layer: torch.zeros(view.block(layer).num_experts, dtype=torch.float32, device=weight.device,
                                  requires_grad=True) for layer in rewire_layers(view, cfg)}
    was_training = view.model.training
    view.model.eval()
    try:
        with logit_offsets(view, offsets):
            report = minimise(list(offsets.values()),
                              lambda: next_token_nll(view.model(input_ids=ids_BS, use_cache=False).logits, ids_BS),
                              cfg.fit)
    finally:
        view.model.train(was_training)
    return {layer: d.detach() for layer, d in offsets.items()}, report


def rewired(model: ModelView | nn.Module, offsets: dict[int, Tensor]) -> EditHandle:
    """Install fitted offsets (a :func:`moelab.steer.logit_offsets` edit; ``remove()`` to reset)."""
    return logit_offsets(model, offsets)


class RewireScorer:
    """A generation scorer (:mod:`moelab.run.generate`): offsets fitted on the prompt, refitted on all
    the context every ``cfg.every`` new tokens (the KV cache rebuilt after each refit, since a refit
    changes past tokens' routing); removed again by :meth:`close`."""

    def __init__(self, model: ModelView | nn.Module, cfg: RewireConfig = RewireConfig()) -> None:
        self.view = model if isinstance(model, ModelView) else open_model(model)
        self.cfg = cfg
        rewire_layers(self.view, cfg)  # check the layers before the first token
        self.ids: Tensor | None = None
        self.reports: list[FitReport] = []
        self._handle: EditHandle | None = None
        self._cache = None
        self._since = 0

    def __call__(self, new_1S: Tensor) -> Tensor:
        self.ids = new_1S if self.ids is None else torch.cat([self.ids, new_1S], dim=1)
        feed = new_1S
        if self._handle is None or self._since >= self.cfg.every:
            self.close()
            offsets, report = fit_offsets(self.view, self.ids, self.cfg)
            self.reports.append(report)
            self._handle, self._cache, self._since, feed = rewired(self.view, offsets), None, 0, self.ids
        with torch.no_grad():
            out = self.view.model(input_ids=feed, cache=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        self._since += 1
        return out.logits[0, -1]

    def close(self) -> None:
        """Remove the installed offsets (the model is as it was)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def remove(self) -> None:  # a generation handle: removed when generation ends
        self.close()


def rewire_greedy(model: ModelView | nn.Module, prompt_BS: Tensor, max_new_tokens: int,
                  cfg: RewireConfig = RewireConfig()) -> tuple[Tensor, list[FitReport]]:
    """Greedy generation with offsets fitted at prefill and refitted every ``cfg.every`` tokens on
    all the context so far. Each refit changes the routing of past tokens, so the KV cache is
    rebuilt from the full context after it. Returns the ids ``[B, S + n]`` and every fit's report."""
    view = model if isinstance(model, ModelView) else open_model(model)
    ids, reports = prompt_BS, []
    cache, new, handle = None, prompt_BS, None
    try:
        for i in range(max_new_tokens):
            if i % cfg.every == 0:
                if handle is not None:
                    handle.remove()
                offsets, report = fit_offsets(view, ids, cfg)
                reports.append(report)
                handle, cache, new = rewired(view, offsets), None, ids
            with torch.no_grad():
                out = view.model(input_ids=new, cache=cache, use_cache=True)
            cache = out.cache
            new = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, new], dim=1)
    finally:
        if handle is not None:
            handle.remove()
    return ids, reports


__all__ = ["RewireConfig", "RewireScorer", "fit_offsets", "rewire_greedy", "rewire_layers", "rewired"]
