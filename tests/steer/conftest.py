"""Fixtures the steering tests share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.steer.gather import Routed


def _random_routed(rng, n, E=6, K=2, layers=(1, 3), bias=None) -> Routed:
    """``n`` tokens' routing drawn with expert weights ``bias`` (default uniform), ~10 % of the
    slots switched off (-1), in MoE layers ``layers``."""
    ids = {}
    for layer in layers:
        p = np.ones(E) if bias is None else np.asarray(bias, dtype=float)
        rows = np.stack([rng.choice(E, size=K, replace=False, p=p / p.sum()) for _ in range(n)])
        rows[rng.random((n, K)) < 0.1] = -1  # some switched-off slots
        ids[layer] = rows.astype(np.int64)
    return Routed(rng.integers(0, 50, n), ids, {layer: E for layer in layers}, {layer: K for layer in layers})


@pytest.fixture
def random_routed():
    """The builder ``random_routed(rng, n, E=6, K=2, layers=(1, 3), bias=None) -> Routed``."""
    return _random_routed


def _assert_scaled(plain, scaled, expert: int, factor: float, rtol: float) -> None:
    """Two routing events of the same tokens: ``scaled`` routes to the same experts as ``plain``,
    ``expert``'s weight times ``factor``. Slots compared by expert id: where the family's selection
    is one top-k, ``scale_weights`` stands in for it with the rule's (its slot order; its weights
    up to the family's float32 routing, so ``rtol`` ~1e-6)."""
    (p_ids, p_order), (s_ids, s_order) = plain.ids_TK.sort(-1), scaled.ids_TK.sort(-1)
    assert torch.equal(p_ids, s_ids)
    p_w, s_w = plain.weights_TK.gather(-1, p_order), scaled.weights_TK.gather(-1, s_order)
    torch.testing.assert_close(s_w, torch.where(p_ids == expert, factor * p_w, p_w), rtol=rtol, atol=0)


@pytest.fixture
def assert_scaled():
    """The check ``assert_scaled(plain_event, scaled_event, expert, factor, rtol)``."""
    return _assert_scaled
