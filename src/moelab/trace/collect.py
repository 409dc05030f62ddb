"""What the routing hooks record per MoE block, and the per-expert statistics they compute.

Shape legend: T tokens of a batch (flattened batch x sequence), H hidden, E experts, K top-k,
I expert width.

A :class:`Collector` installs one routing hook per block of a :class:`moelab.models.ModelView`
(through ``block.register_routing_hook``, so family quirks stay in the view), keeps what each hook saw
during one forward, and hands it out per layer as numpy arrays. It never changes the model's
computation; :meth:`Collector.remove` takes every hook off again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from moelab.errors import TraceError
from moelab.models.reference import expert_activations, expert_down, expert_input
from moelab.trace.schema import column


def norm32(x: Tensor) -> Tensor:
    """L2 norm over the last dim as float32, accumulated in at least float32 (float64 stays float64)."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32 if low else None).float()


def expert_stats(block: Any, hidden_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor,
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Per chosen (token, slot): ``||expert(x)||_2``, ``max|down input|``, ``max|down output|``.

    Each ``[T, K]`` float32; slots with id -1 hold 0. The expert runs in the hidden state's dtype on
    the input it received: ``x`` (``combine='output'``) or ``weight * x`` (``combine='input'``, Llama4).
    The output norm is before the routing weight is applied.
    """
    if block.gate is None or block.up is None or block.down is None:
        raise TraceError(f"{block.path}: the model view exposes no expert weights; expert norms and "
                         "activation maxima need them")
    norm_TK, in_TK, out_TK = (torch.zeros(ids_TK.shape, dtype=torch.float32) for _ in range(3))
    x_TH = hidden_TH.reshape(-1, hidden_TH.shape[-1])
    for e in torch.unique(ids_TK[ids_TK >= 0]).tolist():
        tok, slot = torch.where(ids_TK == e)
        x_NH = expert_input(block, x_TH[tok], weights_TK[tok, slot])
        h_NI = expert_activations(block, e, x_NH, x_NH.dtype)
        y_NH = expert_down(block, e, h_NI)
        in_TK[tok, slot] = h_NI.abs().amax(-1).float().cpu()
        out_TK[tok, slot] = y_NH.abs().amax(-1).float().cpu()
        norm_TK[tok, slot] = norm32(y_NH).cpu()
    return norm_TK, in_TK, out_TK


class _BackendOff:
    """A handle whose ``remove()`` turns moelab's experts backend off again on ``view``."""

    def __init__(self, view: Any) -> None:
        self.view: Any = view

    def remove(self) -> None:
        if self.view is not None:
            from moelab.models.backend import disable_experts_backend

            view, self.view = self.view, None
            disable_experts_backend(view)


def observe_experts(view: Any, fn: Any) -> list[Any]:
    """Call ``fn(stats)`` with every block's :class:`moelab.models.backend.ExpertStats` (per-slot
    expert output norms and activation maxima, computed inside the experts' forward).

    The blocks run through moelab's experts backend (equal to eager): where it is off it is turned
    on with the model's own parameters; where it is on (e.g. an offloaded model's, with its weights
    provider) it is kept as it is. Returns handles; removing them all takes the observers off and
    turns off a backend this call turned on."""
    from moelab.models.backend import enable_experts_backend, experts_backend

    handles: list[Any] = []
    off = None
    if any(experts_backend(b) is None for b in view.blocks):
        enable_experts_backend(view)
        off = _BackendOff(view)
    try:
        for b in view.blocks:
            handles.append(experts_backend(b).add_observer(fn))
    except BaseException:
        for h in (*handles, *([off] if off else [])):
            h.remove()
        raise
    return handles + ([off] if off else [])  # the backend goes off after its observers


class Collector:
    """Routing hooks on every block of a view, collecting one forward's worth of fields per layer.

    ``fields``: the optional fields to compute (``logits``, ``expert_norms``, ``act_max``,
    ``hidden_norm``); ids and weights are always kept. ``weights_dtype``: ``float32`` or ``float16``.

    Expert norms and activation maxima come from inside the experts' own forward
    (:func:`observe_experts`), so the chosen experts are not run a second time and an offloaded
    model's experts are never needed outside its cache. :func:`expert_stats` is the slow reference.
    """

    def __init__(self, view: Any, fields: tuple[str, ...], weights_dtype: str):
        self.fields = fields
        self.wdtype = torch.float32 if weights_dtype == "float32" else torch.float16
        self.blocks = list(view.blocks)
        self._seen: dict[int, dict[str, Tensor]] = {}
        self._slots: dict[int, Any] = {}  # layer -> the backend's ExpertStats of this forward
        self._handles: list[Any] = []
        try:
            if "expert_norms" in fields or "act_max" in fields:
                self._observe_experts(view)
            for block in self.blocks:
                self._handles.append(block.register_routing_hook(self._hook_for(block)))
        except BaseException:
            self.remove()
            raise

    def _observe_experts(self, view: Any) -> None:
        def keep(st: Any) -> None:
            self._slots[st.block.layer] = st

        self._handles += observe_experts(view, keep)

    def remove(self) -> None:
        """Take every hook off the model (safe to call twice)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook_for(self, block: Any):
        def hook(event: Any) -> None:
            if block.layer in self._seen:
                raise TraceError(f"{block.path}: the routing hook fired twice in one forward")
            self._seen[block.layer] = self._fields_of(block, event)

        return hook

    @torch.no_grad()
    def _fields_of(self, block: Any, event: Any) -> dict[str, Tensor]:
        ids_TK = event.routing.masked_ids()  # a slot a routing edit switched off is written as -1
        i = block.layer
        out = {column("ids", i): ids_TK.to(torch.int16).cpu(),
               column("weights", i): event.weights_TK.to(self.wdtype).cpu()}
        if "logits" in self.fields:
            if event.logits_TE is None:
                raise TraceError(f"{block.path}: the {block.family} family does not expose router "
                                 "logits; record without --logits")
            out[column("logits", i)] = event.logits_TE.to(torch.float16).cpu()
        if "hidden_norm" in self.fields:
            out[column("hidden_norm", i)] = norm32(event.hidden_TH).reshape(-1).cpu()
        return out

    def _expert_fields(self, block: Any, ids_TK: Tensor) -> dict[str, Tensor]:
        """The backend's per-slot statistics of this forward, in the routing event's slot order."""
        st = self._slots.pop(block.layer, None)
        if st is None:
            raise TraceError(f"{block.path}: the experts backend did not report this forward")
        norm, act_in, act_out = slot_stats(st, ids_TK.long(), block.num_experts)
        i, out = block.layer, {}
        if "expert_norms" in self.fields:
            out[column("expert_norm", i)] = norm
        if "act_max" in self.fields:
            out[column("act_in_max", i)] = act_in
            out[column("act_out_max", i)] = act_out
        return out

    def take(self, num_tokens: int) -> dict[str, np.ndarray]:
        """The columns of the last forward (``num_tokens`` rows each) as numpy; clears them."""
        seen, self._seen = self._seen, {}
        missing = [b.path for b in self.blocks if b.layer not in seen]
        if missing:
            raise TraceError(f"the routing hooks of {missing} did not fire during the forward")
        if "expert_norms" in self.fields or "act_max" in self.fields:
            for b in self.blocks:
                seen[b.layer].update(self._expert_fields(b, seen[b.layer][column("ids", b.layer)]))
        cols: dict[str, np.ndarray] = {}
        for layer_cols in seen.values():
            for name, t in layer_cols.items():
                if t.shape[0] != num_tokens:
                    raise TraceError(f"{name}: the hook saw {t.shape[0]} tokens, the batch has {num_tokens}")
                cols[name] = t.numpy()
        return cols


def slot_stats(st: Any, ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(norm, act_in_max, act_out_max)`` ``[T, K]`` float32 (CPU) of the backend's statistics
    ``st`` at the slots ``ids_TK`` (-1: none, 0 there), matched by (token, expert): the backend may
    list a token's experts in another order than the routing event."""
    T, E = ids_TK.shape[0], num_experts
    vals_TK3 = torch.stack([st.out_norm_TK, st.act_max_TK, st.out_max_TK], -1).float().cpu()
    sid = st.ids_TK.cpu().masked_fill(~st.mask_TK.cpu(), E)
    dense = torch.zeros(T, E + 1, 3).scatter_(1, sid.unsqueeze(-1).expand(-1, -1, 3), vals_TK3)
    eid = ids_TK.masked_fill(ids_TK < 0, E)
    got = dense.gather(1, eid.unsqueeze(-1).expand(-1, -1, 3))
    got[ids_TK < 0] = 0
    return got[..., 0], got[..., 1], got[..., 2]
