"""The one small optimiser loop test-time routing methods share (Rewiring, C3PO's gradient surrogate
and its oracle): Adam on a few tensors, the model frozen, the best step kept, divergence reported.

Gradients are taken with :func:`torch.autograd.grad` on the given tensors only, so the model's own
parameters never accumulate ``.grad`` and the model is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.errors import MoelabError


@dataclass(frozen=True)
class FitConfig:
    """``steps`` Adam steps at learning rate ``lr``; a loss above ``diverge_factor`` times the first
    (or a non-finite one) stops the fit, which then keeps the best tensors seen."""

    steps: int = 10
    lr: float = 0.1
    diverge_factor: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise MoelabError(f"steps must be an int >= 0, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise MoelabError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.diverge_factor, (int, float)) and self.diverge_factor > 1):
            raise MoelabError(f"diverge_factor must be > 1, got {self.diverge_factor!r}")


@dataclass
class FitReport:
    """Loss before each step (and after the last), the step whose tensors were kept, and whether the
    fit stopped on divergence."""

    losses: list[float] = field(default_factory=list)
    best_step: int = 0
    diverged: bool = False


def minimise(params: list[Tensor], loss_fn: Callable[[], Tensor], cfg: FitConfig) -> FitReport:
    """Minimise ``loss_fn()`` over ``params`` (leaf tensors, ``requires_grad``) in place; on return
    they hold the best values seen (the starting ones if no step helped)."""
    opt = torch.optim.Adam(params, lr=cfg.lr)
    report = FitReport()
    best = [p.detach().clone() for p in params]
    best_loss = math.inf
    for step in range(cfg.steps + 1):
        loss = loss_fn()
        value = float(loss.detach())
        report.losses.append(value)
        if not math.isfinite(value) or (report.losses and value > cfg.diverge_factor * report.losses[0]):
            report.diverged = True
            break
        if value < best_loss:
            best_loss, report.best_step = value, step
            best = [p.detach().clone() for p in params]
        if step == cfg.steps:
            break
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g
        opt.step()
    with torch.no_grad():
        for p, b in zip(params, best, strict=True):
            p.copy_(b)
    return report


__all__ = ["FitConfig", "FitReport", "minimise"]
