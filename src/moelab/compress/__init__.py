"""moelab.compress: prune, merge and atomically prune experts into stock transformers checkpoints.

Planners return a :class:`~moelab.compress.plan.Plan` (never edit the model); the plan is applied to
produce a stock checkpoint. See :mod:`moelab.compress.plan` for the contract between the two.
"""

from __future__ import annotations

from moelab.compress.calib import Calibration, calibration_batches, routing_pass
from moelab.compress.plan import LayerPlan, Member, OutExpert, Plan, PlanError

__all__ = ["Calibration", "LayerPlan", "Member", "OutExpert", "Plan", "PlanError", "calibration_batches",
           "routing_pass"]
