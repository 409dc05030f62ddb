"""moelab.compress: prune, merge and atomically prune experts into stock transformers checkpoints.

Planners return a :class:`~moelab.compress.plan.Plan` (never edit the model); the plan is applied to
produce a stock checkpoint. See :mod:`moelab.compress.plan` for the contract between the two.
"""

from __future__ import annotations

from moelab.compress.apply import CompressWarning, apply_plan, save_compressed
from moelab.compress.calib import Calibration, calibration_batches, routing_pass
from moelab.compress.plan import LayerPlan, Member, OutExpert, Plan, PlanError
from moelab.compress.simulate import keep_sets, masked_logits, simulate, simulated

__all__ = ["Calibration", "CompressWarning", "LayerPlan", "Member", "OutExpert", "Plan", "PlanError",
           "apply_plan", "calibration_batches", "keep_sets", "masked_logits", "routing_pass", "save_compressed",
           "simulate", "simulated"]
