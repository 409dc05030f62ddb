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
from typing import Any

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


__all__ = ["analysis_view"]
