"""The one next-token loss: position s of a row predicts token s + 1 of the same row.

Shape legend: B rows, S tokens per row, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def next_token_nll(logits_BSV: Tensor, ids_BS: Tensor, reduction: str = "mean",
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Cross-entropy of the logits at positions ``0..S-2`` against the tokens at ``1..S-1``.

    The logits are cast to ``dtype`` first (float32: the softmax of bf16/fp16 logits loses digits).
    ``reduction``: ``"mean"`` (nats per predicted token) or ``"sum"`` (``B * (S - 1)`` tokens).
    """
    V = logits_BSV.shape[-1]
    return F.cross_entropy(logits_BSV[:, :-1].reshape(-1, V).to(dtype), ids_BS[:, 1:].reshape(-1),
                           reduction=reduction)
