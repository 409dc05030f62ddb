"""Per-domain validation perplexity and per-layer expert load by domain, on a fixed small slice.

The slice is the first ``tokens`` tokens of each domain's validation stream (documents in stored
order, EOS between them), cut into non-overlapping windows of ``seq_len``; each window predicts its
last ``seq_len - 1`` tokens. Perplexity is ``exp`` of the mean next-token negative log-likelihood over
all predicted tokens of a domain. Load is the share of top-k assignments each expert receives in each
layer, over every token of the domain's slice.

Legend: W windows, S tokens per window, V vocab, L layers, E experts, D domains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.train.batches import encode_split, eval_windows
from moelab.train.losses import expert_load

EVAL_TOKENS = 32768
EVAL_SEQ_LEN = 256


@dataclass
class EvalResult:
    """Validation figures per domain.

    Attributes:
        loss: mean next-token NLL (nats/token) per domain.
        tokens: tokens predicted per domain.
        load_LE: per domain, ``[L][E]`` share of top-k assignments (each layer's row sums to 1).
    """

    loss: dict[str, float]
    tokens: dict[str, int]
    load_LE: dict[str, list[list[float]]]

    @property
    def perplexity(self) -> dict[str, float]:
        return {d: math.exp(v) for d, v in self.loss.items()}


@contextmanager
def eval_progress(streams: dict[str, Tensor], seq_len: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A token progress bar (stderr) over the windows :func:`evaluate_streams` runs; yields ``advance``."""
    from moelab.trace.progress import token_progress

    total = sum(s.numel() // seq_len * seq_len for s in streams.values())
    with token_progress(max(total, 1), enabled=enabled and total > 0, label="evaluating") as advance:
        yield advance


@torch.no_grad()
def evaluate_streams(model: torch.nn.Module, streams: dict[str, Tensor], seq_len: int = EVAL_SEQ_LEN,
                     batch_size: int = 16, advance: Callable[[int], None] | None = None) -> EvalResult:
    """Evaluate a transformers MoE causal LM (``output_router_logits`` supported) on token streams;
    ``advance(tokens)`` is called after every batch (see :func:`eval_progress`)."""
    was_training = model.training
    model.eval()
    loss, count, load = {}, {}, {}
    top_k = model.config.num_experts_per_tok
    try:
        for domain, stream in streams.items():
            windows_WS = eval_windows(stream, seq_len)
            nll, n, load_LE = 0.0, 0, None
            for chunk_WS in windows_WS.split(batch_size):
                out = model(input_ids=chunk_WS, output_router_logits=True, use_cache=False)
                logits = out.logits[:, :-1].float()
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk_WS[:, 1:].reshape(-1),
                                       reduction="sum").item()
                n += chunk_WS[:, 1:].numel()
                counts_LE = torch.stack([expert_load(lg, top_k) for lg in out.router_logits])
                load_LE = counts_LE if load_LE is None else load_LE + counts_LE
                if advance is not None:
                    advance(chunk_WS.numel())
            loss[domain] = nll / n
            count[domain] = n
            load[domain] = (load_LE / load_LE.sum(dim=1, keepdim=True)).tolist()
    finally:
        model.train(was_training)
    return EvalResult(loss=loss, tokens=count, load_LE=load)


def validation_streams(corpus_dir: Path, tokens: int = EVAL_TOKENS) -> dict[str, Tensor]:
    """The fixed evaluation slice: the first ``tokens`` tokens of each domain's validation split."""
    return encode_split(corpus_dir, "val", max_tokens=tokens)


def evaluate_model_dir(model_dir: Path, corpus_dir: Path, tokens: int = EVAL_TOKENS,
                       seq_len: int = EVAL_SEQ_LEN, progress: bool = False) -> EvalResult:
    """Load a saved model with plain ``AutoModelForCausalLM.from_pretrained`` and evaluate it."""
    from transformers import AutoModelForCausalLM

    from moelab.errors import MoelabError
    from moelab.models.open import no_transformers_bars

    if not (Path(model_dir) / "config.json").is_file():
        raise MoelabError(f"model: {model_dir} has no config.json (expected a saved transformers model)")
    with no_transformers_bars():  # plain from_pretrained on purpose: the card's numbers must hold for it
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    streams = validation_streams(corpus_dir, tokens)
    with eval_progress(streams, seq_len, progress) as advance:
        return evaluate_streams(model, streams, seq_len, advance=advance)


def load_entropy(load_LE: list[list[float]]) -> list[float]:
    """Normalised entropy of each layer's expert-load distribution (1.0 = perfectly balanced)."""
    out = []
    for row in load_LE:
        p = torch.tensor(row).clamp_min(1e-12)
        out.append(float(-(p * p.log()).sum() / math.log(len(row))))
    return out
