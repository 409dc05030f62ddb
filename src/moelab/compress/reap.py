"""REAP: Router-weighted Expert Activation Pruning (Lasby et al., Cerebras 2025; code: CerebrasResearch/reap).

Score of expert e of a layer over calibration tokens (``src/reap/pruning_metrics.py``)::

    REAP_e = (1 / |T_e|) * sum_{t in T_e} g_{t,e} * ||E_e(x_t)||_2

``T_e`` the tokens whose top-k includes e, ``g_{t,e}`` the router gate as the block combines with it:
renormalised over the top-k only when the model's ``norm_topk_prob`` is true, else the raw softmax
probability, as REAP's ``main.py`` decides (``renormalize_router_weights`` applies only then; see
:mod:`moelab.compress.stats`), ``E_e(x_t)`` the expert's output before weighting.
An expert never routed scores 0. Each layer drops its lowest-scored experts: the same number per
layer in the paper (``budget='layer'``); ``budget='global'`` ranks ``score / mean(layer)`` across
layers. Router rows and correction biases of the kept experts are kept, top-k unchanged (clamped
by :func:`moelab.compress.apply.apply_plan` only when fewer experts than top-k remain).

Not included: REAP's optional super-expert protection (``model_util.get_super_expert_indices``).
"""

from __future__ import annotations

import time

from moelab.compress.baselines import plan_from_scores
from moelab.compress.calib import Calibration
from moelab.compress.plan import Plan
from moelab.compress.spec import CompressSpec
from moelab.compress.stats import expert_statistics
from moelab.errors import MoelabError
from moelab.models import ModelView


def plan_reap(view: ModelView, calib: Calibration | None, spec: CompressSpec) -> Plan:
    """REAP pruning plan: keep the experts with the highest router-weighted mean activation norm."""
    if calib is None:
        raise MoelabError("calib: REAP pruning needs calibration data (see calibration_batches)")
    t0 = time.perf_counter()
    stats = expert_statistics(view, calib)
    scores = {layer: s.reap_E for layer, s in stats.items()}
    return plan_from_scores("reap", view, scores, spec, calib, t0,
                            frequency={str(layer): s.count_E.tolist() for layer, s in stats.items()})
