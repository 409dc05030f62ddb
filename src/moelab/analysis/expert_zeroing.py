"""The effect of zeroing one expert on the next-token loss, as Su et al. measure super experts.

Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models"
(arXiv 2507.23279; github.com/ZunhaiSu/Super-Experts-Profilling) prune a super expert by zeroing its
down projection and report how the model's loss and outputs degrade. Here expert e of a block is
zeroed by a routing edit that sets its combine weight to 0 (equal to zeroing ``down[e]`` and
``down_bias[e]``), so the expert still takes its routing slot but adds nothing to the block's output. The effect is

    delta(l, e) = loss(model with expert e of layer l zeroed) - loss(model)

where loss is the mean next-token negative log-likelihood (nats/token) over every predicted token
of the given batches (position s predicts token s + 1 of the same row). The edit is removed after
each measurement, also on error; the model's weights are never written.

Shape legend: B rows per batch, S tokens per row, V vocabulary, S_ number of experts measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError
from moelab.models import ModelView, MoEBlockView
from moelab.run import run_batches
from moelab.run.loss import next_token_nll
from moelab.steer.edits import scale_weights


@contextlib.contextmanager
def zeroed_expert(block: MoEBlockView, expert: int) -> Iterator[None]:
    """Within the block, expert ``expert`` keeps its routing slots but adds nothing: its combine
    weight is multiplied by 0 (the routing edit :func:`moelab.steer.scale_weights`), which equals
    zeroing its down projection and bias. The weights are never touched; the edit is removed on exit."""
    if not 0 <= int(expert) < block.num_experts:
        raise AnalysisInputError(
            f"expert: expected 0..{block.num_experts - 1} for layer {block.layer}, got {expert}"
        )
    with scale_weights(block, {block.layer: {int(expert): 0.0}}):
        yield


def _check_batches(batches: Sequence[Tensor]) -> list[Tensor]:
    if len(batches) == 0:
        raise EmptySelectionError("batches is empty: the loss needs at least one batch of token ids")
    out = []
    for n, b in enumerate(batches):
        if not isinstance(b, Tensor) or b.ndim != 2 or b.dtype not in (torch.int64, torch.int32):
            raise AnalysisInputError(
                f"batches[{n}]: expected an int64 tensor [B, S] of token ids, got "
                f"{getattr(b, 'dtype', type(b).__name__)} of shape {tuple(getattr(b, 'shape', ()))}"
            )
        if b.shape[1] >= 2:
            out.append(b.long())
    if not out:
        raise EmptySelectionError("batches: no row has 2 or more tokens, so no token is predicted")
    return out


def next_token_loss(model: torch.nn.Module, batches: Sequence[Tensor]) -> float:
    """Mean next-token NLL (nats/token) of a causal LM over every predicted token of ``batches``
    (each ``[B, S]`` token ids), run through :func:`moelab.run.run_batches` (eval mode, no grad,
    the model's mode restored after)."""
    checked = _check_batches(batches)
    sums = {"nll": 0.0, "count": 0}

    def add(ids_BS: Tensor, out) -> None:
        sums["nll"] += next_token_nll(out.logits, ids_BS, reduction="sum").item()
        sums["count"] += ids_BS[:, 1:].numel()

    run_batches(model, checked, on_output=add, use_cache=False)
    return sums["nll"] / sums["count"]


@dataclass(frozen=True)
class ZeroingEffect:
    """Loss with each listed expert zeroed, one at a time."""

    base_loss: float
    layer_S: np.ndarray
    expert_S: np.ndarray
    loss_S: np.ndarray
    tokens: int  # predicted tokens per measurement

    @property
    def delta_S(self) -> np.ndarray:
        return self.loss_S - self.base_loss


def zeroing_effect(view: ModelView, experts: Sequence[tuple[int, int]], batches: Sequence[Tensor]) -> ZeroingEffect:
    """The loss of ``view.model`` on ``batches`` with each ``(layer, expert)`` of ``experts`` zeroed
    alone (see the module docstring); the model is left unchanged."""
    checked = _check_batches(batches)
    pairs = [(int(a), int(b)) for a, b in experts]
    blocks = []
    for layer, _ in pairs:
        try:
            blocks.append(view.block(layer))
        except KeyError as err:
            raise AnalysisInputError(f"experts: {err.args[0]}") from None
    base = next_token_loss(view.model, checked)
    losses = []
    for block, (_, e) in zip(blocks, pairs, strict=True):
        with zeroed_expert(block, e):
            losses.append(next_token_loss(view.model, checked))
    tokens = sum(b[:, 1:].numel() for b in checked)
    return ZeroingEffect(base_loss=base, layer_S=np.array([p[0] for p in pairs], dtype=np.int64),
                         expert_S=np.array([p[1] for p in pairs], dtype=np.int64),
                         loss_S=np.array(losses, dtype=np.float64), tokens=tokens)


def trace_batches(token_ids_N: np.ndarray, seq_ids_N: np.ndarray, max_tokens: int = 8192) -> list[Tensor]:
    """The traced sequences as ``[1, S]`` batches (rows of equal length stacked together), up to about
    ``max_tokens`` tokens, in trace order: lets the effect be measured on the traced text itself."""
    tok, seq = np.asarray(token_ids_N), np.asarray(seq_ids_N)
    if tok.shape != seq.shape or tok.ndim != 1:
        raise AnalysisInputError(f"token_ids_N {tok.shape} and seq_ids_N {seq.shape} must be equal 1-D shapes")
    if tok.size == 0:
        raise EmptySelectionError("the trace selection has no tokens")
    starts = np.concatenate([[0], np.flatnonzero(seq[1:] != seq[:-1]) + 1, [len(seq)]])
    by_len: dict[int, list[np.ndarray]] = {}
    total = 0
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        if total >= max_tokens:
            break
        by_len.setdefault(int(b - a), []).append(tok[a:b].astype(np.int64))
        total += int(b - a)
    return [torch.from_numpy(np.stack(rows)) for _, rows in sorted(by_len.items())]
