"""The building blocks of routing edits: install a counting edit per layer (:func:`install_edit`,
:class:`EditHandle`), validate arguments (:func:`edit_view`, :func:`check_expert_ids`), and count
what an edit did cheaply enough for a decode step (:func:`tokens_choosing`, :func:`barred_chosen`,
with the deferred counts of selection edits). The stock edits of :mod:`moelab.steer.edits` and the
dynamic-count and test-time-routing modules are written with them.

Shape legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, open_model
from moelab.models.edits import Handle
from moelab.routing import Routing

# an edit body: (block, hidden_TH, routing) -> (routing, extra counts of this call)
EditBody = Callable[[MoEBlockView, Tensor, Routing], tuple[Routing, dict[str, int]]]


class EditHandle:
    """The stock edit installed on some layers; ``counts[layer]`` holds ``tokens``, ``affected`` and
    ``active`` (real slots after the edit) plus edit-specific counts, e.g. skip_below's
    ``candidates`` and ``skipped`` slots."""

    def __init__(self, what: str, layers: list[int]) -> None:
        self.what = what
        self._counts: dict[int, dict[str, int]] = {layer: {"tokens": 0, "affected": 0, "active": 0}
                                                   for layer in layers}
        self._handles: list[Handle] = []
        self._flush: list[Callable[[], None]] = []  # counting edits with deferred counts
        self._removed = False

    @property
    def counts(self) -> dict[int, dict[str, int]]:
        for flush in self._flush:
            flush()
        return self._counts

    def reset(self) -> None:
        """Zero every count (deferred ones included)."""
        for c in self.counts.values():
            for key in c:
                c[key] = 0

    def active_experts(self) -> dict[int, float]:
        """Average active routed experts per token in each edited layer (``active / tokens``)."""
        return {layer: c["active"] / c["tokens"] if c["tokens"] else float("nan")
                for layer, c in self.counts.items()}

    def remove(self) -> None:
        if self._removed:
            raise MoelabError(f"{self.what}: this handle was already removed")
        self._removed = True
        for h in self._handles:
            h.remove()

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._removed:
            self.remove()


def chosen_experts(routing: Routing, num_experts: int) -> Tensor:
    """``[T, E]`` bool: the experts each token's real slots go to."""
    ids = routing.ids_TK
    real = routing.real_mask()
    out = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.bool, device=ids.device)
    return out.scatter(-1, ids.masked_fill(~real, num_experts), True)[:, :num_experts]


def _affected(out: Routing, routing: Routing, num_experts: int) -> int:
    """Tokens whose set of real experts differs between two routings."""
    if out is routing:
        return 0
    if out.mask_TK is None and routing.mask_TK is None and out.ids_TK.shape == routing.ids_TK.shape:
        # the cheap path (a decode step calls this once per layer): compare the sorted ids
        a, b = out.ids_TK.sort(-1).values, routing.ids_TK.sort(-1).values
        return int((a != b).any(-1).sum())
    return int((chosen_experts(out, num_experts) != chosen_experts(routing, num_experts)).any(-1).sum())


def install_edit(view: ModelView, what: str, per_layer: Mapping[int, Any],
             make: Callable[[MoEBlockView, Any], EditBody]) -> EditHandle:
    """Validate every layer's argument (``make`` raises), then register one counting edit per layer.

    A body with a ``preselect(block, logits_TE) -> (edited_TE, offset_E, barred_E)`` attribute is a
    selection edit (see :mod:`moelab.models.edits`): its output
    must be the family's rule on those logits with the ``barred_E`` experts barred (``offset_E``: -inf
    there, else 0; every -inf edited logit among them), the tokens it ``affected`` those whose
    unedited selection chose a barred expert (see :func:`barred_chosen`). It may also carry
    ``reweight(block, ids_TK, w_TK) -> w_TK`` (the weights the experts get; ``offset_E`` None: it
    bars nothing) and its own ``affected(block, routing) -> int`` count.
    """
    bodies = {layer: make(_block(view, layer, what), value) for layer, value in per_layer.items()}
    handle = EditHandle(what, list(bodies))
    for layer, body in bodies.items():
        edit = _CountingEdit(body, handle._counts[layer])
        handle._flush.append(edit.flush)
        handle._handles.append(view.block(layer).register_routing_edit(edit))
    return handle


# a selection edit's ``affected`` count of calls of at most this many tokens (decode steps) is made
# in one batch of up to _DEFER_CALLS calls, or when ``counts`` is read: ~10 small ops per call
# otherwise cost ~2 % of a decode step
_DEFER_TOKENS, _DEFER_CALLS = 16, 64


class _CountingEdit:
    """An edit body, counting into ``counts`` what it did; a selection edit where the body is one
    (with the body's ``reweight`` and its own ``affected(block, routing) -> int`` count, if any)."""

    def __init__(self, body: EditBody, counts: dict[str, int]) -> None:
        self.body, self.counts = body, counts
        self._barred_E: Tensor | None = None  # of the last preselect call, for its count
        self._pending: list[tuple[MoEBlockView, Tensor, Tensor, Tensor]] = []  # (block, logits, ids, barred)
        if getattr(body, "preselect", None) is None:
            self.preselect = self.preselected = None
        self.reweight = getattr(body, "reweight", None)
        self._own_affected = getattr(body, "affected", None)  # (block, routing) -> int, or None

    def __call__(self, block: MoEBlockView, hidden_TH: Tensor, routing: Routing) -> Routing:
        out, extra = self.body(block, hidden_TH, routing)
        if "affected" not in extra:  # tokens whose set of experts changed
            extra["affected"] = _affected(out, routing, block.num_experts)
        self._count(routing, out, extra)
        return out

    def preselect(self, block: MoEBlockView, logits_TE: Tensor) -> tuple[Tensor, Tensor | None]:
        edited_TE, offset_E, self._barred_E = self.body.preselect(block, logits_TE)
        return edited_TE, offset_E

    def preselected(self, block: MoEBlockView, logits_TE: Tensor, out: Routing) -> None:
        """Count a call whose router already chose ``out`` with this edit's selection (``affected``
        of a few-token call deferred to :meth:`flush`)."""
        if out.ids_TK.shape[0] > _DEFER_TOKENS or out.mask_TK is not None:
            self._count(out, out, {"affected": self._affected_of(block, logits_TE, out, self._barred_E)})
            return
        self._count(out, out, {})
        self._pending.append((block, logits_TE.detach(), out.ids_TK, self._barred_E))
        if len(self._pending) >= _DEFER_CALLS:
            self.flush()

    def _affected_of(self, block: MoEBlockView, logits_TE: Tensor | None, out: Routing,
                     barred_E: Tensor | None) -> int:
        if self._own_affected is not None:
            return self._own_affected(block, out)
        return barred_chosen(block, logits_TE, out, barred_E)

    def flush(self) -> None:
        """Add the deferred calls' ``affected`` (one count over all their tokens where they share
        the barred experts, as calls of one edit on one device and dtype do)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        block, barred_E = pending[0][0], pending[0][3]
        if all(p[3] is barred_E for p in pending):
            ids_TK = torch.cat([p[2] for p in pending])
            joined = Routing(None, ids_TK, ids_TK)  # the counts read the ids (and no mask)
            logits_TE = None if self._own_affected is not None else torch.cat([p[1] for p in pending])
            self.counts["affected"] += self._affected_of(block, logits_TE, joined, barred_E)
            return
        for blk, logits_TE, ids_TK, barred in pending:
            self.counts["affected"] += self._affected_of(blk, logits_TE, Routing(None, ids_TK, ids_TK), barred)

    def _count(self, routing: Routing, out: Routing, extra: dict[str, int]) -> None:
        counts = self.counts
        counts["tokens"] += routing.ids_TK.shape[0]
        counts["active"] += out.ids_TK.numel() if out.mask_TK is None else int(out.mask_TK.sum())
        for key, n in extra.items():
            counts[key] = counts.get(key, 0) + n


def plain_selection(block: MoEBlockView) -> bool:
    """True when the rule's selection is one top-k of one key (no group-limited routing, no
    SparseMixer rounds): what :func:`moelab.models.rule.select_barred` needs of a selection edit."""
    return not (block.n_group is not None and block.n_group > 1) and block.scoring != "sparsemixer"


def selection_counts_exact(block: MoEBlockView) -> bool:
    """True when barring experts keeps the rule's order of every other expert (per-expert sigmoid
    scores, or a softmax without a correction bias) and nothing else changes the selection
    (:func:`plain_selection`): then :func:`barred_chosen` counts exactly."""
    return plain_selection(block) and (block.scoring == "sigmoid" or block.correction_bias is None)


def barred_chosen(block: MoEBlockView, logits_TE: Tensor, out: Routing, barred_E: Tensor) -> int:
    """How many tokens' unedited selection would have chosen a ``barred_E`` expert, given the
    selection ``out`` made without them: where :func:`selection_counts_exact`, the tokens whose best
    barred expert ranks above the worst one ``out`` chose, by the rule's key on the unedited logits
    (the logits themselves where no correction bias is added; softmax and sigmoid keep their order).

    A selection edit's ``affected`` count without the unedited selection (a second top-k)."""
    key_TE = logits_TE.detach()
    if block.correction_bias is not None:  # sigmoid scores (selection_counts_exact)
        key_TE = key_TE.to(torch.promote_types(key_TE.dtype, torch.float32))
        key_TE = torch.sigmoid(key_TE) + block.correction_bias.to(key_TE.dtype)
    chosen_TK = key_TE.gather(-1, out.ids_TK)
    if out.mask_TK is not None:
        chosen_TK = chosen_TK.masked_fill(~out.mask_TK, math.inf)
    high_T = torch.where(barred_E, key_TE, -math.inf).amax(-1)
    return int((high_T > chosen_TK.amin(-1)).sum())


def edit_view(model: ModelView | MoEBlockView | nn.Module) -> ModelView:
    """The view to edit; a single block view stands for a model of that one block."""
    if isinstance(model, MoEBlockView):
        return ModelView(model=model.module, config=None, family=model.family, blocks=[model],
                         dense_layers=[], num_layers=model.layer + 1)
    return model if isinstance(model, ModelView) else open_model(model)


def _block(view: ModelView, layer: Any, what: str) -> MoEBlockView:
    moe_layers = [b.layer for b in view.blocks]
    if not isinstance(layer, int) or layer not in moe_layers:
        raise MoelabError(f"{what}: layer {layer!r} is not an MoE layer (MoE layers: {moe_layers})")
    return view.block(layer)


def check_expert_ids(block: MoEBlockView, experts: Iterable[Any], what: str) -> list[int]:
    out = list(experts) if not isinstance(experts, (int, str)) else [experts]
    for e in out:
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < block.num_experts:
            raise MoelabError(
                f"{what}: layer {block.layer}: expert {e!r} is not an expert id in [0, {block.num_experts})"
            )
    if len(set(out)) != len(out):
        raise MoelabError(f"{what}: layer {block.layer}: expert ids repeat: {out}")
    return out


def expert_flags(block: MoEBlockView, experts: list[int], like: Tensor) -> Tensor:
    flags = torch.zeros(block.num_experts, dtype=torch.bool, device=like.device)
    flags[experts] = True
    return flags


def off_constants(block: MoEBlockView, off: list[int], like: Tensor, consts: dict) -> tuple[Tensor, Tensor]:
    """``(off_E bool, offset_E: -inf where off, else 0)`` for logits like ``like``, stored in
    ``consts`` under their device and dtype (an edit makes them once)."""
    off_E = expert_flags(block, off, like)
    offset_E = torch.zeros(block.num_experts, dtype=like.dtype, device=like.device).masked_fill(off_E, -math.inf)
    consts[(like.device, like.dtype)] = off_E, offset_E
    return off_E, offset_E


def tokens_choosing(flags_E: Tensor, routing: Routing, num_experts: int) -> int:
    """How many tokens' real slots chose one of the experts ``flags_E`` (bool ``[E]``) marks; three
    small ops when none did (a decode step's common case)."""
    ids_TK = routing.ids_TK if routing.mask_TK is None else routing.ids_TK.clamp(0, num_experts - 1)
    chose_TK = flags_E.take(ids_TK)
    if routing.mask_TK is not None:
        chose_TK = chose_TK & routing.mask_TK
    if not bool(chose_TK.any()):
        return 0
    return 1 if chose_TK.shape[0] == 1 else int(chose_TK.any(-1).sum())


def weights_ignore_unchosen(block: MoEBlockView) -> bool:
    """True when removing experts no token chose leaves every token's ids and weights as they are:
    per-expert sigmoid scores, or a softmax renormalised over the chosen experts (its denominator
    cancels; not under a norm clamp), without group-limited selection (a group's score can change)."""
    if block.n_group is not None and block.n_group > 1:
        return False
    if block.scoring == "sigmoid":
        return True
    return block.scoring == "softmax" and block.norm_topk_prob and block.norm_min == 0


__all__ = ["EditBody", "EditHandle", "barred_chosen", "check_expert_ids", "chosen_experts", "edit_view",
           "expert_flags", "install_edit", "off_constants", "plain_selection", "selection_counts_exact",
           "tokens_choosing", "weights_ignore_unchosen"]
