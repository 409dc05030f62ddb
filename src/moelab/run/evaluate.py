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
from torch import Tensor

from moelab.data.streams import encode_split
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.routing import Routing
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
        load_LE: per domain, ``[L][E]`` share of top-k assignments per MoE layer (each row sums to 1;
            no rows for a dense model).
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


def evaluate_streams(model: torch.nn.Module, streams: dict[str, Tensor], seq_len: int = EVAL_SEQ_LEN,
                     batch_size: int = 16, advance: Callable[[int], None] | None = None) -> EvalResult:
    """Evaluate a transformers MoE causal LM on token streams; ``advance(tokens)`` is called after
    every batch (see :func:`eval_progress`).

    The model runs through :func:`moelab.run.run_batches` (eval mode, no grad, state restored); the
    expert load is counted from the routing the experts received (routing hooks, after any routing
    edit), so routers that select with a correction bias, by group or by SparseMixer count right.
    """
    blocks = _moe_blocks(model)
    loss, count, load = {}, {}, {}
    for domain, stream in streams.items():
        sums = _Sums(blocks, advance)
        handles = [b.register_routing_hook(sums.count) for b in blocks]
        run_batches(model, eval_windows(stream, seq_len).split(batch_size), handles=handles,
                    on_output=sums.add, use_cache=False)
        loss[domain] = sums.nll / sums.n
        count[domain] = sums.n
        load[domain] = (sums.load_LE / sums.load_LE.sum(dim=1, keepdim=True)).tolist() if blocks else []
    return EvalResult(loss=loss, tokens=count, load_LE=load)


def _moe_blocks(model: torch.nn.Module) -> list:
    """The MoE blocks of the model's view; none for a dense model (its config names no experts)."""
    from moelab.models.families._common import config_num_experts

    if config_num_experts(model.config) is None:
        return []
    return open_model(model).blocks


class _Sums:
    """Summed NLL and predicted tokens over the windows of a domain, and the expert load ``[L, E]``
    from the routing hooks (real slots only)."""

    def __init__(self, blocks: list, advance: Callable[[int], None] | None) -> None:
        self.nll, self.n, self.advance = 0.0, 0, advance
        self.row = {b.layer: n for n, b in enumerate(blocks)}
        E = max((b.num_experts for b in blocks), default=1)
        self.load_LE = torch.zeros(len(blocks), E)

    def count(self, ev) -> None:
        self.load_LE[self.row[ev.block.layer]] += expert_load(ev.routing, self.load_LE.shape[1])

    def add(self, ids_WS: Tensor, out) -> None:
        self.nll += next_token_nll(out.logits, ids_WS, reduction="sum").item()
        self.n += ids_WS[:, 1:].numel()
        if self.advance is not None:
            self.advance(ids_WS.numel())


def expert_load(routing: Routing, num_experts: int) -> Tensor:
    """Assignment counts per expert ``[E]`` (float32) of a routing's real slots: the one load count."""
    return routing.tokens_per_expert(num_experts).float().cpu()


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
                       seq_len: int = EVAL_SEQ_LEN, progress: bool = False) -> EvalResult:
    """Load a saved model (float32, :func:`moelab.models.load_checkpoint`: safetensors only) and evaluate it."""
    from moelab.models import load_checkpoint

    model = load_checkpoint(Path(model_dir), dtype=torch.float32, dense_ok=True)
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
