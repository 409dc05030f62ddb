"""Out-of-core analysis: the model a stage works on, opened whole or with its experts offloaded.

``moelab trace``, the planners' calibration and the writing of a compressed checkpoint take an
``expert_budget``: with one, the checkpoint is opened with :func:`moelab.offload.offload_model`
(non-expert weights resident, experts read by offset into a cache of that many bytes), so a model
whose experts exceed memory is traced, calibrated and pruned; without one it is opened once, whole.
Either way the stage sees a :class:`moelab.models.ModelView` and runs the same code: routing hooks
and edits work on the offloaded model, expert statistics come from the experts backend's observers
(:func:`moelab.trace.collect.observe_experts`), and a plan's experts are read from the store
(:func:`moelab.compress.stream.store_expert`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.models.view import ModelView


@contextmanager
def analysis_view(model: Any, expert_budget: int | float | str | None = None,
                  policy: str = "lru") -> Iterator[tuple[ModelView, Any]]:
    """``(view, experts)`` of ``model`` (a checkpoint directory, a loaded model or a view) for the
    block: ``experts`` is the :class:`~moelab.offload.OffloadedExperts` of an offloaded checkpoint
    (closed on exit), or None when ``expert_budget`` is None and the model is opened whole.

    Raises MoelabError when a budget is given with a model already in memory (it can only be
    offloaded from its checkpoint), and what :func:`~moelab.offload.offload_model` raises."""
    if expert_budget is None:
        from moelab.trace.fingerprint import as_view

        yield as_view(model), None
        return
    if not isinstance(model, (str, os.PathLike)):
        raise MoelabError(f"expert_budget: offloading reads the experts from a checkpoint directory; "
                          f"got a {type(model).__name__} already in memory (pass its directory, or "
                          f"no budget)")
    from moelab.offload.model import offload_model

    _, experts = offload_model(model, budget=expert_budget, policy=policy)
    try:
        yield experts.view, experts
    finally:
        experts.close()


@torch.no_grad()
def load_by_offset(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The whole checkpoint at ``path`` as ``from_pretrained`` would load it, in one copy.

    ``from_pretrained`` maps the safetensors files and stacks per-expert tensors into new ones, so
    the mapped pages (still resident after loading, counted in RSS) and the stacked experts are two
    copies. Here every tensor is read by offset (:class:`~moelab.offload.ExpertStore`) straight into
    the parameter it becomes, one expert at a time: peak memory is the model plus one expert.
    Raises what :func:`~moelab.offload.offload_model` raises when opening (CheckpointError for a
    truncated file or a missing tensor, UnsupportedModelError for a layout the store cannot read).
    """
    from moelab.models.checkpoint import load_meta_model
    from moelab.models.open import view_model
    from moelab.offload.model import _generation_config, _load_resident
    from moelab.offload.store import ExpertStore

    model = load_meta_model(Path(path), dtype=dtype)
    store = ExpertStore(path, model, view_model(model))
    try:
        _load_resident(model, store, None)
        _load_experts(model, store)
    finally:
        store.close()
    _generation_config(model, Path(path))
    return model.eval()


def _load_experts(model: nn.Module, store: Any) -> None:
    """Allocate every expert parameter and fill it expert by expert (rows ``[e r, (e + 1) r)``)."""
    full = {}
    for key, p in store.params.items():
        full[key] = torch.empty(p.shape, dtype=p.dtype)
    for layer in store.layers:
        mine = {k: p for k, p in store.params.items() if p.layer == layer}
        for e in range(store.num_experts(layer)):
            rows = store.read(layer, e)
            for key, p in mine.items():
                r = p.shape[0] // p.num_experts
                full[key][e * r:(e + 1) * r].copy_(rows[p.name])
    for key, t in full.items():
        mod_path, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_path)
        mod._parameters[attr] = nn.Parameter(t, requires_grad=mod._parameters[attr].requires_grad)


__all__ = ["analysis_view", "load_by_offset"]
