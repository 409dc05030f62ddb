"""RICE: nPMI ranking against the slow reference of moelab.analysis, marker tokenization, and
reinforcement equal to scale_weights."""

import numpy as np
import pytest
import torch

from moelab.analysis.npmi import npmi_reference
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.steer.gather import Routed
from moelab.steer.rice import cognitive_experts, detect_rice, marker_token_ids, rank_npmi, reinforce


def _routed(rng, n=400, E=6, K=2, layers=(0, 2)):
    tokens = rng.integers(0, 20, n)
    ids = {}
    for layer in layers:
        rows = np.stack([rng.choice(E, size=K, replace=False) for _ in range(n)])
        rows[tokens < 3, 0] = 4 if layer == 0 else 1  # markers (ids 0..2) go to one expert
        rows[rows[:, 1] == rows[:, 0], 1] = 5 if layer == 0 else 2
        ids[layer] = rows.astype(np.int64)
    return Routed(tokens, ids, {layer: E for layer in layers}, {layer: K for layer in layers})


def test_npmi_ranking_equals_the_reference_and_finds_the_marker_experts():
    rng = np.random.default_rng(0)
    routed = _routed(rng)
    det = rank_npmi(routed, np.array([0, 1, 2]))
    mask = np.isin(routed.token_ids_N, [0, 1, 2])
    for r in det.rows:
        want = npmi_reference(routed.ids[r.layer], mask, r.expert)
        assert abs(r.score - want) <= 1e-12, r
        assert abs(r.rate_pos - (routed.ids[r.layer][mask] == r.expert).any(1).mean()) <= 1e-12
    assert cognitive_experts(det, 1) == {0: [4], 2: [1]}
    with pytest.raises(MoelabError, match="none of the marker tokens"):
        rank_npmi(routed, np.array([99]))


def test_detect_rice_on_a_tiny_model_and_reinforce_scales_weights(tmp_path, assert_scaled):
    view = open_model(tiny_model("OLMoE"))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 64, (24,), generator=g).tolist() for _ in range(4)]
    det = detect_rice(view, docs, [int(docs[0][0]), int(docs[1][3])])
    assert det.method == "rice" and len(det.rows) == sum(b.num_experts for b in view.blocks)
    picked = cognitive_experts(det)
    assert all(len(v) <= 2 for v in picked.values())
    b = view.blocks[0]
    seen = []
    ids = torch.tensor(docs[:1])
    with torch.no_grad():
        with b.register_routing_hook(seen.append):
            view.model(ids)
        with reinforce(view, {b.layer: [1]}, 3.0), b.register_routing_hook(seen.append):
            view.model(ids)
    assert_scaled(seen[0], seen[1], 1, 3.0, rtol=1e-6)


def test_marker_strings_use_the_model_tokenizer():
    from moelab.data import default_model

    model_dir = default_model()
    ids = marker_token_ids(str(model_dir), ["ROMEO", 7])
    assert 7 in ids and len(ids) >= 2
    with pytest.raises(MoelabError, match="not in the model's vocabulary"):
        marker_token_ids(str(model_dir), [10**6])
    with pytest.raises(MoelabError, match="at least one marker"):
        marker_token_ids(str(model_dir), [])
