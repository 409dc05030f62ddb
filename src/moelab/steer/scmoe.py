"""SCMoE: self-contrast decoding of a Mixture-of-Experts model, its strong routing against its weak.

Shi et al. 2024, "Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by
Self-Contrast" (NeurIPS 2024, arXiv:2405.14507; code DavidFanzz/SCMoE). The same model runs twice
per step: the strong pass with its own top-k routing, the weak pass with every MoE layer routed
top-1 to each token's rank-r expert (r counted from 0 in the family's order of preference; the
default r = top_k is the best expert the strong pass leaves out, the paper's Mixtral setting r = 2).
Over the strong pass's plausible set, the contrast of their next-token log-probabilities:

    z_s = log_softmax(logits_strong),  z_w = log_softmax(logits_weak)
    plausible = { v : z_s[v] >= log(alpha) + max_v z_s }
    score[v]  = (1 + beta) * z_s[v] - beta * z_w[v]   for v in plausible,  -inf otherwise

Defaults alpha = 0.1, beta = 0.5 (the paper's). Using log-probabilities rather than logits changes
each pass by a constant per position, so the ranking and the softmax of ``score`` are the same.
Each pass keeps its own KV cache when decoding (:class:`SCMoEDecoder`); the weak pass is the routing
edit :func:`moelab.steer.route_to_rank`, installed only for its own forward.

Shape legend: B sequences, S positions, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, open_model
from moelab.steer.edit_kit import EditHandle
from moelab.steer.edits import route_to_rank


@dataclass(frozen=True)
class SCMoEConfig:
    """``alpha`` in (0, 1]: plausibility cut-off; ``beta`` >= 0: contrast strength; ``rank``: the weak
    pass's expert rank (None: the layer's top_k, its best unchosen expert)."""

    alpha: float = 0.1
    beta: float = 0.5
    rank: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise MoelabError(f"SCMoE: alpha must be in (0, 1], got {self.alpha!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (
                self.beta >= 0 and math.isfinite(self.beta)):
            raise MoelabError(f"SCMoE: beta must be a finite number >= 0, got {self.beta!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0):
            raise MoelabError(f"SCMoE: rank must be an int >= 0 (or None for top_k), got {self.rank!r}")


def contrast(logits_s: Tensor, logits_w: Tensor, alpha: float, beta: float) -> Tensor:
    """The SCMoE score ``[..., V]`` from the two passes' logits (float32 at least; formula above)."""
    dtype = torch.promote_types(logits_s.dtype, torch.float32)
    z_s = torch.log_softmax(logits_s.to(dtype), dim=-1)
    z_w = torch.log_softmax(logits_w.to(dtype), dim=-1)
    plausible = z_s >= math.log(alpha) + z_s.max(dim=-1, keepdim=True).values
    return ((1 + beta) * z_s - beta * z_w).masked_fill(~plausible, float("-inf"))


def weak_pass(model: ModelView | nn.Module, rank: int | None = None) -> EditHandle:
    """Install the weak routing on every MoE layer: top-1 to the rank-r expert (r < each layer's
    expert count; None: the layer's top_k)."""
    view = model if isinstance(model, ModelView) else open_model(model)
    ranks = {}
    for b in view.blocks:
        r = b.top_k if rank is None else rank
        if r >= b.num_experts:
            raise MoelabError(f"SCMoE: rank {r} needs more experts than layer {b.layer}'s {b.num_experts} "
                              "(rank counts from 0; the default is top_k)")
        ranks[b.layer] = r
    return route_to_rank(view, ranks)


def _logits(model: nn.Module, ids_BS: Tensor, cache=None) -> tuple[Tensor, object]:
    """Logits and the KV cache after ``ids_BS`` (transformers 5 names the cache ``cache``)."""
    out = model(input_ids=ids_BS, cache=cache, use_cache=True)
    return out.logits, out.cache


def scmoe_scores(model: ModelView | nn.Module, ids_BS: Tensor, cfg: SCMoEConfig = SCMoEConfig()) -> tuple[Tensor, Tensor, Tensor]:
    """``(score_BSV, logits_strong_BSV, logits_weak_BSV)`` for every position of ``ids_BS`` (no cache)."""
    view = model if isinstance(model, ModelView) else open_model(model)
    with torch.no_grad():
        strong = view.model(input_ids=ids_BS, use_cache=False).logits
        with weak_pass(view, cfg.rank):
            weak = view.model(input_ids=ids_BS, use_cache=False).logits
    return contrast(strong, weak, cfg.alpha, cfg.beta), strong, weak


class SCMoEDecoder:
    """Next-token scores for decoding, the strong and the weak pass each with its own KV cache.

    ``step(ids_BS)`` takes the prompt first, then each new token ``[B, 1]``, and returns ``score_BV``
    for the next position.
    """

    def __init__(self, model: ModelView | nn.Module, cfg: SCMoEConfig = SCMoEConfig()) -> None:
        self.view = model if isinstance(model, ModelView) else open_model(model)
        self.cfg = cfg
        weak_pass(self.view, cfg.rank).remove()  # check the rank now, not mid-generation
        self._cache_s = self._cache_w = None

    def __call__(self, ids_1S: Tensor) -> Tensor:
        """A generation scorer (:mod:`moelab.run.generate`): ``score_V`` for one sequence."""
        return self.step(ids_1S)[0]

    def step(self, ids_BS: Tensor) -> Tensor:
        model = self.view.model
        with torch.no_grad():
            strong, self._cache_s = _logits(model, ids_BS, self._cache_s)
            with weak_pass(self.view, self.cfg.rank):
                weak, self._cache_w = _logits(model, ids_BS, self._cache_w)
        return contrast(strong[:, -1], weak[:, -1], self.cfg.alpha, self.cfg.beta)


def scmoe_greedy(model: ModelView | nn.Module, prompt_BS: Tensor, max_new_tokens: int,
                 cfg: SCMoEConfig = SCMoEConfig(), eos_id: int | None = None) -> Tensor:
    """Greedy SCMoE decoding (the paper decodes greedily): ``[B, S + n]`` token ids."""
    if max_new_tokens < 1:
        raise MoelabError(f"SCMoE: max_new_tokens must be >= 1, got {max_new_tokens}")
    dec = SCMoEDecoder(model, cfg)
    ids, new = prompt_BS, prompt_BS
    for _ in range(max_new_tokens):
        nxt_B1 = dec.step(new).argmax(dim=-1, keepdim=True)
        ids, new = torch.cat([ids, nxt_B1], dim=1), nxt_B1
        if eos_id is not None and bool((nxt_B1 == eos_id).all()):
            break
    return ids


__all__ = ["SCMoEConfig", "SCMoEDecoder", "contrast", "scmoe_greedy", "scmoe_scores", "weak_pass"]
