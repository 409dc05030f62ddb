"""Token streams per domain and the random batches drawn from them.

Each domain's split becomes one long stream (:func:`moelab.data.streams.encode_split`). A batch row
picks a domain (by ``domain_weights``) and a random window of ``seq_len`` tokens from that stream,
both drawn from one ``torch.Generator`` whose state is checkpointed, so a resumed run draws exactly
the batches an uninterrupted one would.

Legend: B rows per batch, S tokens per row, N tokens in a stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.data.sources import DOMAINS
from moelab.errors import MoelabError


def sample_batch(
    streams: dict[str, Tensor], weights: dict[str, float], batch_size: int, seq_len: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw ``batch_size`` random windows.

    Returns:
        ids_BS (int64) and domain index per row ``[B]`` (index into ``DOMAINS``).
    """
    names = [d for d in DOMAINS if weights.get(d, 0) > 0]
    for d in names:
        if streams[d].numel() <= seq_len:
            raise MoelabError(f"corpus: domain {d!r} has {streams[d].numel()} tokens, fewer than seq_len+1={seq_len + 1}")
    w = torch.tensor([float(weights[d]) for d in names])
    pick_B = torch.multinomial(w, batch_size, replacement=True, generator=gen)
    rows, dom = [], []
    for i in pick_B.tolist():
        stream = streams[names[i]]
        start = int(torch.randint(0, stream.numel() - seq_len, (1,), generator=gen))
        rows.append(stream[start:start + seq_len])
        dom.append(DOMAINS.index(names[i]))
    return torch.stack(rows), torch.tensor(dom)
