"""Normalised pointwise mutual information between an expert's activation and a token class.

RICE (Wang et al. 2025, "Two Experts Are All You Need for Steering Thinking: Reinforcing Cognitive
Effort in MoE Reasoning Models Without Additional Training", arXiv 2505.14681) ranks experts by nPMI
with the thinking tokens ("<think>") and calls the top two per layer "cognitive experts". The
formula (Bouma 2009, "Normalized (pointwise) mutual information in collocation extraction"):

    x = "expert e is among the token's chosen experts",  y = "the token belongs to class c"
    PMI(x, y)  = log2 p(x, y) / (p(x) p(y))
    nPMI(x, y) = PMI(x, y) / -log2 p(x, y)      in [-1, 1]

with probabilities over the N tokens. nPMI = 1: e fires exactly on the class; 0: independent;
-1: never together (p(x, y) = 0, by convention). Where p(x, y) = 1 the value is 1. RICE's exact
token set (prompt vs generated tokens) was read from a third-party summary, not verified.

Shape legend: N tokens, K top-k slots, E experts, D classes.
"""

from __future__ import annotations

import numpy as np

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError, check_ids, check_labels


def _class_codes(classes_N: np.ndarray, num_tokens: int, class_names: list[str] | None) -> tuple[np.ndarray, int]:
    """Class code per token (-1 = in no class) and the number of classes D."""
    c = np.asarray(classes_N)
    if c.dtype == bool:
        if c.shape != (num_tokens,):
            raise AnalysisInputError(f"classes_N has shape {c.shape}, expected ({num_tokens},)")
        return np.where(c, 0, -1), 1
    labels, names = check_labels(c, num_tokens, class_names, "npmi")
    return labels, len(names)


def npmi(ids_NK: np.ndarray, classes_N: np.ndarray | None, num_experts: int,
         class_names: list[str] | None = None) -> np.ndarray:
    """``npmi_DE[d, e]`` between "e chosen" and "token in class d".

    ``classes_N``: integer class codes 0..D-1 (labels, token classes) or a boolean mask (D = 1).
    """
    ids = check_ids(ids_NK, num_experts)
    n = ids.shape[0]
    if classes_N is None:
        check_labels(None, n, class_names, "npmi")  # raises MissingLabelsError
    code, num_classes = _class_codes(classes_N, n, class_names)
    valid = (ids >= 0) & (code[:, None] >= 0)
    # the ids of a token are distinct, so "tokens with e chosen and in class d" = such slots
    codes = np.broadcast_to(code[:, None], ids.shape)[valid] * num_experts + ids[valid]
    p_xy = np.bincount(codes, minlength=num_classes * num_experts).reshape(num_classes, num_experts) / n
    p_x = np.bincount(ids[ids >= 0], minlength=num_experts) / n
    p_y = np.bincount(code[code >= 0], minlength=num_classes) / n
    if (p_y == 0).all():
        raise EmptySelectionError("npmi: no token belongs to any class")
    return _npmi_from_probs(p_xy, p_x[None, :], p_y[:, None])


def _npmi_from_probs(p_xy: np.ndarray, p_x: np.ndarray, p_y: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log2(p_xy / (p_x * p_y))
        out = pmi / -np.log2(p_xy)
    out = np.where(p_xy == 0, -1.0, out)
    return np.where(p_xy == 1, 1.0, out)


def npmi_reference(ids_NK: np.ndarray, mask_N: np.ndarray, expert: int) -> float:
    """Slow obvious nPMI of one expert with one boolean class mask."""
    ids = np.asarray(ids_NK).reshape(len(ids_NK), -1)
    n = len(ids)
    x = [expert in set(int(e) for e in row) for row in ids]
    y = [bool(v) for v in mask_N]
    n_xy = sum(a and b for a, b in zip(x, y, strict=False))
    if n_xy == 0:
        return -1.0
    if n_xy == n:
        return 1.0
    p_xy, p_x, p_y = n_xy / n, sum(x) / n, sum(y) / n
    return float(np.log2(p_xy / (p_x * p_y)) / -np.log2(p_xy))


def top_experts(npmi_DE: np.ndarray, top: int = 2) -> np.ndarray:
    """The ``top`` experts by nPMI for each class ``[D, top]`` (RICE's "cognitive experts": top 2)."""
    scores = np.atleast_2d(npmi_DE)
    return np.argsort(-scores, axis=1, kind="stable")[:, :top]
