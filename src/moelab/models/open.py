"""``open_model``: a loaded transformers model or a local safetensors checkpoint -> :class:`ModelView`.

Loading never executes pickled code: only ``*.safetensors`` weights are read, and
``trust_remote_code`` is off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moelab.errors import CheckpointError, MoelabError, UnsupportedModelError
from moelab.models.registry import FamilyAdapter, adapter_for, supported_families
from moelab.models.view import ModelView, MoEBlockView

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
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


def load_checkpoint(
    path: Path,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    experts_implementation: str | None = None,
) -> nn.Module:
    """Load a local safetensors checkpoint directory with ``AutoModelForCausalLM`` after checking it."""
    check_checkpoint_dir(path)
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises ValueError/KeyError/OSError for bad configs
        raise CheckpointError(
            f"{path / 'config.json'}: cannot be read as a transformers config: {err}"
        ) from err
    _check_family(config, path)
    kwargs: dict[str, Any] = {
        "config": config,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
        # load anyway and report mismatches ourselves, in one message (see _check_loading_info)
        "ignore_mismatched_sizes": True,
    }
    if dtype is not None:
        kwargs["dtype"] = dtype
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, output_loading_info=True, **kwargs
            )
    except Exception as err:
        raise CheckpointError(
            f"{path}: the weights do not load with its config.json: {err}"
        ) from err
    _check_loading_info(path, info)
    return model.eval()


def check_checkpoint_dir(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a directory with config.json and safetensors weights."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_message(path))
        raise CheckpointError(
            f"{path}: expected a model directory (with config.json and *.safetensors)"
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no config.json in this directory; expected a transformers checkpoint"
        )
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(_pickle_message(path / pickles[0]))
        raise CheckpointError(f"{path}: no *.safetensors weights in this directory")


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: pickle checkpoints are refused: loading one can execute arbitrary code. Convert it "
        f"to safetensors where you trust it (e.g. AutoModelForCausalLM.from_pretrained(dir)"
        f".save_pretrained(new_dir), which writes *.safetensors) and open the converted directory"
    )


def _check_family(config: Any, path: Path) -> None:
    from moelab.models.families import ADAPTERS

    model_type = getattr(config, "model_type", None)
    if not any(model_type in a.model_types for a in ADAPTERS):
        arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        fields = (
            "num_experts",
            "num_local_experts",
            "n_routed_experts",
            "moe_num_experts",
            "ffn_config",
        )
        dense = (
            ""
            if any(getattr(config, f, None) for f in fields)
            else (
                " and looks like a dense model: its config names no experts, so it has no MoE block"
            )
        )
        raise UnsupportedModelError(
            f"{path}: {arch} (model_type={model_type!r}) is not a supported MoE family{dense}; "
            f"supported: {', '.join(supported_families())}"
        )


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' own load report while loading; moelab raises one message instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_loading_info(path: Path, info: dict) -> None:
    """One CheckpointError for weights whose shapes contradict config.json, or missing/extra keys."""
    problems = []
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    for key, ckpt_shape, model_shape in mismatched[:3]:
        problems.append(
            f"{key} is {list(ckpt_shape)} in the weights but config.json implies {list(model_shape)}"
        )
    if len(mismatched) > 3:
        problems.append(f"{len(mismatched) - 3} more mismatched tensors")
    for key in ("missing_keys", "unexpected_keys"):
        items = sorted(str(k) for k in info.get(key) or [])
        if items:
            shown = ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
            problems.append(f"{key.replace('_', ' ')}: {shown}")
    if problems:
        raise CheckpointError(
            f"{path}: config.json contradicts the weights (check num_experts / num_local_experts, "
            f"intermediate sizes, hidden_size): " + "; ".join(problems)
        )
