"""moelab.steer: change a model's routing at inference, on every supported family.

The stock routing edits (the contract later stages build on) are in :mod:`moelab.steer.edits`:
``experts_off``, ``experts_on``, ``logit_offsets``, ``scale_weights`` and ``skip_below``. Each
returns an :class:`EditHandle` with ``remove()``, ``with`` support and per-layer counts.
"""

from moelab.steer.edits import (
    EditHandle,
    experts_off,
    experts_on,
    logit_offsets,
    scale_weights,
    skip_below,
)
from moelab.steer.switch import switch_experts

__all__ = ["EditHandle", "experts_off", "experts_on", "logit_offsets", "scale_weights", "skip_below",
           "switch_experts"]
