"""Token streams per domain and the random batches drawn from them.

Each domain's split becomes one long stream: its documents tokenised and joined with the end-of-text
token. A batch row picks a domain (by ``domain_weights``) and a random window of ``seq_len`` tokens
from that stream, both drawn from one ``torch.Generator`` whose state is checkpointed, so a resumed
run draws exactly the batches an uninterrupted one would.

Legend: B rows per batch, S tokens per row, N tokens in a stream.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from moelab.data.corpus import read_split
from moelab.data.sources import DOMAINS
from moelab.data.tokenizer import eos_id, load_tokenizer
from moelab.errors import MoelabError


def encode_split(corpus_dir: Path, split: str, max_tokens: int | None = None) -> dict[str, Tensor]:
    """Tokenise every domain's ``split`` into one int64 stream ``[N]`` each (documents end with EOS).

    Args:
        max_tokens: keep only the first this many tokens of each stream (for small fixed eval slices).
    Raises:
        MoelabError: when a domain has no text.
    """
    tok = load_tokenizer(corpus_dir)
    eos = eos_id(tok)
    streams = {}
    for domain in DOMAINS:
        docs = read_split(corpus_dir, domain, split)
        texts = [d.text for d in docs if d.text.strip()]
        if not texts:
            raise MoelabError(f"corpus: {corpus_dir}/{domain}/{split}.jsonl.xz has no text (expected documents)")
        if max_tokens is not None:
            texts = _enough_texts(texts, max_tokens)
        ids: list[int] = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        streams[domain] = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.int64)
    return streams


def _enough_texts(texts: list[str], max_tokens: int) -> list[str]:
    # bytes >= tokens for byte-level BPE, so this many characters x4 always covers max_tokens
    out, chars = [], 0
    for t in texts:
        out.append(t)
        chars += len(t)
        if chars >= 4 * max_tokens:
            break
    return out


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


def eval_windows(stream: Tensor, seq_len: int) -> Tensor:
    """Cut a stream into consecutive non-overlapping windows ``[W, seq_len]`` (the remainder is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise MoelabError(f"eval: stream of {stream.numel()} tokens is shorter than one window of {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)
