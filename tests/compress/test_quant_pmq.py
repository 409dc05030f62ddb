"""PMQ bit allocation (moelab.compress.quant.pmq) against brute force, and on a tiny model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from moelab.compress.quant import CalibPolicy, QuantConfig, QuantSpec, collect_hessians
from moelab.compress.quant.pmq import (
    PMQConfig,
    brute_force_bits,
    greedy_bits,
    importance,
    mixed_precision,
    objective,
    pmq_bits,
    uniform_bits,
)
from moelab.errors import MoelabError
from moelab.models import open_model

from .conftest import make_strong
from .test_quant_calibrate import _calib


def _instance(seed: int, E: int):  # noqa: N803
    rng = np.random.default_rng(seed)
    imp = importance(rng.dirichlet(np.ones(E)), rng.uniform(0.05, 0.6, E), PMQConfig())
    base = rng.uniform(0.5, 5.0, E)
    loss = np.stack([base * 4.0 ** -k * rng.uniform(0.8, 1.2, E) for k in range(3)], 1)  # falls with bits
    return imp, loss


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("avg,at_least_one", [(2.5, False), (2.2, False), (3.0, True), (2.5, True)])
def test_pmq_is_optimal_against_brute_force(seed, avg, at_least_one):
    E = 3 + seed % 4  # noqa: N806
    cfg = PMQConfig(avg, (2, 3, 4), at_least_one=at_least_one)
    imp, loss = _instance(seed, E)
    if at_least_one and cfg.budget(E) < 2 * E + 2:  # one expert at 4 bits, the rest at 2: over budget
        with pytest.raises(MoelabError, match="no allocation"):
            pmq_bits(imp, loss, cfg)
        return
    bits = pmq_bits(imp, loss, cfg)
    best, val = brute_force_bits(imp, loss, cfg)
    assert sum(bits) <= cfg.budget(E)
    assert objective(bits, imp, loss, cfg) == pytest.approx(val, rel=1e-9, abs=1e-12)
    if not at_least_one:  # the baselines are feasible and never better than the optimum
        for other in (greedy_bits(imp, loss, cfg), uniform_bits(E, cfg)):
            assert sum(other) <= cfg.budget(E)
            assert objective(other, imp, loss, cfg) >= val - 1e-12


def test_pmq_budget_errors_and_edges():
    with pytest.raises(MoelabError, match="avg_bits: 1.5 is below the smallest bit-width 2"):
        PMQConfig(1.5)
    imp, loss = _instance(0, 5)
    assert pmq_bits(imp, loss, PMQConfig(2.0)) == [2] * 5
    assert pmq_bits(imp, loss, PMQConfig(4.0)) == [4] * 5
    assert uniform_bits(5, PMQConfig(2.9)) == [2] * 5


def test_mixed_precision_on_a_tiny_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = open_model(make_strong("Qwen3-MoE"))
    calib = _calib(view.config.vocab_size)
    spec = QuantSpec("gptq", QuantConfig(4, 8), policy=CalibPolicy(min_tokens=4))
    hs = collect_hessians(view, calib, spec.policy)
    res = mixed_precision(view, spec, hs, PMQConfig(2.5, (2, 3, 4)))
    E = view.blocks[0].num_experts  # noqa: N806
    for b in view.blocks:
        qb = res.blocks[b.layer]
        assert sum(qb.bits) <= 2.5 * E and set(qb.bits) <= {2, 3, 4}
        for e, bits in enumerate(qb.bits):
            assert {t.config.bits for t in qb.experts[e].values()} == {bits}
    assert 2.0 <= res.average_bits() <= 2.5
    assert res.calibration["uncalibrated"] == 0
    assert res.calibration["allocation"]["method"] == "pmq"
