"""Measure the offloading runtime: decode a stream of tokens one at a time and count what the cache did.

Shape legend: T tokens decoded.

:func:`decode_bench` opens a checkpoint with :func:`moelab.offload.offload_model`, decodes ``T``
tokens of a corpus split teacher-forced (one token per forward, with the KV cache, as
``generate()`` does after the prompt) and returns hits, misses, bytes read (per token), peak
resident expert bytes and tokens/s, optionally against the fully resident model in the same loop
(``resident=True``). ``policy="predictive"`` trains an :mod:`moelab.offload.predictor` first on
the corpus' train split (the predictor's own pass is not counted). ``moelab offload bench`` is a
thin command over it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.errors import MoelabError


@dataclass(frozen=True)
class DecodeBenchConfig:
    """What :func:`decode_bench` runs: ``budget`` (as :func:`~moelab.offload.cache.parse_budget`),
    ``policy``, ``tokens`` decoded, ``prefetch``, ``resident`` (also time the resident model),
    ``calib_tokens`` (the predictor's training tokens, for ``policy="predictive"``)."""

    budget: int | float | str = "25%"
    policy: str = "lru"
    tokens: int = 256
    prefetch: bool = False
    resident: bool = False
    calib_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.calib_tokens < 1:
            raise MoelabError(f"tokens and calib_tokens: expected >= 1, got {self.tokens}, {self.calib_tokens}")


def split_texts(corpus: Path, split: str = "test") -> list[str]:
    """The documents of a ``moelab data build`` corpus' split, its domains interleaved one
    document at a time (so a stream visits every domain)."""
    from moelab.data.corpus import read_split
    from moelab.data.sources import DOMAINS

    by_domain = [read_split(corpus, d, split) for d in DOMAINS]
    out = []
    for i in range(max(len(d) for d in by_domain)):
        out.extend(d[i].text for d in by_domain if i < len(d))
    return out


def stream_ids(model_dir: Path, texts: list[str], tokens: int) -> torch.Tensor:
    """``[1, tokens]`` ids of ``texts`` concatenated, with the model's tokenizer."""
    from moelab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir, "offload bench needs the model's tokenizer to read the corpus")
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text).ids)
        if len(ids) >= tokens:
            break
    if len(ids) < tokens:
        raise MoelabError(f"tokens: the corpus holds only {len(ids)} tokens, asked for {tokens}")
    return torch.tensor(ids[:tokens]).unsqueeze(0)


def decode_stream(model: torch.nn.Module, ids_1T: torch.Tensor, advance=None) -> float:
    """Teacher-forced decode of ``ids_1T`` one token per forward (KV cache); tokens/s."""
    from transformers import DynamicCache

    cache = DynamicCache()
    device = next(p for p in model.parameters() if not p.is_meta).device
    ids_1T = ids_1T.to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in range(ids_1T.shape[1]):
            model(ids_1T[:, t:t + 1], cache=cache, use_cache=True)
            if advance is not None:
                advance(1)
    return ids_1T.shape[1] / (time.perf_counter() - t0)


def decode_bench(path: str | Path, config: DecodeBenchConfig | None = None, *, corpus: Path | None = None,
                 predictor: Any = None, progress: bool = False) -> dict:
    """Decode ``config.tokens`` tokens of ``corpus``'s test split (default: the shipped corpus)
    through the offloaded checkpoint at ``path``; the measured counts (module docstring)."""
    from moelab.data import default_corpus
    from moelab.offload import offload_model
    from moelab.trace.progress import token_progress

    cfg = config or DecodeBenchConfig()
    path, corpus = Path(path), Path(corpus) if corpus is not None else Path(default_corpus())
    ids = stream_ids(path, split_texts(corpus, "test"), cfg.tokens)
    if cfg.policy == "predictive" and predictor is None:
        predictor = fit_predictor(path, corpus, cfg.calib_tokens, budget=cfg.budget)
    model, experts = offload_model(path, budget=cfg.budget, policy=cfg.policy, prefetch=cfg.prefetch,
                                   predictor=predictor)
    try:
        with token_progress(cfg.tokens, enabled=progress, label="decoding") as advance:
            speed = decode_stream(model, ids, advance)
        s = experts.stats()
        q = experts.prefetcher.quality if experts.prefetcher is not None else None
    finally:
        experts.close()
    out = {"model": str(path), "policy": cfg.policy, "prefetch": cfg.prefetch, "tokens": cfg.tokens,
           **s.as_dict(), "bytes_read_per_token": s.bytes_read / cfg.tokens, "tokens_per_s": speed,
           "prefetch_precision": q.precision if q else None, "prefetch_recall": q.recall if q else None}
    if cfg.resident:
        from moelab.models import open_model

        out["resident_tokens_per_s"] = decode_stream(open_model(path, experts_implementation="moelab").model, ids)
    return out


def best_predictor_config(num_layers: int) -> Any:
    """The predictor that gave the best online hit rate in ``bench/offload.py --part predictor``
    (docs/results/offload.md): MLP heads to every later layer and the next 4 tokens, scored hints."""
    from moelab.offload.predictor import PredictorConfig

    return PredictorConfig(horizon=num_layers, next_token=True, tokens_ahead=4, hint="scores",
                           score_discount=0.7, hidden=256, weight_decay=1e-4)


def fit_predictor(path: Path, corpus: Path, tokens: int, config: Any = None,
                  budget: int | float | str = 1.0, progress: bool = False):
    """An :class:`~moelab.offload.predictor.ExpertPredictor` trained on ``tokens`` tokens of
    ``corpus``'s train split, routed through the checkpoint opened offloaded within ``budget`` (so
    a model bigger than memory can be calibrated too); ``config`` defaults to
    :func:`best_predictor_config`."""
    from moelab.compress.calib import calibration_batches
    from moelab.offload import offload_model
    from moelab.offload.predictor import collect_routes, head_count, train_predictor
    from moelab.trace.fingerprint import model_fingerprint
    from moelab.trace.progress import token_progress

    _, experts = offload_model(path, budget=budget)
    try:
        fingerprint = model_fingerprint(experts.view)
        seq_len = min(256, int(getattr(experts.view.config, "max_position_embeddings", 256) or 256))
        routes = collect_routes(experts.view, calibration_batches(experts.view, corpus, tokens=tokens,
                                                                  seq_len=seq_len))
    finally:
        experts.close()
    cfg = config or best_predictor_config(len(routes.layers))
    with token_progress(head_count(routes, cfg), enabled=progress, label="training", unit="heads") as advance:
        predictor = train_predictor(routes, cfg, progress=advance)
    predictor.fingerprint = fingerprint  # what save_predictor records
    return predictor


__all__ = ["DecodeBenchConfig", "best_predictor_config", "decode_bench", "decode_stream", "fit_predictor", "split_texts",
           "stream_ids"]
