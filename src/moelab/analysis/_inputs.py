"""Checks shared by the analysis functions: shapes, dtypes, ranges, and the errors they raise.

Shape legend: N tokens, K top-k slots, E experts, D labels (domains), V vocabulary.

Every measurement takes plain numpy arrays. A routing slot holding ``-1`` was routed to no expert
(dropped token, null expert, dynamic top-p with fewer than K experts) and is ignored everywhere.
"""

from __future__ import annotations

import numpy as np

from moelab.errors import MoelabError, TraceError

# the `moelab trace` flag that records each optional per-layer field
TRACE_FLAGS: dict[str, str] = {
    "logits": "--logits",
    "expert_norms": "--expert-norms",
    "act_max": "--act-max",
    "hidden_norm": "--hidden-norm",
}


class AnalysisInputError(MoelabError, ValueError):
    """An argument has the wrong shape, dtype or range; the message names the argument."""


class EmptySelectionError(AnalysisInputError):
    """The selection (tokens, layers, labels) a measurement was asked for is empty."""


class MissingLabelsError(AnalysisInputError):
    """A per-label (per-domain) measurement was called on a trace without labels."""


class MissingFieldError(TraceError):
    """The trace lacks an optional field that a measurement needs."""

    def __init__(self, field: str, measurement: str):
        flag = TRACE_FLAGS.get(field)
        how = f"; record it with `moelab trace {flag}`" if flag else ""
        super().__init__(f"{measurement} needs the trace field {field!r}, which this trace lacks{how}")
        self.field = field


def check_ids(ids_NK: np.ndarray, num_experts: int, name: str = "ids_NK") -> np.ndarray:
    """Validate expert ids ``[N, K]`` (int, -1 = no expert) and return them as a 2-D int64 array."""
    if num_experts < 1:
        raise AnalysisInputError(f"num_experts must be >= 1, got {num_experts}")
    ids = np.asarray(ids_NK)
    if ids.ndim == 1:
        ids = ids[:, None]
    if ids.ndim != 2:
        raise AnalysisInputError(f"{name} must have shape [N, K], got shape {ids.shape}")
    if ids.shape[0] == 0:
        raise EmptySelectionError(f"{name} has no tokens (shape {ids.shape})")
    if not np.issubdtype(ids.dtype, np.integer):
        raise AnalysisInputError(f"{name} must hold integer expert ids, got dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= num_experts:
        raise AnalysisInputError(
            f"{name} holds expert ids in [{lo}, {hi}], expected -1 (no expert) or 0..{num_experts - 1}"
        )
    return ids.astype(np.int64, copy=False)


def check_weights(weights_NK: np.ndarray, ids_NK: np.ndarray, name: str = "weights_NK") -> np.ndarray:
    """Validate routing weights of the same shape as the ids; return float64."""
    w = np.asarray(weights_NK, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    if w.shape != ids_NK.shape:
        raise AnalysisInputError(f"{name} has shape {w.shape}, expected the ids' shape {ids_NK.shape}")
    if not np.isfinite(w).all():
        raise AnalysisInputError(f"{name} holds NaN or infinite values")
    return w


def check_labels(labels_N: np.ndarray | None, num_tokens: int, label_names: list[str] | None,
                 measurement: str) -> tuple[np.ndarray, list[str]]:
    """Validate per-token label codes ``[N]`` (0..D-1) and return them with D names."""
    if labels_N is None:
        raise MissingLabelsError(
            f"{measurement} needs a label (domain) per token; the trace has none "
            "(trace a corpus whose documents carry a label, or pass labels_N)"
        )
    labels = np.asarray(labels_N)
    if labels.shape != (num_tokens,):
        raise AnalysisInputError(f"labels_N has shape {labels.shape}, expected ({num_tokens},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise AnalysisInputError(f"labels_N must hold integer label codes, got dtype {labels.dtype}")
    hi = int(labels.max()) if labels.size else -1
    if labels.size and int(labels.min()) < 0:
        raise AnalysisInputError("labels_N holds negative codes; expected 0..D-1")
    if label_names is None:
        label_names = [str(i) for i in range(hi + 1)]
    if hi >= len(label_names):
        raise AnalysisInputError(f"labels_N holds code {hi} but only {len(label_names)} label names were given")
    return labels.astype(np.int64, copy=False), list(label_names)


def check_seq_ids(seq_ids_N: np.ndarray | None, num_tokens: int) -> np.ndarray:
    """Return the start offset of each sequence ``[S+1]``; tokens of a sequence must be contiguous.

    Without ``seq_ids_N`` the whole trace is one sequence.
    """
    if seq_ids_N is None:
        return np.array([0, num_tokens], dtype=np.int64)
    seq = np.asarray(seq_ids_N)
    if seq.shape != (num_tokens,):
        raise AnalysisInputError(f"seq_ids_N has shape {seq.shape}, expected ({num_tokens},)")
    change = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    starts = np.concatenate([[0], change, [num_tokens]]).astype(np.int64)
    if len(starts) - 1 != len(np.unique(seq)):
        raise AnalysisInputError(
            "seq_ids_N: the tokens of each sequence must be contiguous and in order (a sequence id reappears)"
        )
    return starts


def routed(ids_NK: np.ndarray, *per_slot: np.ndarray) -> list[np.ndarray]:
    """Flatten the expert ids and the given per-slot (``[N, K]``) or per-token (``[N]``) arrays over
    the routed slots (ids >= 0); skips the masking copy when every slot is routed."""
    out = [ids_NK.ravel()]
    full = [np.broadcast_to(a[:, None], ids_NK.shape) if a.ndim == 1 else a for a in per_slot]
    if (ids_NK >= 0).all():
        return out + [a.ravel() for a in full]
    keep = ids_NK >= 0
    return [ids_NK[keep]] + [a[keep] for a in full]
