"""Dynamic expert count on a pretrained model: MC-MoE online dynamic pruning, top-p post hoc, MC#-style
top-any gates and the fixed top-k' baseline.

Each keep rule is checked against a slow per-token reference on random routings; no-op settings
(beta = 0, p = 1 with cap k, gates that keep all, k' = k) leave a model's logits bit-identical on
tiny models of several families; the active-expert averages the handles report are checked against
counts made independently from the routing each edit received. fixed_top_k is checked against the
float64 reference forward at top_k - 1 (relative error <= 1e-6; some families route in float32).
"""

from dataclasses import replace

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model, reference_forward
from moelab.models.rule import select
from moelab.models.tiny import native_block_output, tiny_model
from moelab.routing import Routing
from moelab.steer.dyncount import active_per_token, fixed_top_k, mean_over_layers, router_probs
from moelab.steer.mcmoe import (
    ODPCalibration,
    calibrate_odp,
    odp_reference,
    odp_routing,
    online_dynamic_pruning,
    token_importance,
)
from moelab.steer.topany import (
    TopAnyConfig,
    TopAnyGates,
    top_any,
    top_any_reference,
    top_any_routing,
    train_top_any,
)
from moelab.steer.topp import top_p, top_p_keep, top_p_reference

# family -> overrides giving each a top-k of 3-4 (so counts can vary)
FAMILIES = {
    "Mixtral": dict(num_local_experts=8, num_experts_per_tok=4),
    "Qwen3-MoE": dict(num_experts=8, num_experts_per_tok=4),
    "DeepSeek-V3": dict(),  # 8 routed experts, top-3, sigmoid + correction bias, groups
    "Qwen2-MoE": dict(num_experts=8, num_experts_per_tok=3),  # no top-k renormalisation, shared expert
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def view(request):
    return open_model(tiny_model(request.param, **FAMILIES[request.param]))


def _ids(view, shape=(2, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, view.model.config.vocab_size, shape, generator=g)


def _random_routing(block, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, block.num_experts, generator=g, dtype=torch.float64) * 2
    ids, w, mask = select(block, logits)
    return Routing(logits, ids, w, None if bool(mask.all()) else mask)


# --- keep rules against slow references ------------------------------------------------------------

@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.95])
def test_top_p_keep_equals_reference(view, p):
    block = view.blocks[-1]
    r = _random_routing(block, seed=int(p * 100))
    probs = router_probs(block, r.logits_TE)
    for cap in (block.top_k, block.top_k - 1):
        fast = top_p_keep(block, r, p, cap)
        ref = top_p_reference(probs, r.ids_TK, r.real_mask(), p, cap)
        assert torch.equal(fast, ref)
    assert fast.sum(-1).min() >= 1


def test_top_p_mass_and_renormalisation(view):
    block = view.blocks[-1]
    r = _random_routing(block, seed=5)
    h = top_p(block, 0.3)
    out = block.module._moelab_routing_seam.edits[-1][1](block, torch.zeros(64, block.hidden_size), r)
    h.remove()
    total = r.weights_TK.sum(-1)
    assert torch.allclose(out.weights_TK.sum(-1), total, rtol=1e-6)  # kept weights rescaled to the total
    assert (out.weights_TK[~out.mask_TK] == 0).all()


def test_raised_cap_can_add_experts():
    block = open_model(tiny_model("Qwen3-MoE", num_experts=8, num_experts_per_tok=2)).blocks[0]
    from moelab.steer.topp import top_p_routing

    r = _random_routing(block, seed=1)
    wide = top_p_routing(block, r, 0.99, cap=6)
    assert wide.ids_TK.shape[1] == 6 and wide.real_mask().sum(-1).max() > 2
    probs = router_probs(block, r.logits_TE)
    wider = select(replace(block, top_k=6), r.logits_TE)
    ref = top_p_reference(probs, wider[0], wider[2], 0.99, 6)
    assert torch.equal(wide.real_mask(), ref)


def test_odp_keep_equals_reference():
    g = torch.Generator().manual_seed(0)
    T, K, H = 80, 6, 5
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    real = torch.rand(T, K, generator=g) > 0.2
    real[:, 0] = True
    w = w * real
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    r = Routing(None, torch.arange(K).repeat(T, 1), w, real)
    imp = token_importance(hidden)
    for beta in (0.0, 0.3, 0.7, 1.0):
        tau = float(imp.quantile(0.9))
        out, counts = odp_routing(r, hidden, beta, tau)
        ref = odp_reference(w, real, imp, beta, tau)
        assert torch.equal(out.real_mask(), ref)
        assert counts["skipped"] == int((real & ~ref).sum()) and counts["protected"] == int((imp >= tau).sum())
        assert torch.allclose(out.weights_TK.sum(-1), w.sum(-1))


def test_top_any_hard_mask_equals_reference(view):
    block = view.blocks[-1]
    gates = TopAnyGates(view).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 1.0)
    r = _random_routing(block, seed=2)
    hidden = torch.randn(64, block.hidden_size, dtype=torch.float64)
    out = top_any_routing(gates, block, hidden, r)
    g = gates.scores(block.layer, hidden, r)
    ref = top_any_reference(g, r.weights_TK, r.real_mask())
    assert torch.equal(out.real_mask(), ref) and 0 < int((~ref & r.real_mask()).sum())


# --- no-op settings are the identity --------------------------------------------------------------

def test_no_op_settings_leave_logits_identical(view):
    ids = _ids(view)
    with torch.no_grad():
        plain = view.model(ids).logits
        for make in (lambda: online_dynamic_pruning(view, {b.layer: 0.0 for b in view.blocks}),
                     lambda: top_p(view, 1.0),
                     lambda: top_any(view, TopAnyGates(view).to(torch.float64).eval()),
                     lambda: fixed_top_k(view, view.blocks[0].top_k)):
            with make() as h:
                assert torch.equal(view.model(ids).logits, plain)
            k = view.blocks[0].top_k
            assert all(v == k for v in h.active_experts().values())


def test_fixed_top_k_is_the_family_rule_at_fewer_experts(view):
    block = view.blocks[-1]
    x = torch.randn(3, 5, block.hidden_size, dtype=torch.float64)
    k = block.top_k - 1
    with torch.no_grad(), fixed_top_k(block, k) as h:
        got = native_block_output(block, x)
    want = reference_forward(replace(block, top_k=k), x.reshape(-1, block.hidden_size)).reshape(x.shape)
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    assert h.active_experts() == {block.layer: k}


# --- active experts per token ----------------------------------------------------------------------

def test_active_counts_match_an_independent_count(view):
    """The handle's average and the routing hooks' agree with the reference keep rule applied to the
    routing the edit received (recorded by an identity edit registered first)."""
    seen = []
    rec = [b.register_routing_edit(lambda b, h, r: seen.append((b, r)) or r) for b in view.blocks]
    ids = _ids(view, seed=3)
    with top_p(view, 0.2) as h:
        hooked = active_per_token(view, [ids])
    for x in rec:
        x.remove()
    expected = {}
    for b, r in seen:
        keep = top_p_reference(router_probs(b, r.logits_TE), r.ids_TK, r.real_mask(), 0.2, b.top_k)
        expected[b.layer] = keep.sum().item() / keep.shape[0]
    assert h.active_experts() == pytest.approx(expected, abs=1e-12)
    assert hooked == pytest.approx(expected, abs=1e-12)
    assert mean_over_layers(expected) < view.blocks[0].top_k


# --- calibration and training ----------------------------------------------------------------------

def test_calibrated_odp_hits_its_target_on_the_calibration_text():
    view = open_model(tiny_model("Qwen3-MoE", num_experts=8, num_experts_per_tok=4))
    batches = [_ids(view, (4, 32), seed=s) for s in range(2)]
    calib = calibrate_odp(view, batches, target_active=2.5, protect=0.05)
    assert all(0 < b < 1 for b in calib.beta.values())
    with online_dynamic_pruning(view, calib) as h:
        active_per_token(view, batches)
    assert mean_over_layers(h.active_experts()) == pytest.approx(2.5, abs=0.05)
    protected = sum(c["protected"] for c in h.counts.values()) / sum(c["tokens"] for c in h.counts.values())
    assert protected == pytest.approx(0.05, abs=0.02)


def test_top_any_training_moves_toward_the_target_and_trains_only_the_gates():
    view = open_model(tiny_model("Mixtral", dtype=torch.float32, num_local_experts=8, num_experts_per_tok=4))
    before = {n: p.detach().clone() for n, p in view.model.named_parameters()}
    batches = [_ids(view, (2, 16), seed=s) for s in range(2)]
    gates, history = train_top_any(view, batches, TopAnyConfig(target_active=2.0, steps=40, lr=0.1))
    assert history[-1]["active"] < history[0]["active"] - 0.5
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in view.model.named_parameters())
    assert not gates.training and not view.blocks[0].module._moelab_routing_seam.edits
    with top_any(view, gates) as h:
        active_per_token(view, batches)
    assert mean_over_layers(h.active_experts()) < 3.5


@pytest.mark.parametrize("call, match", [
    (lambda v: top_p(v, 0.0), "p must be a number in"),
    (lambda v: top_p(v, 0.5, cap=99), "cap must be an integer"),
    (lambda v: fixed_top_k(v, 9), "k must be an integer"),
    (lambda v: online_dynamic_pruning(v, {7: 0.5}), "layer 7 is not an MoE layer"),
    (lambda v: ODPCalibration({0: 1.5}, {0: 1.0}), "beta must lie in"),
    (lambda v: calibrate_odp(v, [_ids(v)], target_active=9), "target_active must lie in"),
    (lambda v: TopAnyConfig(target_active=0), "target_active"),
])
def test_bad_settings_are_clear_errors(call, match):
    view = open_model(tiny_model("Mixtral", num_local_experts=8, num_experts_per_tok=4))
    with pytest.raises(MoelabError, match=match):
        call(view)


def test_gates_started_from_thresholds_are_the_odp_rule(view):
    """start_from_thresholds(beta) keeps exactly the slots ODP (no protected tokens) keeps."""
    block = view.blocks[-1]
    r = _random_routing(block, seed=4)
    hidden = torch.randn(64, block.hidden_size, dtype=torch.float64)
    gates = TopAnyGates(view).to(torch.float64).start_from_thresholds({block.layer: 0.6}).eval()
    got = top_any_routing(gates, block, hidden, r)
    want, _ = odp_routing(r, hidden, 0.6, float("inf"))
    assert torch.equal(got.real_mask(), want.real_mask()) and not bool(want.real_mask().all())
    assert torch.allclose(got.weights_TK, want.weights_TK)
