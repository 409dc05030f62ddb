"""Router losses against slow per-token references in float64, and their fixed points."""

from __future__ import annotations

import pytest
import torch

from moelab.train.losses import balance_loss, lm_losses, router_z_loss


def _balance_reference(logits, k):
    T, E = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)
    f = [0.0] * E
    for t in range(T):
        for e in torch.topk(probs[t], k).indices.tolist():
            f[e] += 1.0 / (T * k)
    P = [sum(probs[t, e].item() for t in range(T)) / T for e in range(E)]
    return E * sum(fe * pe for fe, pe in zip(f, P, strict=True))


@pytest.mark.parametrize("T,E,k", [(7, 4, 1), (33, 8, 2), (64, 16, 2)])
def test_balance_and_z_match_reference(T, E, k):
    g = torch.Generator().manual_seed(T * E + k)
    logits = torch.randn(T, E, generator=g) * 2
    assert balance_loss(logits, k).item() == pytest.approx(_balance_reference(logits, k), rel=1e-5)
    z_ref = sum(torch.logsumexp(logits[t].double(), 0).item() ** 2 for t in range(T)) / T
    assert router_z_loss(logits).item() == pytest.approx(z_ref, rel=1e-5)


def test_balance_fixed_points():
    assert balance_loss(torch.zeros(16, 8), 2).item() == pytest.approx(1.0)  # ties: uniform probs
    collapsed = torch.full((16, 8), -20.0)
    collapsed[:, :2] = 20.0  # every token picks experts 0 and 1 with prob ~1/2 each
    assert balance_loss(collapsed, 2).item() == pytest.approx(8 / 2, rel=1e-4)


def test_lm_losses_total_and_gradient_reach_router():
    g = torch.Generator().manual_seed(0)
    logits_BSV = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    router = tuple(torch.randn(10, 4, generator=g, requires_grad=True) for _ in range(3))
    out = lm_losses(logits_BSV, ids, router, top_k=2, aux_coef=0.1, z_coef=0.01)
    ce = torch.nn.functional.cross_entropy(logits_BSV[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.total, ce + 0.1 * out.balance + 0.01 * out.z)
    assert out.load_LE.shape == (3, 4) and out.load_LE.sum().item() == 3 * 10 * 2
    top2 = torch.topk(router[0], 2, dim=-1).indices.reshape(-1)
    assert out.load_LE[0].tolist() == torch.bincount(top2, minlength=4).float().tolist()
    out.total.backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in router)
