"""Expert similarity: the Hungarian assignment against brute force, alignment recovering known
permutations, and the similarities against slow per-pair / per-token references (float64, 1e-10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError
from moelab.analysis.similarity import (
    align_neurons,
    aligned_weight_similarity,
    block_inputs,
    linear_assignment,
    linear_assignment_reference,
    mean_expert_outputs,
    model_similarity,
    neuron_features,
    output_similarity,
    weight_similarity,
)
from moelab.models import expert_forward, open_model
from moelab.models.tiny import tiny_model

FAMILIES = ["Qwen3-MoE", "GPT-OSS", "Mixtral"]  # GPT-OSS: gate/up/down biases


@pytest.fixture(params=FAMILIES)
def block(request):
    return open_model(tiny_model(request.param)).blocks[0]


def _permute_expert(block, src: int, dst: int, perm: np.ndarray) -> None:
    """Overwrite expert ``dst`` with expert ``src``'s neurons in the order ``perm`` (in place)."""
    p = torch.as_tensor(perm)
    block.gate[dst] = block.gate[src][p]
    block.up[dst] = block.up[src][p]
    block.down[dst] = block.down[src][:, p]
    for b in (block.gate_bias, block.up_bias):
        if b is not None:
            b[dst] = b[src][p]
    if block.down_bias is not None:
        block.down_bias[dst] = block.down_bias[src]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_linear_assignment_matches_brute_force(n):
    rng = np.random.default_rng(n)
    for trial in range(15):
        a = rng.normal(size=(n, n))
        if trial % 3 == 0:
            a = np.round(a)  # ties
        p = linear_assignment(a)
        assert sorted(p.tolist()) == list(range(n))
        best = linear_assignment_reference(a)
        assert a[np.arange(n), p].sum() == pytest.approx(a[np.arange(n), best].sum(), abs=1e-12)
        low = linear_assignment(a, maximize=False)
        assert a[np.arange(n), low].sum() == pytest.approx(-(-a)[np.arange(n), linear_assignment_reference(-a)].sum())


def test_linear_assignment_matches_scipy_on_larger_matrices():
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for n in (17, 64, 150):
        a = rng.normal(size=(n, n))
        rows, cols = scipy_opt.linear_sum_assignment(a, maximize=True)
        p = linear_assignment(a)
        assert a[np.arange(n), p].sum() == pytest.approx(a[rows, cols].sum(), abs=1e-9)


def test_linear_assignment_recovers_a_permutation():
    rng = np.random.default_rng(1)
    perm = rng.permutation(40)
    a = np.full((40, 40), -1.0)
    a[np.arange(40), perm] = 1.0
    assert (linear_assignment(a + 0.01 * rng.normal(size=a.shape)) == perm).all()


def test_linear_assignment_bad_input():
    with pytest.raises(AnalysisInputError, match="square"):
        linear_assignment(np.zeros((2, 3)))
    with pytest.raises(AnalysisInputError, match="NaN"):
        linear_assignment(np.array([[np.nan]]))


def test_align_neurons_recovers_a_permuted_copy(block):
    width = block.intermediate_size
    perm = np.random.default_rng(3).permutation(width)
    with torch.no_grad():
        _permute_expert(block, src=0, dst=1, perm=perm)
    # neuron n of expert 0 sits at position argsort(perm)[n] of expert 1
    found = align_neurons(block, 0, 1)
    assert (found == np.argsort(perm)).all()
    ws = aligned_weight_similarity(block)
    assert ws.sim_EE[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert weight_similarity(block, align=False)[0, 1] < 1 - 1e-6
    x = torch.randn(20, block.hidden_size, dtype=torch.float64)
    assert output_similarity(block, x)[0, 1] == pytest.approx(1.0, abs=1e-12)


def test_aligned_copy_computes_the_same_function(block):
    perm = align_neurons(block, 0, 1)
    x = torch.randn(7, block.hidden_size, dtype=torch.float64)
    before = expert_forward(block, 1, x)
    with torch.no_grad():
        _permute_expert(block, src=1, dst=1, perm=perm)
    assert torch.allclose(expert_forward(block, 1, x), before, atol=1e-12)


def _flat(block, e: int, perm=None) -> np.ndarray:
    f = neuron_features(block, e).numpy()
    if perm is not None:
        f = f[perm]
    extra = [] if block.down_bias is None else [block.down_bias[e].double().numpy()]
    return np.concatenate([f.ravel(), *extra])


def test_weight_similarity_against_reference(block):
    ws = aligned_weight_similarity(block)
    plain = weight_similarity(block, align=False)
    num_e = block.num_experts
    for i in range(num_e):
        for j in range(num_e):
            a, b = _flat(block, i), _flat(block, j, ws.perm_EEI[i, j])
            ref = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert ws.sim_EE[i, j] == pytest.approx(ref, abs=1e-10)
            b0 = _flat(block, j)
            assert plain[i, j] == pytest.approx(a @ b0 / (np.linalg.norm(a) * np.linalg.norm(b0)), abs=1e-10)
            # the identity is one candidate alignment, so aligning never lowers the cosine
            assert ws.sim_EE[i, j] >= plain[i, j] - 1e-12
            assert (ws.perm_EEI[j, i] == np.argsort(ws.perm_EEI[i, j])).all()
    assert np.allclose(ws.sim_EE, ws.sim_EE.T, atol=1e-12)
    assert np.allclose(np.diag(ws.sim_EE), 1.0)


def test_output_similarity_against_per_token_reference(block):
    torch.manual_seed(0)
    x = torch.randn(2, 9, block.hidden_size, dtype=torch.float64)
    got = output_similarity(block, x, chunk=4)
    x_TH = x.reshape(-1, block.hidden_size)
    y = [expert_forward(block, e, x_TH) for e in range(block.num_experts)]
    ref = np.zeros((block.num_experts, block.num_experts))
    for i in range(block.num_experts):
        for j in range(block.num_experts):
            ref[i, j] = np.mean([torch.nn.functional.cosine_similarity(y[i][t], y[j][t], dim=0).item()
                                 for t in range(len(x_TH))])
    assert np.allclose(got, ref, atol=1e-10)
    assert np.allclose(output_similarity(block, x, chunk=1000), got, atol=1e-12)
    mean = mean_expert_outputs(block, x, chunk=5)
    assert np.allclose(mean, torch.stack([v.mean(0) for v in y]).numpy(), atol=1e-12)
    m = output_similarity(block, x, reduce="mean")
    assert m[0, 1] == pytest.approx(mean[0] @ mean[1] / np.linalg.norm(mean[0]) / np.linalg.norm(mean[1]))


def test_similarity_bad_input(block):
    with pytest.raises(AnalysisInputError, match=r"hidden_TH has shape .*expected \[\.\.\., 16\]"):
        output_similarity(block, torch.zeros(3, 5))
    with pytest.raises(EmptySelectionError, match="no tokens"):
        output_similarity(block, torch.zeros(0, block.hidden_size))
    with pytest.raises(AnalysisInputError, match="reduce"):
        output_similarity(block, torch.zeros(2, block.hidden_size), reduce="max")
    last = block.num_experts - 1
    with pytest.raises(AnalysisInputError, match=rf"j: expected an expert of 0\.\.{last}, got {last + 1}"):
        align_neurons(block, 0, last + 1)


def test_model_similarity_on_traced_hidden_states():
    view = open_model(tiny_model("Qwen3-MoE"))
    batches = [torch.randint(0, 50, (2, 6))]
    hidden = block_inputs(view, batches)
    assert sorted(hidden) == [b.layer for b in view.blocks]
    assert hidden[view.blocks[0].layer].shape == (12, view.blocks[0].hidden_size)
    sims = model_similarity(view, hidden)
    for layer, s in sims["output"].items():
        assert s.shape == (view.block(layer).num_experts,) * 2
        assert np.allclose(np.diag(s), 1.0)
    with pytest.raises(EmptySelectionError, match="batches"):
        block_inputs(view, [])
