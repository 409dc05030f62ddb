"""Token streams per domain: each domain's split of a moelab corpus tokenised into one long stream.

The documents of a split are tokenised in stored order and joined with the end-of-text token, so
training draws windows from one stream per domain and evaluation cuts the same stream into windows.

Legend: N tokens in a stream.
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
    tok = load_tokenizer(corpus_dir, "expected a corpus folder written by `moelab data build`")
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
