"""Evaluate a compressed model: per-domain perplexity and, against a reference, KL and top-1 agreement.

Legend: W windows, S tokens per window, V vocab.

Perplexity is exactly :func:`moelab.run.evaluate.evaluate_streams` (the first ``tokens`` tokens of
each domain's validation split, non-overlapping windows of ``seq_len``, each predicting its last
``S - 1`` tokens). With a reference model (usually the uncompressed one) the same forward calls also
run the reference on the same windows, through a forward hook, and measure at every predicted
position::

    KL(ref || model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v))      (nats, mean per domain)
    top-1 agreement  = 1[argmax_v p_ref = argmax_v p_model]                   (share per domain)

Tokens at or beyond the model's vocabulary (a corpus from another tokenizer) are refused up front.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.run import evaluating
from moelab.run.evaluate import (
    EVAL_SEQ_LEN,
    EVAL_TOKENS,
    eval_progress,
    evaluate_streams,
    validation_streams,
)


@dataclass
class CompressionEval:
    """Per-domain figures of one model; ``kl`` and ``top1`` are None without a reference."""

    loss: dict[str, float]
    tokens: dict[str, int]
    params: int
    kl: dict[str, float] | None = None
    top1: dict[str, float] | None = None
    load_LE: dict[str, list[list[float]]] = field(default_factory=dict, repr=False)

    @property
    def perplexity(self) -> dict[str, float]:
        return {d: math.exp(v) for d, v in self.loss.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "loss": self.loss, "tokens": self.tokens, "params": self.params,
                "kl": self.kl, "top1": self.top1}


def _vocab(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def check_vocab(streams: dict[str, Tensor], model: nn.Module, where: str) -> None:
    """Raise MoelabError if any token id is negative or not below the model's vocabulary size."""
    V = _vocab(model)
    for domain, s in streams.items():
        if s.numel() and (int(s.max()) >= V or int(s.min()) < 0):
            raise MoelabError(
                f"{where}: domain {domain!r} has token id {int(s.max())} but the model's vocabulary has {V} "
                f"tokens; the corpus was tokenised with another tokenizer than the model's")


class _Agreement:
    """Forward hook on the evaluated model: runs the reference on the same input, sums KL and top-1."""

    def __init__(self, reference: nn.Module) -> None:
        self.reference = reference
        self.kl, self.agree, self.count = 0.0, 0, 0
        self.busy = False  # the reference may be the model itself: don't recurse

    @torch.no_grad()
    def __call__(self, _mod: nn.Module, _args: tuple, kwargs: dict, out: Any) -> None:
        if self.busy:
            return
        ids_WS = kwargs["input_ids"]
        self.busy = True
        try:
            ref_WSV = self.reference(input_ids=ids_WS, use_cache=False).logits[:, :-1].double()
        finally:
            self.busy = False
        mod_WSV = out.logits[:, :-1].double()
        logp_ref, logp_mod = F.log_softmax(ref_WSV, -1), F.log_softmax(mod_WSV, -1)
        self.kl += float((logp_ref.exp() * (logp_ref - logp_mod)).sum())
        self.agree += int((ref_WSV.argmax(-1) == mod_WSV.argmax(-1)).sum())
        self.count += ref_WSV.shape[0] * ref_WSV.shape[1]

    def take(self) -> tuple[float, float]:
        kl, top1 = self.kl / max(self.count, 1), self.agree / max(self.count, 1)
        self.kl, self.agree, self.count = 0.0, 0, 0
        return kl, top1


def evaluate_compressed(model: nn.Module, streams: dict[str, Tensor], *, reference: nn.Module | None = None,
                        seq_len: int = EVAL_SEQ_LEN, batch_size: int = 16,
                        progress: bool = False) -> CompressionEval:
    """Perplexity per domain of ``model`` on ``streams`` (``domain -> [N]`` token ids) and, given
    ``reference``, mean KL(reference || model) and top-1 agreement on the same windows; ``progress``
    shows a token bar on stderr."""
    check_vocab(streams, model, "corpus")
    if reference is not None and _vocab(reference) != _vocab(model):
        raise MoelabError(f"reference: vocabulary of {_vocab(reference)} tokens, but the model has "
                          f"{_vocab(model)}; KL needs the same tokenizer")
    params = sum(p.numel() for p in model.parameters())
    with eval_progress(streams, seq_len, progress) as advance:
        if reference is None:
            res = evaluate_streams(model, streams, seq_len, batch_size, advance)
            return CompressionEval(res.loss, res.tokens, params, load_LE=res.load_LE)
        return _with_reference(model, reference, streams, seq_len, batch_size, params, advance)


def _with_reference(model: nn.Module, reference: nn.Module, streams: dict[str, Tensor], seq_len: int,
                    batch_size: int, params: int, advance: Callable[[int], None]) -> CompressionEval:
    agreement = _Agreement(reference)
    loss, tokens, kl, top1, load = {}, {}, {}, {}, {}
    with evaluating(reference, [model.register_forward_hook(agreement, with_kwargs=True)]):
        for domain, stream in streams.items():  # one domain at a time: the hook's sums are per domain
            res = evaluate_streams(model, {domain: stream}, seq_len, batch_size, advance)
            loss[domain], tokens[domain], load[domain] = res.loss[domain], res.tokens[domain], res.load_LE[domain]
            kl[domain], top1[domain] = agreement.take()
    return CompressionEval(loss, tokens, params, kl, top1, load)


def load_model(path: str | Path, what: str = "model") -> nn.Module:
    """A local safetensors checkpoint in float32 (moelab's checked loader; never pickle)."""
    from moelab.models import load_checkpoint

    path = Path(path)
    if not path.exists():
        raise MoelabError(f"{what}: {path} does not exist (expected a model folder with config.json)")
    return load_checkpoint(path, dtype=torch.float32)


def check_same_tokenizer(model_dir: Path, corpus_dir: Path) -> None:
    """Refuse a model folder whose ``tokenizer.json`` differs from the corpus's (when both have one)."""
    a, b = Path(model_dir) / "tokenizer.json", Path(corpus_dir) / "tokenizer.json"
    if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
        raise MoelabError(f"corpus: {b} differs from the model's {a}; the corpus is tokenised for another model")


def corpus_streams(corpus: str | Path, model_dir: str | Path, tokens: int) -> dict[str, Tensor]:
    """The first ``tokens`` validation tokens per label of any corpus :func:`moelab.data.read_corpus`
    accepts: a moelab corpus' val split (its own tokenizer, which must be the model's), or any other
    corpus read whole and tokenised with ``model_dir``'s tokenizer, documents of one label joined with
    EOS; unlabelled text goes under ``all``."""
    from moelab.data.texts import is_moelab_corpus, read_corpus
    from moelab.trace.corpus import TextTokenizer

    corpus = Path(corpus)
    if corpus.is_dir():  # a folder with its own tokenizer.json was tokenised for the model it came with
        check_same_tokenizer(Path(model_dir), corpus)
    if corpus.is_dir() and is_moelab_corpus(corpus):
        return validation_streams(corpus, tokens)
    docs = read_corpus(corpus)  # before the tokenizer: a bad corpus is named first
    tok = TextTokenizer(model_dir)
    streams: dict[str, list[int]] = {}
    for doc, ids in zip(docs, tok.encode([d.text for d in docs]), strict=True):
        s = streams.setdefault(doc.label or "all", [])
        if s and tok.eos_id is not None:
            s.append(tok.eos_id)
        s.extend(ids)
    return {label: torch.tensor(s[:tokens], dtype=torch.long) for label, s in streams.items()}


def evaluate_path(model_dir: str | Path, corpus: str | Path, *, reference_dir: str | Path | None = None,
                  tokens: int = EVAL_TOKENS, seq_len: int = EVAL_SEQ_LEN, progress: bool = False,
                  steer: str | Path | None = None) -> CompressionEval:
    """Load ``model_dir`` (and ``reference_dir``) and evaluate on ``corpus``'s validation text
    (:func:`corpus_streams`: a moelab corpus' val split, or any other corpus read whole).
    ``steer``: a steering file applied to the model (not to the reference) for the evaluation."""
    model_dir = Path(model_dir)
    streams = corpus_streams(corpus, model_dir, tokens)
    model = load_model(model_dir)
    reference = load_model(reference_dir, "reference") if reference_dir is not None else None
    shortest = min(s.numel() for s in streams.values())
    handle = None
    if steer is not None:
        from moelab.steer import apply_steering, load_steering

        handle = apply_steering(model, load_steering(steer, model))
    try:
        return evaluate_compressed(model, streams, reference=reference, seq_len=min(seq_len, shortest),
                                   progress=progress)
    finally:
        if handle is not None:
            handle.remove()
