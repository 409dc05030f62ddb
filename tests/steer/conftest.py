"""Fixtures the steering tests share."""

from __future__ import annotations

import numpy as np
import pytest

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
