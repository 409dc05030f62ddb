"""``offload_model``: a transformers model whose experts stay on disk, paged in through a cache.

Shape legend: n experts one block needs in one forward, r rows per expert of a parameter.

The model is built on the meta device from the checkpoint's config; every tensor except the
routed experts' is read from the safetensors files (renamed as transformers' loader does) and made
resident, the non-persistent buffers (rotary tables) are initialised as ``from_pretrained`` does,
and the experts' parameters stay on the meta device: no expert is ever materialised. moelab's
experts backend (:mod:`moelab.models.backend`) runs every MoE block with an
:class:`OffloadProvider` as its weights provider, which asks the :class:`~moelab.offload.cache.ExpertCache`
for the n experts a forward routes to and hands their rows to the family's
``ExpertsSpec.from_params`` — where every MoE layer's experts have one shape, the cache keeps them
in slot buffers (:class:`~moelab.offload.cache.SlotPool`) and the provider hands the buffers over
with each expert's slot (``SlotWeights``), so no forward copies its experts' rows. The outputs equal those of the resident model run through moelab's
backend bit for bit (same dtype, same kernels: on slot buffers one ``mm`` per expert, which is what
``grouped_mm`` computes per group): only where the weights come from changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import CheckpointError, MoelabError, UnsupportedModelError
from moelab.models.backend import ExpertWeights, SlotWeights, enable_experts_backend, spec_for
from moelab.models.checkpoint import load_meta_model
from moelab.models.view import ModelView, MoEBlockView
from moelab.offload.cache import CacheStats, ExpertCache
from moelab.offload.store import ExpertStore


class OffloadProvider:
    """Weights provider (``moelab.models.backend.WeightsProvider``) reading experts through a cache:
    ``provider(block, expert_ids_n) -> ExpertWeights`` of those n experts, in order."""

    def __init__(self, cache: ExpertCache, after_fetch: Any = None) -> None:
        self.cache = cache
        self.after_fetch = after_fetch  # after_fetch(block, expert_ids_n) once a block's experts are in

    def __call__(self, block: MoEBlockView, expert_ids_n: Tensor) -> ExpertWeights | SlotWeights:
        rows, slots = self.cache.fetch_slots(block.layer, expert_ids_n.tolist())
        if self.after_fetch is not None:
            self.after_fetch(block, expert_ids_n)
        if slots is not None:  # the experts run on the cache's slot buffers: nothing is copied
            return SlotWeights(spec_for(block).from_params(block, self.cache.pool.buffers), slots)
        return rows_to_weights(block, rows, block.router_weight.device)


def rows_to_weights(block: MoEBlockView, rows: list[dict[str, Tensor]], device: Any = None) -> ExpertWeights:
    """The :class:`ExpertWeights` of n experts from their rows (``ExpertStore.read``), in order,
    on ``device`` (default: where the rows are)."""
    spec = spec_for(block)
    tensors = {name: torch.cat([r[name] for r in rows]).to(device) for name in spec.params}
    return spec.from_params(block, tensors)


class OffloadedExperts:
    """What :func:`offload_model` returns beside the model: the store, the cache, the view.

    ``stats()`` -> :class:`~moelab.offload.cache.CacheStats` (hits, misses, bytes read, peak
    resident expert bytes, ...); ``prefetcher.quality``: the prefetch predictions' precision and
    recall. ``close()`` (or ``with``) stops the prefetch thread (waiting for a read in progress) and
    closes the files; the model still runs afterwards, reading without prefetch.
    """

    def __init__(self, store: ExpertStore, cache: ExpertCache, view: ModelView,
                 prefetcher: Any = None, handles: list | None = None, provider: Any = None) -> None:
        self.store, self.cache, self.view, self.prefetcher = store, cache, view, prefetcher
        self.provider = provider  # the experts backend's weights provider
        self.handles = handles or []  # routing hooks feeding the cache's hints

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def new_request(self) -> None:
        """Call before each new prompt: the ``"activation"`` policy keeps one activation matrix
        per request (see :mod:`moelab.analysis.cache_policy`); other policies ignore it."""
        self.cache.new_request()

    def close(self) -> None:
        for h in self.handles:
            if not h.removed:
                h.remove()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.store.close()

    def __enter__(self) -> OffloadedExperts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def min_budget_bytes(store: ExpertStore, view: ModelView) -> int:
    """The smallest budget :func:`offload_model` accepts: the largest layer's top-k experts."""
    return max(b.top_k * store.expert_bytes(b.layer) for b in view.blocks)


def offload_model(path: str | Path, budget: int | float | str = 0.25, policy: str = "lru", *,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  prefetch: bool = False, predictor: Any = None,
                  fiddler: Any = None) -> tuple[nn.Module, OffloadedExperts]:
    """Open the checkpoint at ``path`` with its experts offloaded: ``(model, experts)``.

    ``model`` is a normal transformers causal LM (call it, ``generate()`` with it); its non-expert
    weights are resident, its experts are read from the safetensors files by offset into a cache of
    ``budget`` (bytes, a fraction of all expert bytes, or ``"64MiB"``-style) under ``policy``
    (``"lru"``, ``"lfu"``, ``"lrfu"`` or ``"activation"``, see :mod:`moelab.analysis.cache_policy`).
    ``dtype``: default the config's (as ``from_pretrained``);
    ``device``: where the model runs (default CPU); ``prefetch``: read the next MoE layer's
    likely experts on a background thread (:mod:`moelab.offload.prefetch`); ``predictor``: a trained
    :class:`~moelab.offload.predictor.ExpertPredictor` (ExpertFlow) or the path of its file
    (:mod:`moelab.offload.predictor_file`, checked against this checkpoint), which then predicts the
    prefetched experts and, with ``policy="predictive"`` (which needs it), hints the cache;
    ``fiddler``: a :class:`~moelab.offload.fiddler.LatencyModel`: each missed expert is moved into
    the cache or run on the CPU copy of the experts, as it decides (:mod:`moelab.offload.fiddler`;
    ``experts.provider.stats`` counts the decisions). Not with ``prefetch``.

    Raises CheckpointError (a truncated file, a missing expert tensor, a config contradicting the
    weights), UnsupportedModelError, MoelabError (a budget below one layer's top-k experts, naming
    the minimum; an unknown policy).
    """
    from moelab.models.open import view_model

    path = Path(path)
    if fiddler is not None and prefetch:
        raise MoelabError("fiddler= and prefetch=True: choose one (Fiddler decides per missed expert "
                          "at the time it is needed)")
    if policy == "predictive" and predictor is None:
        raise MoelabError("policy 'predictive' needs predictor= (a trained "
                          "moelab.offload.predictor.ExpertPredictor)")
    model = load_meta_model(path, dtype=dtype)
    store = ExpertStore(path, model, view_model(model))
    try:
        _load_resident(model, store, device)
        view = view_model(model)  # again: the first view saw meta router weights
        if isinstance(predictor, (str, os.PathLike)):
            from moelab.offload.predictor_file import load_predictor

            predictor = load_predictor(predictor, view)
        cache = ExpertCache(store, budget, policy, min_bytes=min_budget_bytes(store, view),
                            device=device)
        from moelab.offload.prefetch import Prefetcher, install_hints

        prefetcher = Prefetcher(view, cache, predictor) if prefetch else None
        handles = install_hints(view, cache, predictor) if policy == "predictive" else []
        if fiddler is not None:
            from moelab.offload.fiddler import FiddlerProvider, HostExperts

            provider = FiddlerProvider(cache, HostExperts(store), fiddler)
            handles += provider.attach(view)
        else:
            provider = OffloadProvider(cache, prefetcher.after_fetch if prefetcher else None)
        enable_experts_backend(view, provider)
    except BaseException:
        store.close()
        raise
    _generation_config(model, path)
    return model.eval(), OffloadedExperts(store, cache, view, prefetcher, handles, provider)


@torch.no_grad()
def _load_resident(model: nn.Module, store: ExpertStore, device: Any) -> None:
    """Every non-expert tensor from the checkpoint, then tied weights and non-persistent buffers;
    UnsupportedModelError if anything but the experts is left on the meta device."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    for name, key in store.resident.items():
        mod_path, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_path)
        old = mod._parameters.get(attr, mod._buffers.get(attr))
        t = store.index.read(name)
        t = t.to(dev, old.dtype if t.is_floating_point() else t.dtype)
        if tuple(t.shape) != tuple(old.shape):
            raise CheckpointError(f"{store.path}: {name} is {list(t.shape)} but config.json implies "
                                  f"{list(old.shape)}")
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            mod._buffers[attr] = t
    model.tie_weights()
    _init_buffers(model, dev)
    experts = set(store.params)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_meta and n not in experts]
    if left:
        raise UnsupportedModelError(f"{store.path}: offload_model left {left[0]} on the meta device "
                                    f"(+{len(left) - 1} more); this model is not supported")


def _init_buffers(model: nn.Module, dev: torch.device) -> None:
    """Non-persistent buffers (rotary tables) as ``from_pretrained`` makes them: allocated, then
    transformers' ``initialize_weights`` with everything else marked initialised."""
    named = dict(model.named_non_persistent_buffers()) if hasattr(model, "named_non_persistent_buffers") else {}
    for t in (*model.parameters(), *model.buffers()):
        t._is_hf_initialized = True
    for key, buf in named.items():
        mod_path, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_path)
        mod._buffers[attr] = torch.empty_like(buf, device=dev)
    if named:
        for t in model.parameters():
            t._is_hf_initialized = True
        model.initialize_weights()


def _generation_config(model: nn.Module, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except Exception as err:
            raise CheckpointError(f"{path / 'generation_config.json'}: cannot be read: {err}") from err


__all__ = ["OffloadProvider", "OffloadedExperts", "min_budget_bytes", "offload_model", "rows_to_weights"]
