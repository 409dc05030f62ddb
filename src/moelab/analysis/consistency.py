"""Local routing consistency: Segment Routing best Performance (SRP).

Liang et al. 2025, "Not All Models Suit Expert Offloading: On Local Routing Consistency of
Mixture-of-Expert Models" (arXiv 2505.16056); definitions as coded in github.com/ljcleo/moe-lrc
(``src/30_srp_calc.py``, ``src/31_srp_refine.py``). SCH, the cache counterpart, is in
:mod:`moelab.analysis.cache`.

Shape legend: N tokens, K top-k slots, E experts, W windows, M = m + 1 thresholds.

For a segment length m, every run of m consecutive tokens inside one sequence is a window (stride
1; windows never cross a sequence boundary). Let ``c[w, e]`` be how many of the window's tokens
chose expert e. For a threshold tau in 0..m, predict the window's expert set as
``P_tau(w) = {e : c[w, e] >= tau}``; then over all windows

    matches(tau)   = sum_w sum_{e in P_tau(w)} c[w, e]
    predicted(tau) = sum_w m * |P_tau(w)|
    actual         = sum_w sum_e c[w, e]            (= W * m * K when no slot is -1)
    F1(tau)        = 2 * matches(tau) / max(predicted(tau) + actual, 1)
    SRP            = max_tau F1(tau)

i.e. the best F1 a segment-level prediction "these experts serve the whole segment" can reach.
Per expert, the same sums restricted to one e give ``srp_E`` (moe-lrc's expert-level table); its
``act_r`` is ``activation_rate_E = actual_e / (W * m)``. Closed forms: SRP = 1 for m = 1, and
SRP = 1 for any m on a trace that repeats one expert set. moe-lrc also reports a bootstrap
confidence interval over samples; moelab reports the point value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._inputs import (
    AnalysisInputError,
    EmptySelectionError,
    check_ids,
    check_seq_ids,
)

_BLOCK_TOKENS = 1 << 16  # sequences are grouped into blocks of about this many tokens


@dataclass(frozen=True)
class SegmentRouting:
    """SRP of one layer at one segment length."""

    seg_len: int
    srp: float  # best F1 over thresholds
    best_threshold: int
    f1_M: np.ndarray  # F1 at each threshold 0..m
    srp_E: np.ndarray  # per-expert best F1 (0 for experts never chosen)
    activation_rate_E: np.ndarray
    num_windows: int


def window_count_histograms(ids_NK: np.ndarray, num_experts: int, seg_lens: tuple[int, ...],
                            seq_ids_N: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """For each m in ``seg_lens``, ``hist_EM[e, c]`` = number of m-token windows in which expert e was
    chosen c times. The ids of one token are assumed distinct (as top-k routing gives)."""
    ids = check_ids(ids_NK, num_experts)
    seg_lens = tuple(int(m) for m in seg_lens)
    if not seg_lens or min(seg_lens) < 1:
        raise AnalysisInputError(f"seg_lens must be a non-empty list of lengths >= 1, got {seg_lens}")
    starts = check_seq_ids(seq_ids_N, ids.shape[0])
    hists = {m: np.zeros(num_experts * (m + 1), dtype=np.int64) for m in seg_lens}
    lo_seq = 0
    while lo_seq < len(starts) - 1:  # loop over blocks of whole sequences
        hi_seq = int(np.searchsorted(starts, starts[lo_seq] + _BLOCK_TOKENS, side="right")) - 1
        hi_seq = max(hi_seq, lo_seq + 1)
        _add_block(hists, ids, starts[lo_seq:hi_seq + 1], num_experts)
        lo_seq = hi_seq
    return {m: h.reshape(num_experts, m + 1) for m, h in hists.items()}


def _add_block(hists: dict[int, np.ndarray], ids: np.ndarray, starts: np.ndarray, num_experts: int) -> None:
    lo, hi = int(starts[0]), int(starts[-1])
    n, pad = hi - lo, max(hists)
    onehot = np.zeros((num_experts + 1, n), dtype=np.uint8)  # expert-major: cumsum runs contiguous
    onehot[ids[lo:hi], np.arange(n)[:, None]] = 1  # -1 slots land in the last row, dropped below
    cum = np.zeros((num_experts, n + 1 + pad), dtype=np.int32)  # cum[:, i] = uses before token i
    np.cumsum(onehot[:num_experts], axis=1, out=cum[:, 1:n + 1])
    cum[:, n + 1:] = cum[:, n:n + 1]
    lens = np.diff(starts)
    offset_E = (np.arange(num_experts, dtype=np.int32))[:, None]
    for m, hist in hists.items():
        if (lens == lens[0]).all():  # equal lengths: windows of each sequence by reshaping
            s_dim, t_dim = len(lens), int(lens[0])
            w = max(t_dim - m + 1, 0)
            first = cum[:, :n].reshape(num_experts, s_dim, t_dim)[:, :, :w]
            last = cum[:, m:n + m].reshape(num_experts, s_dim, t_dim)[:, :, :w]
            counts = (last - first).reshape(num_experts, -1)
        else:  # a window starting at local i is valid if it ends inside the sequence holding i
            seq_end = np.repeat(starts[1:] - lo, lens)
            valid = np.arange(n) + m <= seq_end
            counts = (cum[:, m:n + m] - cum[:, :n])[:, valid]
        hist += np.bincount((counts + offset_E * (m + 1)).ravel(), minlength=hist.size)


def _f1_from_histogram(hist_EM: np.ndarray, seg_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-expert (matches, predicted) at every threshold ``[E, M]`` and actual ``[E]``."""
    c = np.arange(seg_len + 1)
    matches = np.cumsum((hist_EM * c)[:, ::-1], axis=1)[:, ::-1]  # sum over counts >= tau
    predicted = seg_len * np.cumsum(hist_EM[:, ::-1], axis=1)[:, ::-1]
    return matches, predicted, matches[:, 0]


def segment_routing(ids_NK: np.ndarray, num_experts: int, seg_lens: tuple[int, ...] = (4, 16, 64, 256),
                    seq_ids_N: np.ndarray | None = None) -> list[SegmentRouting]:
    """SRP of one layer for windows of each length in ``seg_lens`` (see the module docstring)."""
    out = []
    for m, hist in window_count_histograms(ids_NK, num_experts, seg_lens, seq_ids_N).items():
        num_windows = int(hist[0].sum())
        if num_windows == 0:
            raise EmptySelectionError(f"no sequence has {m} tokens, so there is no window to score")
        matches, predicted, actual = _f1_from_histogram(hist, m)
        f1 = 2 * matches.sum(0) / np.maximum(predicted.sum(0) + actual.sum(), 1)
        f1_e = 2 * matches / np.maximum(predicted + actual[:, None], 1)
        out.append(SegmentRouting(
            seg_len=m, srp=float(f1.max()), best_threshold=int(f1.argmax()), f1_M=f1,
            srp_E=f1_e.max(axis=1), activation_rate_E=actual / (num_windows * m), num_windows=num_windows,
        ))
    return out


def segment_routing_reference(ids_NK: np.ndarray, num_experts: int, seg_len: int,
                              seq_ids_N: np.ndarray | None = None) -> SegmentRouting:
    """Slow obvious :func:`segment_routing`: loops over windows, thresholds and experts."""
    ids = np.asarray(ids_NK).reshape(len(ids_NK), -1)
    seq = np.zeros(len(ids), dtype=np.int64) if seq_ids_N is None else np.asarray(seq_ids_N)
    windows = []
    for i in range(len(ids) - seg_len + 1):
        if all(seq[i + j] == seq[i] for j in range(seg_len)):
            c = [0] * num_experts
            for row in ids[i:i + seg_len]:
                for e in row:
                    if e >= 0:
                        c[int(e)] += 1
            windows.append(c)
    m_all = np.zeros((num_experts, seg_len + 1))
    p_all = np.zeros((num_experts, seg_len + 1))
    for c in windows:
        for e in range(num_experts):
            for tau in range(seg_len + 1):
                if c[e] >= tau:
                    m_all[e, tau] += c[e]
                    p_all[e, tau] += seg_len
    act = m_all[:, 0]
    f1 = np.array([2 * m_all[:, t].sum() / max(p_all[:, t].sum() + act.sum(), 1) for t in range(seg_len + 1)])
    f1_e = np.array([[2 * m_all[e, t] / max(p_all[e, t] + act[e], 1) for t in range(seg_len + 1)]
                     for e in range(num_experts)])
    return SegmentRouting(seg_len=seg_len, srp=float(f1.max()), best_threshold=int(f1.argmax()), f1_M=f1,
                          srp_E=f1_e.max(axis=1), activation_rate_E=act / (len(windows) * seg_len),
                          num_windows=len(windows))
