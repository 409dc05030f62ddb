"""Planners by name, for ``moelab prune`` / ``moelab merge``, the demo and ``bench/compress.py``.

Each entry is ``name -> (kind, "module:function", needs_calibration)``; ``kind`` is 'prune', 'merge'
or 'atomic'. Adding a planner is one line here plus its own module (see :mod:`moelab.compress.spec`
for the signature).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from moelab.errors import MoelabError

PLANNERS: dict[str, tuple[str, str, bool]] = {
    "random": ("prune", "moelab.compress.baselines:plan_random", False),
    "frequency": ("prune", "moelab.compress.baselines:plan_frequency", True),
    "weighted-frequency": ("prune", "moelab.compress.baselines:plan_weighted_frequency", True),
    "reap": ("prune", "moelab.compress.reap:plan_reap", True),
    "heapr": ("atomic", "moelab.compress.heapr:plan_heapr", True),
    "naee": ("prune", "moelab.compress.naee:plan_naee", True),
    "hc-smoe": ("merge", "moelab.compress.hcsmoe:plan_hcsmoe", True),
    "dern": ("merge", "moelab.compress.dern:plan_dern", True),
    "easy-ep": ("prune", "moelab.compress.easy_ep:plan_easy_ep", True),
    "m-smoe": ("merge", "moelab.compress.msmoe:plan_msmoe", True),
}

# planners that read no expert weight directly (routing, and expert output norms observed inside the
# experts' forward), so they run on a model with offloaded experts (``--expert-budget``)
OUT_OF_CORE: tuple[str, ...] = ("random", "frequency", "weighted-frequency", "reap")

# the planner kinds each command runs: `moelab prune` also takes atomic (neuron-level) planners
COMMAND_KINDS: dict[str, tuple[str, ...]] = {"prune": ("prune", "atomic"), "merge": ("merge",)}


def get_planner(name: str) -> tuple[str, Callable, bool]:
    """``(kind, planner function, needs_calibration)`` of planner ``name``."""
    if name not in PLANNERS:
        raise MoelabError(f"method: unknown planner {name!r}; known: {', '.join(sorted(PLANNERS)) or 'none'}")
    kind, target, needs_calib = PLANNERS[name]
    module, func = target.split(":")
    return kind, getattr(importlib.import_module(module), func), needs_calib


def planners(kind: str | None = None) -> list[str]:
    """Names of the registered planners (of one kind when given)."""
    return sorted(n for n, (k, _, _) in PLANNERS.items() if kind is None or k == kind)


def planners_for(command: str) -> list[str]:
    """Names of the planners that ``moelab <command>`` ('prune' or 'merge') runs."""
    return [n for k in COMMAND_KINDS[command] for n in planners(k)]


def check_method(name: str, command: str | None = None) -> None:
    """Raise :class:`MoelabError` unless ``name`` is a planner that ``command`` runs (any planner when
    None). It imports no planner, so callers run it before loading a model: a typo fails at once."""
    known = planners_for(command) if command is not None else planners()
    if name not in PLANNERS:
        raise MoelabError(f"method: unknown planner {name!r}; known: {', '.join(known)}")
    kind = PLANNERS[name][0]
    if command is not None and kind not in COMMAND_KINDS[command]:
        other = next(c for c, kinds in COMMAND_KINDS.items() if kind in kinds)
        article = "an" if kind[0] in "aeiou" else "a"
        raise MoelabError(f"method: {name!r} is {article} {kind} method; use `moelab {other}` "
                          f"(or one of: {', '.join(known)})")
