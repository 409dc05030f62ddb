"""The one loader of local transformers checkpoints: safetensors only, checked before and after loading.

Every path that loads a saved model (``open_model``, evaluation, the compression pipeline, the demo)
goes through :func:`load_checkpoint`. Loading never executes pickled code: only ``*.safetensors``
weights are read (pickle files are refused with a message saying how to convert them), every
safetensors file's header is checked against its size first (a truncated or corrupt file is named),
and ``trust_remote_code`` is off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moelab.errors import CheckpointError, UnsupportedModelError
from moelab.models.registry import supported_families

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_checkpoint(
    path: Path,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    experts_implementation: str | None = None,
    dense_ok: bool = False,
) -> nn.Module:
    """Load a local safetensors checkpoint directory as ``AutoModelForCausalLM`` after checking it.

    A supported MoE family is read tensor by tensor by offset into its parameters, so it is held
    once (``from_pretrained`` would also keep the mapped files resident: two copies); the others
    go through ``from_pretrained``. ``dense_ok``: also load a dense model (no experts in its config), e.g. a dense twin to evaluate;
    otherwise only the MoE families moelab supports are loaded."""
    config = checked_config(path, trust_remote_code=trust_remote_code)
    from transformers import AutoModelForCausalLM

    if not (dense_ok and _is_dense(config)):
        _check_family(config, path)
        model = _load_one_copy(path, config, trust_remote_code, dtype)
        if model is not None:
            if experts_implementation is not None:
                model.set_experts_implementation(experts_implementation)
            return model
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


def _load_one_copy(path: Path, config: Any, trust_remote_code: bool,
                   dtype: torch.dtype | str | None) -> nn.Module | None:
    """The model read by offset, one copy in memory (:func:`moelab.offload.outofcore.load_by_offset`),
    or None where ``from_pretrained`` must load it: remote code, a config without a dtype (then
    ``from_pretrained`` guesses it from the weights), a layout the expert store cannot read."""
    if trust_remote_code or (dtype in (None, "auto") and getattr(config, "dtype", None) is None):
        return None
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            return None  # from_pretrained names the bad dtype
    from moelab.offload.outofcore import load_by_offset

    try:
        return load_by_offset(path, dtype=None if dtype == "auto" else dtype)
    except UnsupportedModelError:
        return None


def load_meta_model(
    path: Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """The checkpoint's model built from its config on the meta device: no weight is read or
    allocated (shapes and dtypes only). The directory and every safetensors header are checked as
    :func:`load_checkpoint` does; ``dtype`` defaults to the config's, as ``from_pretrained``."""
    import warnings

    config = checked_config(path, trust_remote_code=trust_remote_code)
    from transformers import AutoModelForCausalLM

    _check_family(config, path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _quiet_transformers(), warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, **kwargs)


def checked_config(path: Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of a checkpoint directory, after :func:`check_checkpoint_dir`."""
    check_checkpoint_dir(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises ValueError/KeyError/OSError for bad configs
        raise CheckpointError(
            f"{path / 'config.json'}: cannot be read as a transformers config: {err}"
        ) from err


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
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors_file(file)


def check_safetensors_file(path: Path) -> None:
    """Raise CheckpointError naming ``path`` when it is not a complete safetensors file.

    The format is an 8-byte little-endian header length N, N bytes of JSON giving every tensor's
    ``data_offsets`` into the data that follows; a file shorter than its header says is truncated.
    Only the header is read.
    """
    read_safetensors_header(path)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a safetensors file, checked as :func:`check_safetensors_file`
    says: ``header`` maps each tensor name to its ``dtype``, ``shape`` and ``data_offsets`` (relative
    to ``data_start``, the byte where the data begins); ``__metadata__`` is dropped. Only the header
    is read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        raw = f.read(n) if n is not None and n <= size - 8 else None
    if raw is None:
        raise CheckpointError(_corrupt(path, f"{size} bytes, shorter than its own header"))
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        ends = [int(v["data_offsets"][1]) for v in header.values()]
        for v in header.values():
            if not (isinstance(v["dtype"], str) and isinstance(v["shape"], list)):
                raise TypeError
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointError(_corrupt(path, "its header is not a safetensors tensor table")) from None
    want = 8 + n + max(ends, default=0)
    if size < want:
        raise CheckpointError(_corrupt(path, f"{size} bytes, but its header describes {want}"))
    return header, 8 + n


def _corrupt(path: Path, why: str) -> str:
    return f"{path}: truncated or corrupt safetensors file ({why}); save or download it again"


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: pickle checkpoints are refused: loading one can execute arbitrary code. Convert it "
        f"to safetensors where you trust it (e.g. AutoModelForCausalLM.from_pretrained(dir)"
        f".save_pretrained(new_dir), which writes *.safetensors) and open the converted directory"
    )


def _check_family(config: Any, path: Path) -> None:
    from moelab.models.families import ADAPTERS
    from moelab.models.families._config import config_names_experts

    model_type = getattr(config, "model_type", None)
    if not any(model_type in a.model_types for a in ADAPTERS):
        arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        dense = (
            ""
            if config_names_experts(config)
            else (
                " and looks like a dense model: its config names no experts, so it has no MoE block"
            )
        )
        raise UnsupportedModelError(
            f"{path}: {arch} (model_type={model_type!r}) is not a supported MoE family{dense}; "
            f"supported: {', '.join(supported_families())}"
        )


def _is_dense(config: Any) -> bool:
    from moelab.models.families._common import config_num_experts

    return config_num_experts(config) is None


@contextlib.contextmanager
def no_transformers_bars():
    """Hide transformers' tqdm bars ("Loading weights") for the block: they go to stderr even when it
    is piped, so they would land in logs and break moelab's own bar. The setting is restored on exit."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_transformers():
    """No bars, and no load report from transformers while loading: moelab raises one message instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_transformers_bars():
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
