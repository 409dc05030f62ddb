"""Per-domain validation perplexity and per-layer expert load by domain, on a fixed small slice.

The slice is the first ``tokens`` tokens of each domain's validation stream (documents in stored
order, EOS between them), cut into non-overlapping windows of ``seq_len``; each window predicts its
last ``seq_len - 1`` tokens. Perplexity is ``exp`` of the mean next-token negative log-likelihood over
all predicted tokens of a domain. Load is the share of top-k assignments each expert receives in each
MoE layer, over every token of the domain's slice, counted on the experts the tokens were sent to
(moelab's routing hooks, so a DeepSeek-V3 correction bias is included); a dense model has none.

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
from moelab.train.routing import RoutingRecorder, routed_counts

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


@torch.no_grad()
def evaluate_streams(model: torch.nn.Module, streams: dict[str, Tensor], seq_len: int = EVAL_SEQ_LEN,
                     batch_size: int = 16) -> EvalResult:
    """Evaluate a transformers causal LM (MoE or dense) on token streams."""
    was_training = model.training
    model.eval()
    loss, count, load = {}, {}, {}
    # a dense model's config has no experts per token, and no MoE block to hook
    recorder = RoutingRecorder(model) if getattr(model.config, "num_experts_per_tok", None) else None
    try:
        for domain, stream in streams.items():
            windows_WS = eval_windows(stream, seq_len)
            nll, n, load_LE = 0.0, 0, None
            for chunk_WS in windows_WS.split(batch_size):
                if recorder is not None:
                    recorder.clear()
                logits = model(input_ids=chunk_WS, use_cache=False).logits[:, :-1].float()
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk_WS[:, 1:].reshape(-1),
                                       reduction="sum").item()
                n += chunk_WS[:, 1:].numel()
                if recorder is not None:
                    counts_LE = routed_counts(recorder.routings)
                    load_LE = counts_LE if load_LE is None else load_LE + counts_LE
            loss[domain] = nll / n
            count[domain] = n
            load[domain] = [] if load_LE is None else (load_LE / load_LE.sum(dim=1, keepdim=True)).tolist()
    finally:
        model.train(was_training)
        if recorder is not None:
            recorder.close()
    return EvalResult(loss=loss, tokens=count, load_LE=load)


def validation_streams(corpus_dir: Path, tokens: int = EVAL_TOKENS) -> dict[str, Tensor]:
    """The fixed evaluation slice: the first ``tokens`` tokens of each domain's validation split."""
    return encode_split(corpus_dir, "val", max_tokens=tokens)


def evaluate_model_dir(model_dir: Path, corpus_dir: Path, tokens: int = EVAL_TOKENS,
                       seq_len: int = EVAL_SEQ_LEN) -> EvalResult:
    """Load a saved model with plain ``AutoModelForCausalLM.from_pretrained`` and evaluate it."""
    from transformers import AutoModelForCausalLM

    from moelab.errors import MoelabError

    if not (Path(model_dir) / "config.json").is_file():
        raise MoelabError(f"model: {model_dir} has no config.json (expected a saved transformers model)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return evaluate_streams(model, validation_streams(corpus_dir, tokens), seq_len)


def load_entropy(load_LE: list[list[float]]) -> list[float]:
    """Normalised entropy of each layer's expert-load distribution (1.0 = perfectly balanced)."""
    out = []
    for row in load_LE:
        p = torch.tensor(row).clamp_min(1e-12)
        out.append(float(-(p * p.log()).sum() / math.log(len(row))))
    return out
