"""Prefetch: read the next MoE layer's likely experts on a background thread while this one computes.

Shape legend: T tokens, H hidden, K top-k.

Prediction (speculative expert loading, Eliseev & Mazur 2023, "Fast Inference of
Mixture-of-Experts Language Models with Offloading", arXiv 2312.17238): the residual stream changes
little from one layer to the next, so the next MoE block's router applied to this block's input
``x_TH`` predicts the experts it will choose:

    predicted_{l+1} = distinct ids of top-k( route_{l+1}(x_l) )

with the next block's own selection rule (:func:`moelab.models.reference.reference_route`: its
router weight, bias, scoring, groups and correction bias). At block l a routing hook (it only
observes) makes the prediction; once block l's own experts are in (the provider's ``after_fetch``),
the predicted experts that are not resident are admitted into the cache (at their full size, so the
budget holds) and read by one worker thread, overlapping block l's expert compute and block l+1's
attention. Outputs are unchanged: the prefetched rows are the store's, and a forward that needs an
expert still being read waits for that read.

With a trained :class:`~moelab.offload.predictor.ExpertPredictor` (ExpertFlow, arXiv 2410.17954)
the prediction is its head from block l to block l + 1 instead of the next router. ``precision`` /
``recall`` of the predictions (against the experts the next block then used) are kept in
:attr:`Prefetcher.quality`. :func:`install_hints` feeds the same predictor's expectations of the
next steps to the cache (:meth:`ExpertCache.hint`, the ``"predictive"`` policy): a set of keys or
a score per key (:func:`moelab.offload.predictor.cache_hint`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.models.reference import reference_route
from moelab.models.view import ModelView, MoEBlockView, RoutingEvent
from moelab.offload.cache import ExpertCache
from moelab.offload.predictor import ExpertPredictor, cache_hint


@dataclass
class PredictionQuality:
    """Predicted experts vs the experts the next block used, summed over forwards."""

    predicted: int = 0
    used: int = 0
    correct: int = 0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else float("nan")

    @property
    def recall(self) -> float:
        return self.correct / self.used if self.used else float("nan")


class Prefetcher:
    """Prefetch for every MoE block but the last of ``view``, into ``cache``, predicted by the next
    router or by ``predictor``; :meth:`close` removes the hooks and shuts the worker thread down
    (waiting for a read in progress)."""

    def __init__(self, view: ModelView, cache: ExpertCache, predictor: ExpertPredictor | None = None) -> None:
        self.cache, self.predictor = cache, predictor
        self._next = {b.layer: nb for b, nb in zip(view.blocks, view.blocks[1:], strict=False)}
        self._pending: dict[int, list[int]] = {}  # layer whose experts are coming -> predicted ids
        self._expected: dict[int, set[int]] = {}  # layer -> what was predicted for it
        self.quality = PredictionQuality()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moelab-prefetch")
        self._handles = [b.register_routing_hook(self._predict) for b in view.blocks[:-1]]

    def _predict(self, event: RoutingEvent) -> None:
        nxt = self._next[event.block.layer]
        target = (nxt.layer, 0)
        with torch.no_grad():
            if self.predictor is not None and target in self.predictor.targets(event.block.layer):
                ids_TK = self.predictor.predict(event.block.layer, event.hidden_TH, target)
            else:
                _, ids_TK, _ = reference_route(nxt, event.hidden_TH)
        self._pending[event.block.layer] = ids_TK.unique().tolist()

    def after_fetch(self, block: MoEBlockView, expert_ids_n: Tensor) -> None:
        """Called by the provider once ``block``'s experts are in: score the prediction made for
        this block, then prefetch the next block's predicted experts."""
        want = self._expected.pop(block.layer, None)
        if want is not None:
            used = set(expert_ids_n.tolist())
            q = self.quality
            q.predicted += len(want)
            q.used += len(used)
            q.correct += len(want & used)
        ids = self._pending.pop(block.layer, None)
        if ids and self._pool is not None:
            nxt = self._next[block.layer].layer
            self._expected[nxt] = set(ids)
            self.cache.prefetch(nxt, ids, self._pool.submit)

    def close(self) -> None:
        for h in self._handles:
            if not h.removed:
                h.remove()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def install_hints(view: ModelView, cache: ExpertCache, predictor: ExpertPredictor) -> list:
    """Routing hooks (they only observe) that, at every MoE block, tell ``cache`` the
    :func:`~moelab.offload.predictor.cache_hint` from the block's input (the predicted keys, or
    their scores with ``predictor.config.hint == "scores"``); the handles."""

    def hook(event: RoutingEvent) -> None:
        cache.hint(cache_hint(predictor, event.block.layer, event.hidden_TH))

    return [b.register_routing_hook(hook) for b in view.blocks]
