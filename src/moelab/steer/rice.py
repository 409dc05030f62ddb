"""RICE: the experts most tied to marker tokens by nPMI, reinforced by scaling their combine weights.

RICE (Wang et al. 2025, "Two Experts Are All You Need for Steering Thinking: Reinforcing Cognitive
Effort in MoE Reasoning Models Without Additional Training", arXiv 2505.14681) finds "cognitive
experts" by normalised pointwise mutual information between a marker token (``<think>``) and each
expert's activation, over the tokens of some text::

    x = "expert e is among the token's chosen experts",  y = "the token is a marker"
    nPMI(x, y) = log2(p(x, y) / (p(x) p(y))) / -log2 p(x, y)          in [-1, 1]

(:func:`moelab.analysis.npmi.npmi`), keeps the top experts of each layer (RICE: 2) and multiplies
their routing weights by a factor (``w_tk *= factor`` for those experts,
:func:`moelab.steer.scale_weights`; RICE's factor is not verified here, the default is 2). The same
ranking can switch the experts off or on (a steering file's mode). The routing is the one the experts
received, after any edit on the model.

Markers are token ids, or strings tokenized with the model's tokenizer: each string as written and
with a leading space (how a word inside text is usually tokenized); every token of either encoding is
a marker. Beside nPMI, each row carries the rates ``p(x | marker)``, ``p(x | not marker)`` and the
risk-difference confidence of :mod:`moelab.steer.detect` on that 2x2 table.

Shape legend: N tokens, K slots per token, E experts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from moelab.analysis.npmi import npmi
from moelab.errors import MoelabError
from moelab.steer.detect import Detection, ExpertScore, gather_pair, risk_difference
from moelab.steer.edit_kit import EditHandle
from moelab.steer.edits import scale_weights
from moelab.steer.gather import Routed, gather_routing
from moelab.trace.fingerprint import as_view

RICE_TOP = 2  # "two experts are all you need": the top two per layer
RICE_FACTOR = 2.0


def marker_token_ids(model: Any, markers: Iterable[str | int], tokenizer: str | os.PathLike | None = None
                     ) -> np.ndarray:
    """Sorted unique token ids of ``markers`` (ids kept, strings tokenized; see the module docstring)."""
    from moelab.trace.corpus import TextTokenizer
    from moelab.trace.inputs import tokenizer_dir

    view = as_view(model)
    markers = list(markers)
    if not markers:
        raise MoelabError("markers: give at least one marker token or string")
    vocab = getattr(view.config, "vocab_size", None)
    ids = [m for m in markers if isinstance(m, (int, np.integer)) and not isinstance(m, bool)]
    texts = [m for m in markers if isinstance(m, str)]
    if len(ids) + len(texts) != len(markers):
        raise MoelabError("markers: expected token ids (int) or strings")
    if texts:
        tok = TextTokenizer(tokenizer_dir(view, tokenizer))
        for enc in tok.encode(texts + [" " + t for t in texts]):
            ids += enc
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise MoelabError(f"markers: token ids {bad[:5]} are not in the model's vocabulary [0, {vocab})")
    if not ids:
        raise MoelabError(f"markers: {texts} tokenize to no token")
    return np.unique(np.asarray(ids, dtype=np.int64))


def concat_routed(parts: list[Routed]) -> Routed:
    """The tokens of several routings of one model, in order."""
    first = parts[0]
    for p in parts[1:]:
        if p.num_experts != first.num_experts:
            raise MoelabError("routing of different models cannot be joined")
    return Routed(np.concatenate([p.token_ids_N for p in parts]),
                  {layer: np.concatenate([p.ids[layer] for p in parts]) for layer in first.ids},
                  dict(first.num_experts), dict(first.top_k), {"parts": [p.source for p in parts]})


def rank_npmi(routed: Routed, marker_ids: np.ndarray) -> Detection:
    """Every (layer, expert) ranked by nPMI with the marker tokens (highest first)."""
    is_marker = np.isin(routed.token_ids_N, marker_ids)
    n_mark = int(is_marker.sum())
    if n_mark == 0:
        raise MoelabError(f"markers: none of the marker tokens {marker_ids[:10].tolist()} occurs in the text")
    if n_mark == routed.num_tokens:
        raise MoelabError("markers: every token of the text is a marker; nPMI needs tokens of both kinds")
    rows = []
    for layer, E in routed.num_experts.items():
        ids = routed.ids[layer]
        score_E = npmi(ids, is_marker, E)[0]
        a_pos = np.bincount(ids[is_marker][ids[is_marker] >= 0], minlength=E)
        a_neg = np.bincount(ids[~is_marker][ids[~is_marker] >= 0], minlength=E)
        s = risk_difference(a_pos, n_mark, a_neg, routed.num_tokens - n_mark)
        rows += [ExpertScore(layer, e, float(s["rate_pos"][e]), float(s["rate_neg"][e]), float(score_E[e]),
                             float(s["z"][e]), float(s["ci_low"][e]), float(s["ci_high"][e])) for e in range(E)]
    rows.sort(key=lambda r: (-r.score, -r.z, r.layer, r.expert))
    return Detection("rice", rows, dict(routed.num_experts), dict(routed.top_k),
                     {"marker": n_mark, "other": routed.num_tokens - n_mark}, {"text": routed.source})


def detect_rice(model: Any, source: Any, markers: Iterable[str | int], *, negative: Any = None,
                label: str | None = None, negative_label: str | None = None, tokens: int = 16384,
                seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                tokenizer: str | os.PathLike | None = None, progress: bool = False) -> Detection:
    """RICE's ranking over the routing of ``model`` on ``source`` (and ``negative``, joined after it:
    contrasting text gives the markers non-markers to stand out from), ``tokens`` per source."""
    marker_ids = marker_token_ids(model, markers, tokenizer)
    gather = dict(tokens=tokens, seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress)
    if negative is None:
        routed = gather_routing(model, source, label=label, **gather)
    else:
        routed = concat_routed(list(gather_pair(model, source, negative, positive_label=label,
                                                negative_label=negative_label, **gather)))
    det = rank_npmi(routed, marker_ids)
    det.sources["markers"] = marker_ids.tolist()
    return det


def cognitive_experts(det: Detection, top: int = RICE_TOP) -> dict[int, list[int]]:
    """RICE's pick: the ``top`` experts of each layer with a positive nPMI."""
    return det.select(top, "scale", per_layer=True)


def reinforce(model: Any, experts: Mapping[int, Iterable[int]], factor: float = RICE_FACTOR) -> EditHandle:
    """Multiply the combine weights of ``experts`` (``{layer: [e]}``) by ``factor`` (RICE)."""
    return scale_weights(as_view(model), {layer: {int(e): factor for e in ids} for layer, ids in experts.items()})


__all__ = ["RICE_FACTOR", "RICE_TOP", "cognitive_experts", "concat_routed", "detect_rice", "marker_token_ids",
           "rank_npmi", "reinforce"]
