"""The family registry: which adapter reads which transformers model.

An adapter is a small record: the family's display name, the config ``model_type`` values it
serves, the class names of its sparse MoE block, and a ``read`` function turning one block module
into a :class:`~moelab.models.view.MoEBlockView`; and the write side: ``write_config`` (the config
of the same model with another expert count / top-k / group count), ``fixed_routing`` (why a stock
config of the family cannot change those, if it cannot) and ``block_output`` (what the family's
block module returns besides the hidden states). Adapters live in ``moelab.models.families``, one
module per group of families that store their weights the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from moelab.errors import UnsupportedModelError
from moelab.models.view import MoEBlockView

if TYPE_CHECKING:
    from moelab.models.backend import ExpertsSpec

# read(model, block_module, path, layer) -> MoEBlockView
BlockReader = Callable[[nn.Module, nn.Module, str, int], MoEBlockView]
# write_config(config, num_experts, top_k, n_group) -> a copy of config; n_group None: no group-limited routing
ConfigWriter = Callable[[Any, int, int, "int | None"], Any]
# block_output(y_BSH, routing) -> what the family's block module returns (routing: moelab.nn.routing.Routing)
BlockOutput = Callable[[Tensor, Any], Any]


@dataclass(frozen=True)
class FamilyAdapter:
    """How moelab reads one transformers MoE family."""

    name: str  # display name, e.g. "Mixtral"
    model_types: tuple[str, ...]  # config.model_type values
    block_classes: tuple[str, ...]  # class names of the sparse MoE block module
    read: BlockReader
    example_config: str = ""  # transformers config class, for docs and tests
    write_config: ConfigWriter | None = None  # None: moelab cannot write this family with other counts
    fixed_routing: str = ""  # non-empty: why a stock config cannot change the expert count or top-k
    block_output: BlockOutput | None = None  # None: the block returns the hidden states alone
    experts_backend: ExpertsSpec | None = None  # how moelab's experts backend attaches (backend.py)
    # the norm whose output is the block's input, dotted under the decoder layer holding the block
    # (EAQuant folds its smoothing scales into it); "" where no norm precedes the block (FlexOlmo)
    input_norm: str = "post_attention_layernorm"

    def __post_init__(self) -> None:
        if not self.model_types or not self.block_classes:
            raise ValueError(f"adapter {self.name!r} needs model_types and block_classes")


def _adapters() -> tuple[FamilyAdapter, ...]:
    from moelab.models.families import ADAPTERS

    return ADAPTERS


def supported_families() -> list[str]:
    """Display names of all supported families, in registry order."""
    return [a.name for a in _adapters()]


def adapter_named(name: str) -> FamilyAdapter:
    """The adapter whose display name is ``name`` (a view's ``family``); UnsupportedModelError if none."""
    for a in _adapters():
        if a.name == name:
            return a
    raise UnsupportedModelError(f"family {name!r}: not a supported MoE family; supported: "
                                f"{', '.join(supported_families())}")


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
