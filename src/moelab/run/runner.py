"""The one way to run a model over batches for measurement: eval mode, no grad, hooks, state restored.

Every stage that forwards token batches to read something off the model (routing, block inputs,
logits) does it through :func:`evaluating` / :func:`run_batches`, so each gets the same guarantees:
the model is in eval mode during the pass, gradients are off, and on exit (also on error) the hooks
given are removed and the model's train/eval state is what it was before.

Shape legend: B sequences per batch, S tokens per sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class Removable(Protocol):
    """A hook handle: torch's ``RemovableHandle`` or moelab's ``RoutingHookHandle``."""

    def remove(self) -> None: ...


@contextmanager
def evaluating(model: nn.Module, handles: Sequence[Removable] = ()) -> Iterator[None]:
    """Run the block with ``model`` in eval mode and gradients off.

    On exit, also on error, every handle in ``handles`` (hooks the caller registered for this pass)
    is removed and the model's train/eval state is restored.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def run_batches(model: nn.Module, batches: Iterable[Tensor], *, handles: Sequence[Removable] = (),
                on_output: Callable[[Tensor, Any], None] | None = None, **forward_kwargs: Any) -> None:
    """Forward every batch ``ids_BS`` (token ids, moved to the model's device) under :func:`evaluating`.

    Args:
        handles: hooks registered for this pass; removed when it ends, also on error.
        on_output: called as ``on_output(ids_BS, output)`` after each forward (``ids_BS`` on the
            model's device).
        forward_kwargs: passed to every forward besides ``input_ids`` (e.g. ``use_cache=False``).
    """
    with evaluating(model, handles):
        device = next(model.parameters()).device
        for ids_BS in batches:
            ids_BS = ids_BS.to(device)
            out = model(input_ids=ids_BS, **forward_kwargs)
            if on_output is not None:
                on_output(ids_BS, out)
