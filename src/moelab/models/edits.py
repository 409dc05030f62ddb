"""The routing seam of every MoE block: routing edits change what the router decided, routing hooks
observe it afterwards.

Shape legend: T tokens (batch x sequence, flattened), H hidden, E experts, K slots per token.

A *routing edit* is ``fn(block, hidden_TH, routing) -> routing`` (:class:`moelab.routing.Routing`):
it sees the family's own router logits (its dtype, with gradients), the chosen ids and combine
weights, and returns a routing for the experts to run with. Edits of a block compose in the order
they were registered; routing hooks then see the routing *after* every edit, so a steered model can
be traced. An edit that returns new ``logits_TE`` with the *same* ``ids_TK`` object asks for the
experts to be chosen again from those logits by the family's own rule (:func:`reselect`); an edit
may also call :func:`reselect` itself (e.g. with forced experts). Slots an edit switches off
(``mask_TK`` False) reach the family's experts with weight 0.

Where it attaches is family knowledge: each adapter's ``hook_installer(block, run)`` installs torch
hooks that build a ``Routing`` from the family's own call, hand it to ``run(hidden_TH, routing)`` (the
block's seam) and, when ``run`` returns a routing, pass that to the experts instead (see
``families/_common.py``).
The seam lives on the block module itself, so every view opened on the same model shares it; its
torch hooks are installed with the first edit or hook and removed with the last.

*Selection edits* skip the re-selection. An edit that only changes what the family's rule chooses
from (``experts_off``, SteerMoE's soft-off) or the weights of what it chose (RICE's
``scale_weights``) may carry ``edit.preselect(block, logits_TE) -> (edited_TE, offset_E)``
(``offset_E``: -inf for the experts it bars, else 0, or None where it bars none; see
:func:`moelab.models.rule.select_barred` for what it promises), ``edit.preselected(block, logits_TE,
routing)`` (told the unedited logits and the routing chosen, e.g. to count) and, optionally,
``edit.reweight(block, ids_TK, weights_TK) -> weights_TK`` (the weights the experts get). Where the adapter knows how its router computes its
logits (``experts_prehook_installer(router_logits=...)``) and such an edit is the block's first,
the router's own selection is replaced by the rule on the edited logits
(:func:`preselect_route`): one selection per call instead of the family's and then a second one.
The routing equals the re-selection's (the same rule on the same logits); elsewhere ``edit`` itself
runs as any edit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moelab.errors import MoelabError
from moelab.models.rule import select_barred, select_slots
from moelab.routing import Routing

if TYPE_CHECKING:
    from moelab.models.view import MoEBlockView, RoutingEvent

RoutingEdit = Callable[["MoEBlockView", Tensor, Routing], Routing]

_ATTR = "_moelab_routing_seam"


class Handle:
    """Undo for something installed on a model: ``remove()`` once (a second call is an error), or
    use it as a context manager."""

    def __init__(self, what: str, undo: Callable[[], None]) -> None:
        self.what, self._undo = what, undo

    @property
    def removed(self) -> bool:
        return self._undo is None

    def remove(self) -> None:
        if self._undo is None:
            raise MoelabError(f"{self.what}: this handle was already removed")
        undo, self._undo = self._undo, None
        undo()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._undo is not None:
            self.remove()


class _Seam:
    """Edits and hooks of one block module, and the torch hooks that run them."""

    def __init__(self) -> None:
        # tuples, replaced on every change, so a running seam never sees one change under it
        self.edits: tuple[tuple[MoEBlockView, RoutingEdit], ...] = ()
        self.hooks: tuple[tuple[MoEBlockView, Callable[[RoutingEvent], None]], ...] = ()
        self.installed: list = []
        self.block: MoEBlockView | None = None

    def add(self, kind: str, block: MoEBlockView, fn: Callable) -> Handle:
        if not callable(fn):
            raise MoelabError(f"{block.path}: a routing {kind} must be callable, got {type(fn).__name__}")
        if block.hook_installer is None:
            raise MoelabError(f"{block.path} ({block.family}): routing {kind}s are not available")
        entry = (block, fn)
        name = "edits" if kind == "edit" else "hooks"
        setattr(self, name, (*getattr(self, name), entry))
        if not self.installed:
            self.block = block
            self.installed = block.hook_installer(block, self)

        def undo() -> None:
            entries = list(getattr(self, name))
            entries.remove(entry)
            setattr(self, name, tuple(entries))
            if not self.edits and not self.hooks:
                for h in self.installed:
                    h.remove()
                self.installed = []

        return Handle(f"{block.path}: routing {kind}", undo)

    def __call__(self, hidden_TH: Tensor, routing: Routing, *preselected) -> Routing | None:
        return self.run(hidden_TH, routing, *preselected)

    def selection_edit(self) -> tuple[MoEBlockView, RoutingEdit] | None:
        """The first edit when it is a selection edit (has ``preselect``), else None."""
        edits = self.edits
        if edits and getattr(edits[0][1], "preselect", None) is not None:
            return edits[0]
        return None

    def run(self, hidden_TH: Tensor, routing: Routing,
            preselected: tuple[RoutingEdit, Routing] | None = None) -> Routing | None:
        """Apply the edits in order, show the result to the hooks; None when nothing was edited
        (or nothing after ``preselected``: the selection edit the router call already applied, and
        the routing it chose, whose ids and weights the experts already have)."""
        edited, edits, start = routing, self.edits, routing
        if preselected is not None:
            fn, start = preselected
            if edits and edits[0][1] is fn:  # else it was removed since the router call
                edits[0][1].preselected(edits[0][0], routing.logits_TE, start)
                edits = edits[1:]
            edited = start
        for block, fn in edits:  # a tuple: an edit removed while running does not shift it
            out = fn(block, hidden_TH, edited)
            if not isinstance(out, Routing):
                raise MoelabError(
                    f"{block.path}: a routing edit must return a moelab.routing.Routing, "
                    f"got {type(out).__name__}"
                )
            if out.logits_TE is not edited.logits_TE and out.ids_TK is edited.ids_TK:
                out = reselect(block, out)
            edited = out
        if self.hooks:
            from moelab.models.view import RoutingEvent

            for block, fn in self.hooks:
                fn(RoutingEvent.from_routing(block, hidden_TH, edited))
        return None if edited is start and (edited is routing or edited.mask_TK is None) else edited


def seam_of(block: MoEBlockView) -> _Seam:
    """The seam stored on the block's module (created on first use)."""
    seam = getattr(block.module, _ATTR, None)
    if seam is None:
        seam = _Seam()
        object.__setattr__(block.module, _ATTR, seam)  # a plain attribute, not a submodule
    return seam


def reselect(block: MoEBlockView, routing: Routing, forced_E: Tensor | None = None,
             barred_E: Tensor | None = None) -> Routing:
    """Choose the experts again from ``routing.logits_TE`` with the block's own rule
    (:func:`moelab.models.rule.select`); ``forced_E`` (bool ``[E]``) puts those experts first,
    ``barred_E`` keeps those out (their logits still count in the scores).

    Weights come back in the dtype of ``routing.weights_TK`` and stay differentiable in the logits.
    """
    if routing.logits_TE is None:
        raise MoelabError(f"{block.path}: re-selecting experts needs router logits")
    ids_TK, w_TK, mask_TK = select_slots(block, routing.logits_TE, forced_E, barred_E)
    if w_TK.dtype != routing.weights_TK.dtype:
        w_TK = w_TK.to(routing.weights_TK.dtype)
    return Routing(routing.logits_TE, ids_TK, w_TK, mask_TK, routing.aux)


def preselect_route(block: MoEBlockView, edit: RoutingEdit, logits_TE: Tensor,
                    weights_dtype: torch.dtype) -> Routing:
    """The routing a selection edit asks for: the block's rule on ``edit.preselect``'s logits with
    its barred experts (:func:`moelab.models.rule.select_barred`); weights in ``weights_dtype`` (the
    family's), then ``edit.reweight``'s where it has one; differentiable in the logits. Equal to
    ``edit``'s own re-selection (or reweighting)."""
    edited_TE, offset_E = edit.preselect(block, logits_TE)
    ids_TK, w_TK = select_barred(block, edited_TE, offset_E)
    w_TK = w_TK if w_TK.dtype == weights_dtype else w_TK.to(weights_dtype)
    reweight = getattr(edit, "reweight", None)
    return Routing(edited_TE, ids_TK, w_TK if reweight is None else reweight(block, ids_TK, w_TK))


def for_experts(routing: Routing, num_experts: int) -> tuple[Tensor, Tensor]:
    """``(ids_TK, weights_TK)`` a family's own experts can run: switched-off slots get weight 0 and,
    where their id is not a real expert, id 0 (their contribution is 0 either way)."""
    ids, w = routing.ids_TK, routing.weights_TK
    if routing.mask_TK is None:
        return ids, w
    bad = ~routing.mask_TK & ((ids < 0) | (ids >= num_experts))
    return ids.masked_fill(bad, 0), w.masked_fill(~routing.mask_TK, 0)


__all__ = ["Handle", "RoutingEdit", "for_experts", "preselect_route", "reselect", "seam_of"]
