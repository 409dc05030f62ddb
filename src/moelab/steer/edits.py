"""Stock routing edits: switch experts off or on, offset router logits, scale combine weights, skip
weak slots. Each works on every supported family through ``block.register_routing_edit``.

Shape legend: T tokens, E experts, K slots per token.

    experts_off(view, {layer: [e, ...]})      the experts receive no token: the family's routing
                                             proceeds as if their logits were -inf
    experts_on(view, {layer: [e, ...]})       forced into every token's top-k (at most top-k)
    logit_offsets(view, {layer: offset_E})    logits + offset_E, experts re-chosen by the family's
                                             rule; offset_E may require grad
    scale_weights(view, {layer: {e: f}})      w_tk *= f[ids_tk] (RICE-style reinforcement; no
                                             renormalisation)
    route_to_rank(view, {layer: r})           every token goes to one expert, the r-th the family's
                                             rule prefers (from 0), weighted as the rule weights a
                                             top-1 choice (SCMoE's weak pass)
    skip_below(view, {layer: beta})           NAEE dynamic skipping (Lu et al. 2024, section 3.2):
                                             a non-first slot is switched off when w_k < beta * w_1;
                                             with ``renormalize`` the kept weights are rescaled to
                                             the token's original total

The building blocks other steering modules use to write their own edits: :func:`install_edit`
(validate every layer's argument, then register one counting edit per layer), :func:`edit_view`,
:func:`check_expert_ids`, :func:`expert_flags`, :func:`chosen_experts`.

Each returns an :class:`EditHandle`: ``remove()`` (once) or a ``with`` block, and ``counts``: per
layer the tokens seen, the tokens ``affected``: whose set of experts the edit changed
(``scale_weights``: routed to a scaled expert), and the ``active`` real slots after the edit
(``active_experts()``: their average per token). ``weak_slots`` / ``drop_slots`` are the pieces of
``skip_below`` that the dynamic expert-count edits (``moelab.steer.mcmoe``, ``topp``, ``topany``)
build on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, open_model
from moelab.models.edits import Handle, reselect
from moelab.models.rule import selection_order, single_expert
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
    unedited selection chose a barred expert (see :func:`barred_chosen`).
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
        own = getattr(self.body, "affected", None)
        return own(block, out) if own is not None else barred_chosen(block, logits_TE, out, barred_E)

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
            logits_TE = None if hasattr(self.body, "affected") else torch.cat([p[1] for p in pending])
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


def experts_off(model: ModelView | nn.Module, experts: Mapping[int, Iterable[int]]) -> EditHandle:
    """Switch experts off: ``{layer: [expert, ...]}``; routing proceeds as if their logits were -inf."""
    view = edit_view(model)

    def make(block: MoEBlockView, value) -> EditBody:
        off = check_expert_ids(block, value, "experts_off")
        if block.num_experts - len(off) < block.top_k:
            raise MoelabError(
                f"experts_off: layer {block.layer}: switching off {len(off)} of {block.num_experts} "
                f"experts leaves fewer than top_k={block.top_k}"
            )

        unchanged_if_unchosen = weights_ignore_unchosen(block)
        consts: dict = {}  # per (device, dtype) of the logits: (off_E bool, offset_E: -inf where off)

        def body(block, hidden_TH, routing):
            logits = routing.logits_TE
            off_E, offset_E = consts.get((logits.device, logits.dtype)) or off_constants(block, off, logits, consts)
            extra = {}
            if unchanged_if_unchosen:
                # NOTE: the fast path of a decode step: where the family's weights ignore unchosen
                # logits, exactly the tokens that chose a switched-off expert change, so a step where
                # none did keeps its routing (and the count needs no comparison)
                extra["affected"] = tokens_choosing(off_E, routing, block.num_experts)
                if extra["affected"] == 0:
                    return routing, extra
            # logits + offset_E is logits.masked_fill(off_E, -inf) for finite logits, in one cheap op
            return reselect(block, routing.replace(logits_TE=logits + offset_E)), extra

        def preselect(block, logits):  # the rule on logits + offset_E: the same routing as body's
            off_E, offset_E = consts.get((logits.device, logits.dtype)) or off_constants(block, off, logits, consts)
            return logits + offset_E, offset_E, off_E

        if selection_counts_exact(block):
            body.preselect = preselect
        return body

    return install_edit(view, "experts_off", experts, make)


def experts_on(model: ModelView | nn.Module, experts: Mapping[int, Iterable[int]]) -> EditHandle:
    """Force experts into every token's top-k: ``{layer: [expert, ...]}``, at most top-k per layer."""
    view = edit_view(model)

    def make(block: MoEBlockView, value) -> EditBody:
        on = check_expert_ids(block, value, "experts_on")
        if len(on) > block.top_k:
            raise MoelabError(
                f"experts_on: layer {block.layer}: {len(on)} experts forced but a token has only "
                f"top_k={block.top_k} slots"
            )

        def body(block, hidden_TH, routing):
            return reselect(block, routing, forced_E=expert_flags(block, on, routing.ids_TK)), {}

        return body

    return install_edit(view, "experts_on", experts, make)


def logit_offsets(model: ModelView | nn.Module, offsets: Mapping[int, Tensor]) -> EditHandle:
    """Add ``offset_E`` to the router logits of each layer; the experts are re-chosen by the family's
    rule. Offsets may require grad (test-time routing optimises them)."""
    view = edit_view(model)

    def make(block: MoEBlockView, offset) -> EditBody:
        if not isinstance(offset, Tensor) or offset.shape != (block.num_experts,):
            got = tuple(offset.shape) if isinstance(offset, Tensor) else type(offset).__name__
            raise MoelabError(
                f"logit_offsets: layer {block.layer}: expected a tensor of shape [E={block.num_experts}], "
                f"got {got}"
            )
        if not offset.is_floating_point() or not bool(torch.isfinite(offset.detach()).all()):
            raise MoelabError(f"logit_offsets: layer {block.layer}: offsets must be finite floats")

        def body(block, hidden_TH, routing):
            logits = routing.logits_TE
            shifted = logits + offset.to(device=logits.device, dtype=logits.dtype)
            return reselect(block, routing.replace(logits_TE=shifted)), {}

        return body

    return install_edit(view, "logit_offsets", offsets, make)


def scale_weights(model: ModelView | MoEBlockView | nn.Module,
                  factors: Mapping[int, Mapping[int, float]]) -> EditHandle:
    """Multiply experts' combine weights: ``{layer: {expert: factor}}`` (RICE reinforcement).

    As a block's first edit where the family's selection is one top-k (:func:`plain_selection`) and
    its adapter knows the router's logits, the router's selection is stood in for by the family's
    rule (:mod:`moelab.models.edits`) and the weights are scaled there: the same experts and
    weights as the family's up to its float32 routing's rounding, in the rule's slot order."""
    view = edit_view(model)

    def make(block: MoEBlockView, value) -> EditBody:
        if not isinstance(value, Mapping):
            raise MoelabError(
                f"scale_weights: layer {block.layer}: expected {{expert: factor}}, got {type(value).__name__}"
            )
        check_expert_ids(block, list(value), "scale_weights")
        for e, f in value.items():
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
                raise MoelabError(f"scale_weights: layer {block.layer}: factor of expert {e} is {f!r}, "
                                  "expected a finite number")
        scale = torch.ones(block.num_experts, dtype=torch.float64)
        for e, f in value.items():
            scale[e] = float(f)
        scales: dict = {}  # scale_E per (device, dtype) of the weights, made once
        flags: dict = {}  # scaled_E (bool) per device

        def scale_E(w: Tensor) -> Tensor:
            got = scales.get((w.device, w.dtype))
            if got is None:
                got = scales[(w.device, w.dtype)] = scale.to(device=w.device, dtype=w.dtype)
            return got

        def scaled_E(ids: Tensor) -> Tensor:
            got = flags.get(ids.device)
            if got is None:
                got = flags[ids.device] = (scale != 1).to(ids.device)
            return got

        def body(block, hidden_TH, routing):
            w = routing.weights_TK
            ids_TK = routing.ids_TK if routing.mask_TK is None else routing.ids_TK.clamp(0, block.num_experts - 1)
            # a switched-off slot's weight is 0, so scaling it is harmless
            return routing.replace(weights_TK=w * scale_E(w).take(ids_TK)), \
                {"affected": tokens_choosing(scaled_E(ids_TK), routing, block.num_experts)}

        if plain_selection(block):
            # a selection edit that bars nothing: the router's selection is stood in for by the
            # family's rule and the weights are scaled there (``reweight``), so the experts' pre-hook
            # has no edited routing to hand over (moelab.models.edits)
            body.preselect = lambda block, logits: (logits, None, None)
            body.reweight = lambda block, ids_TK, w_TK: w_TK * scale_E(w_TK).take(ids_TK)  # every slot real
            body.affected = lambda block, out: tokens_choosing(scaled_E(out.ids_TK), out, block.num_experts)
        return body

    return install_edit(view, "scale_weights", factors, make)


def skip_below(model: ModelView | nn.Module, beta: Mapping[int, float],
               renormalize: bool = True) -> EditHandle:
    """NAEE dynamic skipping: ``{layer: beta}``; counts add ``candidates`` (non-first slots) and
    ``skipped`` slots, so ``skipped / candidates`` is the paper's skip rate."""
    view = edit_view(model)

    def make(block: MoEBlockView, b) -> EditBody:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1:
            raise MoelabError(f"skip_below: layer {block.layer}: beta must be a number in [0, 1], got {b!r}")
        return lambda block, hidden_TH, routing: _skip(routing, float(b), renormalize)

    return install_edit(view, "skip_below", beta, make)


def _skip(r: Routing, beta: float, renormalize: bool) -> tuple[Routing, dict[str, int]]:
    weak_TK, candidates_TK = weak_slots(r, beta)
    extra = {"candidates": int(candidates_TK.sum()), "skipped": int(weak_TK.sum())}
    return drop_slots(r, r.real_mask() & ~weak_TK, renormalize), extra


def weak_slots(r: Routing, beta: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(weak_TK, candidates_TK)``: the non-first real slots (``candidates``; the first is the
    token's largest weight) and those among them with ``w_k < beta * w_1`` (``beta`` a number or
    a ``[T, 1]`` tensor)."""
    real_TK = r.real_mask()
    masked_TK = r.weights_TK.detach().float().masked_fill(~real_TK, -math.inf)
    first_TK = torch.zeros_like(real_TK).scatter(1, masked_TK.argmax(-1, keepdim=True), True)
    candidates_TK = real_TK & ~first_TK
    return candidates_TK & (masked_TK < beta * masked_TK.max(-1, keepdim=True).values), candidates_TK


def drop_slots(r: Routing, keep_TK: Tensor, renormalize: bool, total_T1: Tensor | None = None) -> Routing:
    """Switch off the real slots where ``keep_TK`` is False; ``r`` itself when none is dropped.

    With ``renormalize`` the kept weights are rescaled to the token's original total
    (``w_k * sum_j w_j / sum_kept w_j``; ``total_T1`` overrides ``sum_j w_j``): for a family that
    renormalises its top-k weights (L1) this is its own renormalisation over the kept experts.
    """
    real_TK = r.real_mask()
    keep_TK = keep_TK & real_TK
    if total_T1 is None and bool((keep_TK == real_TK).all()):
        return r
    w_TK = r.weights_TK
    new_TK = w_TK.masked_fill(~keep_TK, 0)
    if renormalize:
        if total_T1 is None:
            total_T1 = w_TK.masked_fill(~real_TK, 0).sum(-1, keepdim=True)
        new_TK = new_TK * (total_T1 / new_TK.sum(-1, keepdim=True))
    return r.replace(weights_TK=new_TK, mask_TK=keep_TK)


def route_to_rank(model: ModelView | nn.Module, ranks: Mapping[int, int]) -> EditHandle:
    """Top-1 routing to each token's rank-r expert: ``{layer: r}`` (r = 0 is the rule's first choice).

    The token's slot 0 holds that expert with the weight the family's rule gives a lone choice
    (:func:`moelab.models.rule.single_expert`); its other slots are switched off. A token for which
    the rule cannot choose a rank-r expert (outside its groups, or a ``-inf`` logit) is an error.
    """
    view = edit_view(model)

    def make(block: MoEBlockView, r) -> EditBody:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < block.num_experts:
            raise MoelabError(f"route_to_rank: layer {block.layer}: rank must be an int in "
                              f"[0, {block.num_experts}) (the layer has {block.num_experts} experts), got {r!r}")

        def body(block, hidden_TH, routing):
            if routing.logits_TE is None:
                raise MoelabError(f"route_to_rank: {block.path}: the family gives no router logits")
            order_TE, ok_TE = selection_order(block, routing.logits_TE)
            if not bool(ok_TE[:, r].all()):
                raise MoelabError(f"route_to_rank: layer {block.layer}: rank {r} is outside what the "
                                  "routing rule can choose for some tokens (group-limited or -inf logits)")
            ids_TK = routing.ids_TK.clone()
            ids_TK[:, 0] = order_TE[:, r]
            logits = routing.logits_TE
            w_T = single_expert(block, logits.to(torch.promote_types(logits.dtype, torch.float32)), ids_TK[:, 0])
            w_TK = torch.zeros_like(routing.weights_TK)
            w_TK[:, 0] = w_T.to(w_TK.dtype)
            mask_TK = torch.zeros_like(ids_TK, dtype=torch.bool)
            mask_TK[:, 0] = True
            return routing.replace(ids_TK=ids_TK, weights_TK=w_TK, mask_TK=mask_TK), {}

        return body

    return install_edit(view, "route_to_rank", ranks, make)


__all__ = ["EditBody", "EditHandle", "check_expert_ids", "chosen_experts", "drop_slots", "edit_view",
           "expert_flags", "experts_off", "experts_on", "install_edit", "logit_offsets", "off_constants",
           "route_to_rank",
           "barred_chosen", "plain_selection", "scale_weights", "selection_counts_exact", "skip_below", "tokens_choosing",
           "weak_slots", "weights_ignore_unchosen"]
