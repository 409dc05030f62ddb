"""Synthetic routing traces with known structure: null models for tests and benchmarks.

Shape legend: N tokens, L layers, K top-k slots, E experts, D labels, V vocabulary.

Each token picks its top-k experts from logits that add, with the given strengths, (a) a preference
of its sequence's label (domain specialisation), (b) a bias shared by every ``segment`` consecutive
tokens of a sequence (local routing consistency), (c) a bias of its token id (vocabulary
specialisation) and (d) Gumbel noise, so top-k is a sample without replacement. All strengths 0
gives uniformly random routing. ``act_out_max`` is log-normal, with rare 100x outliers planted on
the ``super_experts`` (layer, expert) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._inputs import AnalysisInputError
from moelab.analysis.headline import ArrayTrace

_CHUNK = 1 << 17  # tokens generated at a time, to bound the [chunk, E] logits


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    num_tokens: int = 1 << 20
    num_layers: int = 8
    num_experts: int = 64
    top_k: int = 8
    seq_len: int = 512
    num_labels: int = 4
    vocab_size: int = 4096
    segment: int = 32
    label_strength: float = 1.0
    segment_strength: float = 1.5
    token_strength: float = 1.0
    super_experts: tuple[tuple[int, int], ...] = ((1, 5), (2, 17))
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.num_tokens, self.num_layers, self.seq_len, self.num_labels, self.segment) < 1:
            raise AnalysisInputError(f"SyntheticConfig: sizes must be >= 1, got {self}")
        if not 1 <= self.top_k <= self.num_experts:
            raise AnalysisInputError(f"SyntheticConfig: need 1 <= top_k <= num_experts, got {self}")


def _layer_ids(cfg: SyntheticConfig, rng: np.random.Generator, seq: np.ndarray, labels: np.ndarray,
               tokens: np.ndarray) -> np.ndarray:
    e = cfg.num_experts
    label_pref = rng.normal(size=(cfg.num_labels, e)).astype(np.float32) * cfg.label_strength
    token_pref = rng.normal(size=(cfg.vocab_size, e)).astype(np.float32) * cfg.token_strength
    pos = np.arange(cfg.num_tokens) - np.repeat(np.arange(0, cfg.num_tokens, cfg.seq_len), cfg.seq_len)[: cfg.num_tokens]
    block = seq * (cfg.seq_len // cfg.segment + 1) + pos // cfg.segment
    block_pref = rng.normal(size=(int(block.max()) + 1, e)).astype(np.float32) * cfg.segment_strength
    ids = np.empty((cfg.num_tokens, cfg.top_k), dtype=np.int16)
    for lo in range(0, cfg.num_tokens, _CHUNK):  # loop over chunks of tokens, not tokens
        sl = slice(lo, lo + _CHUNK)
        gumbel = -np.log(-np.log(rng.random((len(tokens[sl]), e), dtype=np.float32) + 1e-12) + 1e-12)
        logits = label_pref[labels[sl]] + block_pref[block[sl]] + token_pref[tokens[sl]] + gumbel
        ids[sl] = np.argpartition(-logits, cfg.top_k - 1, axis=1)[:, : cfg.top_k]
    return ids


def synthetic_trace(cfg: SyntheticConfig | None = None, with_act_max: bool = True) -> ArrayTrace:
    """A synthetic :class:`ArrayTrace` (see the module docstring)."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    seq = np.arange(cfg.num_tokens) // cfg.seq_len
    labels = rng.integers(0, cfg.num_labels, int(seq[-1]) + 1)[seq].astype(np.int32)
    zipf = 1.0 / np.arange(1, cfg.vocab_size + 1)
    tokens = rng.choice(cfg.vocab_size, cfg.num_tokens, p=zipf / zipf.sum()).astype(np.int32)
    ids, weights, act = {}, {}, {}
    for layer in range(cfg.num_layers):
        ids[layer] = _layer_ids(cfg, rng, seq, labels, tokens)
        w = rng.random(ids[layer].shape, dtype=np.float32)
        weights[layer] = w / w.sum(axis=1, keepdims=True)
        if with_act_max:
            a = rng.lognormal(0.0, 0.5, ids[layer].shape).astype(np.float32)
            for sl, se in cfg.super_experts:
                if sl == layer:
                    rare = (ids[layer] == se) & (rng.random(ids[layer].shape) < 0.01)
                    a[rare] *= 100.0
            act[layer] = a
    return ArrayTrace(
        ids_by_layer=ids, num_experts=cfg.num_experts, weights_by_layer=weights, seq_ids=seq.astype(np.int32),
        token_ids=tokens, labels=labels, label_names=[f"domain{d}" for d in range(cfg.num_labels)],
        act_out_max_by_layer=act if with_act_max else None,
    )
