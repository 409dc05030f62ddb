"""Random routing traces shared by the analysis tests."""

from __future__ import annotations

import numpy as np
import pytest


def _random_ids(rng: np.random.Generator, num_tokens: int, num_experts: int, top_k: int,
                drop: float = 0.0) -> np.ndarray:
    """Uniformly random top-k routing ``[N, K]``: K distinct experts per token; a share ``drop`` of -1."""
    ids = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]
    if drop:
        ids = np.where(rng.random(ids.shape) < drop, -1, ids)
    return ids


@pytest.fixture
def random_ids():
    return _random_ids
