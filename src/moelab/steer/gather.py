"""The routing of a model over some text, per MoE layer: what steering's detectors count from.

Shape legend: N tokens, K slots per token, E experts, B sequences per batch, S tokens per sequence.

:func:`gather_routing` takes one *source* and returns a :class:`Routed`: the token ids and, per MoE
layer, the experts each token went to, **after every routing edit installed on the model** (the
routing hooks of :mod:`moelab.models.edits` see the edited routing; a switched-off slot is -1, as in
a trace). A source is one of:

    * a routing trace (a :class:`moelab.trace.Trace` or its directory), checked against the model's
      fingerprint, read without running the model;
    * a corpus path (anything :func:`moelab.data.read_corpus` reads): drawn by
      :func:`moelab.compress.calib.calibration_batches`, so a ``moelab data build`` corpus gives its
      **train** split, label-balanced, seeded; a folder with its own ``tokenizer.json`` must carry the
      model's;
    * a list of prompts (texts) or of token-id lists: each one its own sequence (cut at ``seq_len``).

``label`` keeps one label (domain) of a trace or corpus; ``tokens`` caps the tokens used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.data.texts import CorpusError, is_moelab_corpus
from moelab.errors import MoelabError
from moelab.models import ModelView, RoutingEvent
from moelab.run import run_batches
from moelab.trace.fingerprint import as_view


@dataclass(frozen=True)
class Routed:
    """Routing of ``N`` tokens: ``ids[layer]`` ``[N, K]`` int64 (-1: a switched-off slot)."""

    token_ids_N: np.ndarray
    ids: dict[int, np.ndarray]
    num_experts: dict[int, int]
    top_k: dict[int, int]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_N.shape[0])

    def counts(self, layer: int) -> np.ndarray:
        """``[E]`` int64: tokens whose selection includes each expert (a token's ids are distinct)."""
        ids = self.ids[layer]
        return np.bincount(ids[ids >= 0], minlength=self.num_experts[layer]).astype(np.int64)


def _is_trace_dir(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file() and not is_moelab_corpus(path)


def _from_trace(view: ModelView, source: Any, tokens: int, label: str | None) -> Routed:
    from moelab.trace.reader import Trace, open_trace

    trace = source if isinstance(source, Trace) else open_trace(Path(source))
    trace.check_matches(view.model)
    if label is not None:
        trace = trace.select(labels=[label])
    trace = trace.select(tokens=(0, tokens))
    ids = {layer: trace.ids(layer).astype(np.int64) for layer in trace.layers}
    info = {layer: trace.layer_info(layer) for layer in trace.layers}
    return Routed(trace.token_ids.astype(np.int64), ids, {k: v.num_experts for k, v in info.items()},
                  {k: v.top_k for k, v in info.items()},
                  {"kind": "trace", "path": str(trace.directory), "label": label, "tokens": trace.num_tokens})


def _prompt_batches(view: ModelView, items: list, seq_len: int, tokens: int,
                    tokenizer: str | os.PathLike | None) -> list[torch.Tensor]:
    """One ``[1, S]`` batch per prompt (texts tokenized with the model's tokenizer), ``tokens`` in all."""
    from moelab.trace.corpus import TextTokenizer
    from moelab.trace.inputs import as_token_docs, check_vocab, tokenizer_dir

    docs = as_token_docs(items)
    if docs is None:
        if not all(isinstance(t, str) for t in items):
            raise CorpusError("expected a corpus path, a trace, a list of prompts (texts) or of token-id lists")
        docs = [np.asarray(x, dtype=np.int64) for x in TextTokenizer(tokenizer_dir(view, tokenizer)).encode(items)]
    check_vocab(docs, getattr(view.config, "vocab_size", None))
    out, left = [], tokens
    for d in docs:
        row = np.asarray(d, dtype=np.int64)[: min(seq_len, left)]
        if row.size:
            out.append(torch.from_numpy(row).view(1, -1))
            left -= row.size
        if left <= 0:
            break
    if not out:
        raise CorpusError("the prompts hold no tokens")
    return out


def _corpus_batches(view: ModelView, path: Path, tokens: int, seq_len: int, batch_size: int, seed: int,
                    label: str | None, tokenizer: str | os.PathLike | None) -> list[torch.Tensor]:
    from moelab.compress.calib import calibration_batches
    from moelab.compress.evaluate import check_same_tokenizer

    model_dir = Path(tokenizer) if tokenizer is not None else Path(getattr(view.config, "_name_or_path", "") or ".")
    if path.is_dir() and model_dir.is_dir():
        check_same_tokenizer(model_dir, path)
    calib = calibration_batches(view, path, tokens=tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                label=label, tokenizer=tokenizer)
    return calib.batches


def _check_context(view: ModelView, batches: list[torch.Tensor], what: str) -> None:
    """Refuse sequences longer than the model's context (``max_position_embeddings``)."""
    context = getattr(view.config, "max_position_embeddings", None)
    longest = max(int(b.shape[-1]) for b in batches)
    if isinstance(context, int) and longest > context:
        raise MoelabError(f"{what}: a sequence of {longest} tokens, but the model's context is {context} "
                          "tokens (max_position_embeddings); lower seq_len (--seq-len)")


def _run(view: ModelView, batches: list[torch.Tensor], progress: bool) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Token ids and per-layer routing (after edits) of the batches, through the one runner."""
    from moelab.trace.progress import token_progress

    seen: dict[int, list[np.ndarray]] = {b.layer: [] for b in view.blocks}
    toks: list[np.ndarray] = []

    def on_event(ev: RoutingEvent) -> None:
        seen[ev.block.layer].append(ev.routing.masked_ids().cpu().numpy().astype(np.int64))

    total = sum(int(b.numel()) for b in batches)
    with token_progress(total, enabled=progress, label="routing") as advance:
        def on_output(ids_BS: torch.Tensor, _out: Any) -> None:
            toks.append(ids_BS.reshape(-1).cpu().numpy().astype(np.int64))
            advance(int(ids_BS.numel()))

        run_batches(view.model, batches, handles=[b.register_routing_hook(on_event) for b in view.blocks],
                    on_output=on_output, use_cache=False)
    return np.concatenate(toks), {layer: np.concatenate(v) for layer, v in seen.items()}


def gather_routing(model: Any, source: Any, *, tokens: int = 16384, seq_len: int = 256, batch_size: int = 8,
                   seed: int = 0, label: str | None = None, tokenizer: str | os.PathLike | None = None,
                   progress: bool = False) -> Routed:
    """The routing of ``model`` (a model, view or checkpoint dir) over ``source`` (see the module
    docstring), at most ``tokens`` tokens. Raises :class:`moelab.errors.MoelabError` on bad input."""
    if not isinstance(tokens, int) or tokens < 1:
        raise MoelabError(f"tokens: expected a positive integer, got {tokens!r}")
    view = as_view(model)
    if not view.blocks:
        raise MoelabError("model: it has no MoE layers to steer")
    from moelab.trace import Trace

    if isinstance(source, Trace) or (isinstance(source, (str, os.PathLike)) and _is_trace_dir(Path(source))):
        return _from_trace(view, source, tokens, label)
    if isinstance(source, str):
        raise CorpusError(f"{source!r}: a single string is ambiguous; pass pathlib.Path(...) for a corpus "
                          "or [text] for one prompt")
    if isinstance(source, os.PathLike):
        path = Path(source)
        if not path.exists():
            raise CorpusError(f"{path} does not exist (expected a corpus, a trace or prompts)")
        batches = _corpus_batches(view, path, tokens, seq_len, batch_size, seed, label, tokenizer)
        desc = {"kind": "corpus", "path": str(path), "label": label, "split": "train" if is_moelab_corpus(path)
                else None, "seed": seed}
    elif isinstance(source, (list, tuple, np.ndarray, torch.Tensor)):
        if len(source) == 0:
            raise CorpusError("the prompt list is empty")
        if label is not None:
            raise MoelabError("label: only a corpus path or a trace has labels; prompts are used whole")
        batches = _prompt_batches(view, list(source), seq_len, tokens, tokenizer)
        desc = {"kind": "prompts", "count": len(source)}
    else:
        raise CorpusError(f"expected a corpus path, a trace, or a list of prompts, got {type(source).__name__}")
    _check_context(view, batches, "prompts" if desc["kind"] == "prompts" else "seq_len")
    token_ids, ids = _run(view, batches, progress)
    desc["tokens"] = int(token_ids.shape[0])
    return Routed(token_ids, ids, {b.layer: b.num_experts for b in view.blocks},
                  {b.layer: b.top_k for b in view.blocks}, desc)


__all__ = ["Routed", "gather_routing"]
