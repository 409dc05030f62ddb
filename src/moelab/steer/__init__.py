"""moelab.steer: change a model's routing at inference, on every supported family.

The stock routing edits (the contract later stages build on) are in :mod:`moelab.steer.edits`:
``experts_off``, ``experts_on``, ``logit_offsets``, ``route_to_rank``, ``scale_weights`` and
``skip_below``. Each returns an :class:`EditHandle` with ``remove()``, ``with`` support and
per-layer counts; :mod:`moelab.steer.edit_kit` has the building blocks to write new edits with.

Steering on top of them:
    :mod:`moelab.steer.switch`   SteerMoE soft switching (``switch_experts``)
    :mod:`moelab.steer.detect`   SteerMoE detection by risk difference (``detect_experts``)
    :mod:`moelab.steer.rice`     RICE: experts by nPMI with marker tokens, reinforced (``detect_rice``)
    :mod:`moelab.steer.files`    steering files (``write_steering``, ``load_steering``, ``apply_steering``)
    :mod:`moelab.steer.dynfile`  dynamic expert-count edits in steering files (``dyncount_edit``)
    :mod:`moelab.steer.classify` a naive Bayes token classifier to judge steered text

Test-time routing: :mod:`moelab.steer.scmoe` (self-contrast decoding), :mod:`moelab.steer.c3po`
(re-mixing from neighbours), :mod:`moelab.steer.rewire` (logit offsets fitted on the context).
"""

from moelab.steer.detect import Detection, detect_experts
from moelab.steer.dynfile import CountEdit, DyncountConfig, dyncount_edit
from moelab.steer.edit_kit import EditHandle
from moelab.steer.edits import (
    experts_off,
    experts_on,
    logit_offsets,
    route_to_rank,
    scale_weights,
    skip_below,
)
from moelab.steer.files import (
    SteeringEdit,
    SteeringFileError,
    SteeringSpec,
    apply_steering,
    load_steering,
    make_steering,
    write_steering,
)
from moelab.steer.switch import switch_experts

__all__ = ["CountEdit", "Detection", "DyncountConfig", "EditHandle", "SteeringEdit", "SteeringFileError", "SteeringSpec", "apply_steering",
           "detect_experts", "dyncount_edit", "experts_off", "experts_on", "load_steering", "logit_offsets", "make_steering",
           "route_to_rank", "scale_weights", "skip_below", "switch_experts", "write_steering"]
