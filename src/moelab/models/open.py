"""``open_model``: a loaded transformers model or a local safetensors checkpoint -> :class:`ModelView`.

Paths are loaded by :func:`moelab.models.checkpoint.load_checkpoint` (safetensors only,
``trust_remote_code`` off unless the caller asks for it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from moelab.errors import MoelabError, UnsupportedModelError
from moelab.models.checkpoint import load_checkpoint
from moelab.models.registry import FamilyAdapter, adapter_for, supported_families
from moelab.models.view import ModelView, MoEBlockView

_LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.")


def open_model(
    model_or_path: nn.Module | str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    experts_implementation: str | None = None,
) -> ModelView:
    """The uniform view of a transformers MoE model.

    Args:
        model_or_path: a loaded ``PreTrainedModel``, or a local directory with ``config.json`` and
            ``*.safetensors`` weights (loaded with ``AutoModelForCausalLM``).
        trust_remote_code: allow the checkpoint's own Python code (off by default).
        dtype: dtype to load a checkpoint in (default: transformers' choice); paths only.
        experts_implementation: transformers experts kernel ('eager', 'grouped_mm', 'batched_mm')
            or 'moelab' (moelab's dispatch with the model's own weights, every family; see
            :mod:`moelab.models.backend`); set on the loaded model, or passed to ``from_pretrained``.

    Raises:
        CheckpointError: missing path or config, pickle-only weights, config contradicting weights.
        UnsupportedModelError: a model class with no adapter, or a model without any MoE block.
        MoelabError: an unknown ``experts_implementation``.
    """
    if experts_implementation is not None:
        _check_experts_implementation(experts_implementation)
    moelab_backend = experts_implementation == "moelab"
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_checkpoint(
            Path(model_or_path),
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            experts_implementation=experts_implementation,
        )
    elif isinstance(model_or_path, nn.Module):
        if dtype is not None:
            raise MoelabError(
                "open_model: dtype applies to checkpoint paths; cast a loaded model with .to()"
            )
        model = model_or_path
        if experts_implementation is not None and not moelab_backend:
            model.set_experts_implementation(experts_implementation)
    else:
        raise MoelabError(
            f"open_model: expected a transformers model or a directory path, got {type(model_or_path).__name__}"
        )
    view = view_model(model)
    if moelab_backend:
        from moelab.models.backend import enable_experts_backend

        enable_experts_backend(view)
    elif experts_implementation is not None:
        from moelab.models.backend import disable_experts_backend

        disable_experts_backend(view, experts_implementation)
    return view


def _check_experts_implementation(name: str) -> None:
    from moelab.models.backend import valid_implementations

    valid = valid_implementations()
    if name not in valid:
        raise MoelabError(
            f"open_model: experts_implementation={name!r} is not known; expected one of "
            f"{', '.join(repr(v) for v in valid)}"
        )


def view_model(model: nn.Module) -> ModelView:
    """Build the view of an already loaded model (see :func:`open_model`)."""
    adapter = adapter_for_or_dense(model)
    blocks = _read_blocks(model, adapter)
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no MoE block found (a {adapter.name} model with only dense layers?)"
        )
    layer_list = model.get_submodule(_LAYER_RE.match(blocks[0].path).group(1))
    num_layers = len(layer_list)
    moe_layers = {b.layer for b in blocks}
    return ModelView(
        model=model,
        config=model.config,
        family=adapter.name,
        blocks=blocks,
        dense_layers=[i for i in range(num_layers) if i not in moe_layers],
        num_layers=num_layers,
    )


def adapter_for_or_dense(model: nn.Module) -> FamilyAdapter:
    """``adapter_for`` with a clearer message for a model that has no experts at all."""
    try:
        return adapter_for(model)
    except UnsupportedModelError as err:
        if not any("expert" in name for name, _ in model.named_modules()):
            raise UnsupportedModelError(
                f"{type(model).__name__} looks like a dense model: it has no MoE block (no expert "
                f"modules). moelab.models supports MoE families: {', '.join(supported_families())}"
            ) from err
        raise


def _read_blocks(model: nn.Module, adapter: FamilyAdapter) -> list[MoEBlockView]:
    blocks = []
    for path, module in model.named_modules():
        if type(module).__name__ not in adapter.block_classes:
            continue
        match = _LAYER_RE.match(path)
        if match is None:
            raise UnsupportedModelError(f"{path}: MoE block outside a numbered list of layers")
        blocks.append(adapter.read(model, module, path, int(match.group(2))))
    return blocks
