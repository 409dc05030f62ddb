"""SteerMoE detection: risk difference and its confidence against a slow reference, and the
routing it counts (after edits; live == from a trace).

Tolerances: 1e-12 absolute between the vectorised statistics and the per-expert Python reference.
"""

import numpy as np
import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.steer import experts_off
from moelab.steer.detect import (
    detect_experts,
    rank_risk_difference,
    risk_difference_reference,
)
from moelab.steer.gather import Routed, gather_routing
from moelab.trace import record


def test_risk_difference_equals_the_slow_reference_on_random_routing(random_routed):
    rng = np.random.default_rng(0)
    pos = random_routed(rng, 300, bias=[5, 1, 1, 1, 1, 1])
    neg = random_routed(rng, 200)
    det = rank_risk_difference(pos, neg)
    assert len(det.rows) == 12
    assert [r.score for r in det.rows] == sorted((r.score for r in det.rows), reverse=True)
    for r in det.rows:
        want = risk_difference_reference(pos.ids[r.layer].tolist(), neg.ids[r.layer].tolist(), r.expert)
        assert np.allclose([r.score, r.z, r.ci_low, r.ci_high], want, rtol=0, atol=1e-12), r
        assert r.ci_low <= r.score <= r.ci_high
    assert det.rows[0].expert == 0  # the biased expert leads


def test_constant_routing_has_zero_z():
    ids = {0: np.tile([[0, 1]], (10, 1))}
    r = Routed(np.zeros(10, dtype=np.int64), ids, {0: 3}, {0: 2})
    det = rank_risk_difference(r, r)
    assert all(x.score == 0 and x.z == 0 for x in det.rows)
    with pytest.raises(MoelabError, match="no expert has a positive score"):
        det.select(2)
    with pytest.raises(MoelabError, match="top: expected a positive number"):
        det.select(0)


def test_select_respects_layer_capacity(random_routed):
    rng = np.random.default_rng(1)
    det = rank_risk_difference(random_routed(rng, 400, bias=[8, 8, 8, 1, 1, 1]), random_routed(rng, 400))
    on = det.select(6, "on")
    assert all(len(v) <= 2 for v in on.values())
    off = det.select(20, "off")
    assert all(len(v) <= 4 for v in off.values())
    per = det.select(1, "off", per_layer=True)
    assert sorted(per) == [1, 3] and all(len(v) == 1 for v in per.values())
    with pytest.raises(MoelabError, match="mode: expected one of"):
        det.select(2, "sideways")


@pytest.fixture(scope="module")
def view():
    return open_model(tiny_model("Qwen3-MoE"))


def _docs(seed, n=3, length=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (length,), generator=g).tolist() for _ in range(n)]


def test_counts_the_routing_after_edits(view):
    layer = view.blocks[0].layer
    plain = gather_routing(view, _docs(0))
    assert plain.num_tokens == 60 and plain.counts(layer)[3] > 0
    with experts_off(view, {layer: [3]}):
        edited = gather_routing(view, _docs(0))
    assert edited.counts(layer)[3] == 0
    det = rank_risk_difference(plain, edited)
    top = next(r for r in det.rows if r.layer == layer)
    assert top.expert == 3 and top.rate_neg == 0


def test_live_routing_equals_a_trace_of_the_same_tokens(view, tmp_path):
    docs = _docs(1, n=2, length=16)
    trace = record(view, docs, tmp_path / "t", seq_len=16, progress=False)
    a, b = gather_routing(view, docs, seq_len=16), gather_routing(view, trace)
    assert np.array_equal(a.token_ids_N, b.token_ids_N)
    for layer in a.ids:
        assert np.array_equal(np.sort(a.ids[layer], 1), np.sort(b.ids[layer], 1))


def test_detect_on_texts_and_bad_input(view, tmp_path):
    model_dir = tmp_path / "m"
    view.model.save_pretrained(model_dir)
    with pytest.raises(MoelabError, match="positive: the prompt list is empty"):
        detect_experts(view, [], _docs(0))
    with pytest.raises(MoelabError, match=r"negative: token-id document 0: ids must lie in \[0, 64\)"):
        detect_experts(view, _docs(0), [[1, 2, 999]])
    with pytest.raises(MoelabError, match="negative: .*does not exist"):
        detect_experts(view, _docs(0), tmp_path / "nothing.txt")
    other = open_model(tiny_model("Mixtral"))
    trace = record(other, _docs(2), tmp_path / "other", seq_len=20, progress=False)
    with pytest.raises(MoelabError, match="positive: .*does not match the model"):
        detect_experts(view, trace, _docs(0))
    context = view.model.config.max_position_embeddings
    with pytest.raises(MoelabError, match=rf"negative: prompts: a sequence of {context + 1} tokens, but the "
                                          rf"model's context is {context} tokens"):
        detect_experts(view, _docs(0), _docs(1, n=1, length=context + 1), seq_len=9999)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(MoelabError, match="positive: "):
        detect_experts(view, empty, _docs(0))
