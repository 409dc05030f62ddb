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
from torch import Tensor

from moelab.data.streams import encode_split
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.run.loss import next_token_nll
from moelab.run.runner import run_batches

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


def evaluate_streams(model: torch.nn.Module, streams: dict[str, Tensor], seq_len: int = EVAL_SEQ_LEN,
                     batch_size: int = 16) -> EvalResult:
    """Evaluate a transformers MoE causal LM (``output_router_logits`` supported) on token streams.

    The model runs through :func:`moelab.run.run_batches` (eval mode, no grad, state restored).
    """
    top_k = open_model(model).blocks[0].top_k  # the family's own field (DBRX: ffn_config.moe_top_k)
    loss, count, load = {}, {}, {}
    for domain, stream in streams.items():
        sums = _Sums(top_k)
        run_batches(model, eval_windows(stream, seq_len).split(batch_size), on_output=sums.add,
                    output_router_logits=True, use_cache=False)
        loss[domain] = sums.nll / sums.n
        count[domain] = sums.n
        load[domain] = (sums.load_LE / sums.load_LE.sum(dim=1, keepdim=True)).tolist()
    return EvalResult(loss=loss, tokens=count, load_LE=load)


class _Sums:
    """Summed NLL, predicted tokens and top-k assignment counts ``[L, E]`` over the windows of a domain."""

    def __init__(self, top_k: int) -> None:
        self.top_k, self.nll, self.n, self.load_LE = top_k, 0.0, 0, None

    def add(self, ids_WS: Tensor, out) -> None:
        self.nll += next_token_nll(out.logits, ids_WS, reduction="sum").item()
        self.n += ids_WS[:, 1:].numel()
        counts_LE = torch.stack([expert_load(lg, self.top_k) for lg in out.router_logits])
        self.load_LE = counts_LE if self.load_LE is None else self.load_LE + counts_LE


def expert_load(logits_TE: Tensor, top_k: int) -> Tensor:
    """Top-k assignment counts per expert ``[E]`` (float32), as the model routes (softmax then top-k)."""
    ids_TK = logits_TE.float().topk(top_k, dim=-1).indices  # softmax is monotone: same top-k as on probs
    return torch.bincount(ids_TK.reshape(-1), minlength=logits_TE.shape[-1]).float()


def eval_windows(stream: Tensor, seq_len: int) -> Tensor:
    """Cut a stream into consecutive non-overlapping windows ``[W, seq_len]`` (the remainder is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise MoelabError(f"eval: stream of {stream.numel()} tokens is shorter than one window of {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


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
