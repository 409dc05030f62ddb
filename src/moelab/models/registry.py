"""The family registry: which adapter reads which transformers model.

An adapter is a small record: the family's display name, the config ``model_type`` values it
serves, the class names of its sparse MoE block, and a ``read`` function turning one block module
into a :class:`~moelab.models.view.MoEBlockView`. Adapters live in ``moelab.models.families``, one
module per group of families that store their weights the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from moelab.errors import UnsupportedModelError
from moelab.models.view import MoEBlockView

if TYPE_CHECKING:
    from moelab.models.backend import ExpertsSpec

# read(model, block_module, path, layer) -> MoEBlockView
BlockReader = Callable[[nn.Module, nn.Module, str, int], MoEBlockView]


@dataclass(frozen=True)
class FamilyAdapter:
    """How moelab reads one transformers MoE family."""

    name: str  # display name, e.g. "Mixtral"
    model_types: tuple[str, ...]  # config.model_type values
    block_classes: tuple[str, ...]  # class names of the sparse MoE block module
    read: BlockReader
    example_config: str = ""  # transformers config class, for docs and tests
    experts_backend: ExpertsSpec | None = None  # how moelab's experts backend attaches (backend.py)

    def __post_init__(self) -> None:
        if not self.model_types or not self.block_classes:
            raise ValueError(f"adapter {self.name!r} needs model_types and block_classes")


def _adapters() -> tuple[FamilyAdapter, ...]:
    from moelab.models.families import ADAPTERS

    return ADAPTERS


def supported_families() -> list[str]:
    """Display names of all supported families, in registry order."""
    return [a.name for a in _adapters()]


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for a loaded model, by ``config.model_type``; UnsupportedModelError if none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for a in _adapters():
        if model_type in a.model_types:
            return a
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type={model_type!r}) is not a supported MoE family; "
        f"supported: {', '.join(supported_families())}"
    )
