"""Shared fixtures for moelab.compress tests: tiny models whose experts matter, and kept sets per family.

The stock tiny models initialise weights with std 0.02, so an MoE block barely moves the logits and an
equality test on logits could not fail. ``strong_model`` redraws the routed experts and routers with
std ``1/sqrt(fan_in)`` (router x3) so that masking or dropping an expert changes the logits by ~0.1.
"""

from __future__ import annotations

import pytest
import torch

from moelab.models import open_model
from moelab.models.tiny import tiny_model

# DeepSeek-V3's group scores need 2 experts per group: 12 experts in 4 groups, so 2 of 3 can stay
OVERRIDES = {"DeepSeek-V3": dict(n_routed_experts=12)}


def make_strong(family: str, seed: int = 0, **overrides):
    model = tiny_model(family, seed=seed, **{**OVERRIDES.get(family, {}), **overrides})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in open_model(model).blocks:
            H, I = b.hidden_size, b.intermediate_size  # noqa: E741
            for t, std in ((b.router_weight, 3 * H ** -0.5), (b.gate, H ** -0.5), (b.up, H ** -0.5),
                           (b.down, I ** -0.5)):
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std)
    return model


def keep_for(view) -> list[int]:
    """About half the experts, keeping group-limited routing's groups whole (equal count per group)."""
    b = view.blocks[0]
    E = b.num_experts
    if b.n_group:
        per = E // b.n_group
        keep_per = 1 if b.group_score == "max" else 2
        return [g * per + j for g in range(b.n_group) for j in range(keep_per)]
    return list(range(0, E, 2))


@pytest.fixture
def strong_model():
    return make_strong


@pytest.fixture
def kept_set():
    return keep_for


@pytest.fixture
def input_ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(7))
