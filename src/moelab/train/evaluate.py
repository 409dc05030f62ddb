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


@torch.no_grad()
def evaluate_streams(model: torch.nn.Module, streams: dict[str, Tensor], seq_len: int = EVAL_SEQ_LEN,
                     batch_size: int = 16) -> EvalResult:
    """Evaluate a transformers MoE causal LM (``output_router_logits`` supported) on token streams."""
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
                       seq_len: int = EVAL_SEQ_LEN) -> EvalResult:
    """Load a saved model (float32, :func:`moelab.models.load_checkpoint`: safetensors only) and evaluate it."""
    from moelab.models import load_checkpoint

    model = load_checkpoint(Path(model_dir), dtype=torch.float32)
    return evaluate_streams(model, validation_streams(corpus_dir, tokens), seq_len)


def load_entropy(load_LE: list[list[float]]) -> list[float]:
    """Normalised entropy of each layer's expert-load distribution (1.0 = perfectly balanced)."""
    out = []
    for row in load_LE:
        p = torch.tensor(row).clamp_min(1e-12)
        out.append(float(-(p * p.log()).sum() / math.log(len(row))))
    return out
