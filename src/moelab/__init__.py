"""moelab: one toolkit for Mixture-of-Experts models.

Stages, one package each: ``nn`` (layers, routers), ``models`` (uniform view of transformers MoE
models), ``data`` (embedded corpus), ``train``, ``trace``, ``analysis``, ``compress``, ``steer``,
``offload``, ``report`` and ``cli``.

Top-level names are imported lazily so that ``import moelab`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "open_model": "moelab.models",
    "default_model": "moelab.data",
    "default_corpus": "moelab.data",
    "patch": "moelab.nn",
    "unpatch": "moelab.nn",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
