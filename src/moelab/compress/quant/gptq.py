"""GPTQ on stacked expert weights, each expert with its own Hessian (Frantar et al. 2023, arXiv 2210.17323).

Shape legend: E experts, O output features, I input features, G groups, B columns per lazy block,
N calibration rows of one expert.

For one linear weight ``W [O, I]`` and its inputs ``X [N, I]`` (the rows the model routes to that
expert), GPTQ minimises ``||W X^T - W' X^T||_F^2``, whose Hessian is ``H = 2 X^T X`` (accumulated in
float64 by :mod:`moelab.compress.quant.calibrate`). Columns are quantised left to right; after column
``q`` is rounded, the Optimal Brain Surgeon update moves the not-yet-quantised columns ``F`` to absorb
its error::

    w'_q = quant(w_q),   err = (w_q - w'_q) / [H_F^{-1}]_qq,   W_F <- W_F - err [H_F^{-1}]_{q,F}
    H_{F \\ q}^{-1} = H_F^{-1} - [H_F^{-1}]_{:,q} [H_F^{-1}]_{q,:} / [H_F^{-1}]_qq

GPTQ's fast form (Algorithm 1 of the paper), used by :func:`gptq_quantize`: the rows of the upper
Cholesky factor ``U`` of ``H^{-1}`` are exactly ``[H_F^{-1}]_{q,F} / sqrt([H_F^{-1}]_qq)``, so
``err = (w_q - w'_q) / U_qq`` and ``W_F -= err U_{q,F}``, applied lazily per block of B columns
(within the block at once, to later columns as one matrix product per block). Here it is batched over
the E experts of a stacked ``[E, O, I]`` weight.

Settings, as in the reference implementation (``gptq.py`` of IST-DASLab/gptq): dampening
``H += percdamp * mean(diag H) * I`` (percdamp 0.01); inputs never seen (``H_ii = 0``) get ``H_ii = 1``
and their weights set to 0; no activation reordering. Group parameters (scale, zero) are computed
when the first column of a group is reached, from the group's current (already updated) weights;
per-channel parameters (``group_size=None``) from the whole original row, before any update.
:func:`gptq_reference` is the slow obvious form (explicit inverse, column by column, float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.compress.quant.common import (
    QuantConfig,
    QuantizedTensor,
    dequantize,
    qparams,
    qparams_from_range,
    quantize_values,
)
from moelab.errors import MoelabError

PERCDAMP = 0.01


def _prepare(w_EOI: Tensor, H_EII: Tensor, percdamp: float) -> tuple[Tensor, Tensor]:
    """Weights with dead inputs zeroed, and the dampened float64 Hessian with dead diagonals set to 1."""
    E, O, I = w_EOI.shape  # noqa: E741
    if H_EII.shape != (E, I, I):
        raise MoelabError(f"gptq: Hessian {tuple(H_EII.shape)} does not match weights {tuple(w_EOI.shape)}; "
                          f"expected [{E}, {I}, {I}]")
    if not bool(torch.isfinite(H_EII).all()):
        raise MoelabError("gptq: the Hessian has non-finite entries (the calibration activations overflowed)")
    H = H_EII.detach().to(torch.float64).clone()
    W = w_EOI.detach().clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    W.masked_fill_(dead[:, None, :], 0)
    diag.masked_fill_(dead, 1.0)
    diag += percdamp * diag.mean(-1, keepdim=True)
    return W, H


def gptq_quantize(w_EOI: Tensor, H_EII: Tensor, cfg: QuantConfig, *, percdamp: float = PERCDAMP,
                  block: int = 128) -> QuantizedTensor:
    """GPTQ of ``w [E, O, I]`` with per-expert Hessians ``H [E, I, I]`` (or ``w [O, I]``, ``H [I, I]``).

    Works in float32 (float64 for float64 weights); scales come back in the weight's dtype.
    """
    single = w_EOI.dim() == 2
    if single:
        w_EOI, H_EII = w_EOI.unsqueeze(0), H_EII.unsqueeze(0)
    E, O, I = w_EOI.shape  # noqa: E741
    g = cfg.group(I)
    work = torch.float64 if w_EOI.dtype == torch.float64 else torch.float32
    W, H = _prepare(w_EOI, H_EII, percdamp)
    W = W.to(work)
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(work)
    except RuntimeError as err:
        raise MoelabError(f"gptq: the dampened Hessian is not positive definite ({err}); raise percdamp") from None
    per_channel = cfg.group_size is None
    if per_channel:
        scale, zero = qparams(W.to(w_EOI.dtype), cfg)
    else:
        scale = torch.empty(E, O, I // g, dtype=w_EOI.dtype, device=w_EOI.device)
        zero = torch.empty(E, O, I // g, dtype=torch.int8, device=w_EOI.device)
    q = torch.empty(E, O, I, dtype=torch.int8, device=w_EOI.device)
    B = block if per_channel else g * max(1, block // g)  # a group never straddles two blocks
    for i1 in range(0, I, B):
        i2 = min(i1 + B, I)
        W1, Err1 = W[..., i1:i2].clone(), torch.zeros(E, O, i2 - i1, dtype=work, device=W.device)
        for i in range(i2 - i1):
            col = i1 + i
            if not per_channel and col % g == 0:  # the group lies inside this block: B % g == 0
                grp = W1[..., i:i + g]
                s, z = qparams_from_range(grp.amin(-1), grp.amax(-1), cfg, w_EOI.dtype)
                scale[..., col // g], zero[..., col // g] = s, z
            s, z = scale[..., col // g], zero[..., col // g]
            qc = quantize_values(W1[..., i], s, z, cfg)
            q[..., col] = qc
            wq = (qc.to(work) - z.to(work)) * s.to(work)
            err = (W1[..., i] - wq) / U[:, col, col].unsqueeze(-1)
            W1[..., i:] -= err.unsqueeze(-1) * U[:, col, i1 + i:i2].unsqueeze(1)
            Err1[..., i] = err
        if i2 < I:
            W[..., i2:] -= Err1 @ U[:, i1:i2, i2:]
    out = QuantizedTensor(q, scale, zero, cfg)
    if single:
        out = QuantizedTensor(q[0], scale[0], zero[0], cfg)
    return out


def gptq_reference(w_OI: Tensor, H_II: Tensor, cfg: QuantConfig, *, percdamp: float = PERCDAMP
                   ) -> tuple[QuantizedTensor, Tensor]:
    """The slow obvious GPTQ of one weight ``[O, I]``: float64, explicit ``H^{-1}``, one OBS update
    and one inverse downdate per column (the formulas of the module docstring).

    Also returns ``x_OI = w / scale + zero`` of each element just before it was rounded (float64): a
    value at a tie (``k + 1/2``, which the symmetric scale puts each group's extreme on) may round
    either way in another summation order."""
    O, I = w_OI.shape  # noqa: E741
    g = cfg.group(I)
    W, H = _prepare(w_OI.unsqueeze(0), H_II.unsqueeze(0), percdamp)
    W, Hinv = W[0].to(torch.float64), torch.linalg.inv(H[0])
    if cfg.group_size is None:
        scale, zero = qparams(W.to(w_OI.dtype), cfg)
    else:
        scale = torch.empty(O, I // g, dtype=w_OI.dtype)
        zero = torch.empty(O, I // g, dtype=torch.int8)
    q = torch.empty(O, I, dtype=torch.int8)
    x_OI = torch.empty(O, I, dtype=torch.float64)
    for c in range(I):
        if cfg.group_size is not None and c % g == 0:
            scale[:, c // g], zero[:, c // g] = qparams_from_range(
                W[:, c:c + g].amin(-1), W[:, c:c + g].amax(-1), cfg, w_OI.dtype)
        s, z = scale[:, c // g], zero[:, c // g]
        x_OI[:, c] = W[:, c] / s.double() + z.double()
        q[:, c] = quantize_values(W[:, c], s, z, cfg)
        wq = (q[:, c].double() - z.double()) * s.double()
        err = (W[:, c] - wq) / Hinv[c, c]
        W[:, c:] -= err[:, None] * Hinv[c, c:][None, :]
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return QuantizedTensor(q, scale, zero, cfg), x_OI


def hessian_error(w_EOI: Tensor, qt: QuantizedTensor, H_EII: Tensor) -> Tensor:
    """``||(W - W') X^T||_F^2 = tr((W - W') H (W - W')^T) / 2`` per expert (float64, ``[E]``): the
    output error on the calibration rows, the loss GPTQ minimises."""
    d = (w_EOI.detach().to(torch.float64) - dequantize(qt.q, qt.scale, qt.zero, torch.float64))
    return 0.5 * torch.einsum("eoi,eij,eoj->e", d, H_EII.to(torch.float64), d)


__all__ = ["PERCDAMP", "gptq_quantize", "gptq_reference", "hessian_error"]
