"""Fingerprints that tie a trace to the model it was recorded from, and the check that uses them.

Shape legend: E experts, H hidden size.

The model fingerprint is its architecture, its config (without runtime-only keys such as the attention
implementation or the dtype it was loaded in) and its hash, and a sha256 of every router weight
``[E, H]`` (and router bias) in the dtype the model holds it. Comparing two fingerprints says which of
these differ, down to the config keys and the layers.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import nn

from moelab.errors import TraceError

# config keys that describe how a model was loaded or run, not what it computes
_RUNTIME_KEYS = {
    "transformers_version", "torch_dtype", "dtype", "use_cache", "return_dict",
    "output_router_logits", "output_hidden_states", "output_attentions", "experts_implementation",
    "attn_implementation", "architectures",  # the model class is compared on its own
}


def as_view(model: Any) -> Any:
    """A :class:`moelab.models.ModelView` of ``model`` (a view, a loaded model or a checkpoint path)."""
    from moelab.models import ModelView, open_model

    if isinstance(model, ModelView):
        return model
    if isinstance(model, (nn.Module, str, os.PathLike)):
        return open_model(model)
    raise TraceError(f"model: expected a model, a model view or a checkpoint directory, got "
                     f"{type(model).__name__}")


def canonical_config(config: Any) -> dict[str, Any]:
    """The config as a JSON-safe dict without private or runtime-only keys."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keep = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _RUNTIME_KEYS}
    return json.loads(json.dumps(keep, sort_keys=True, default=str))


def _sha_tensor(h: Any, t: torch.Tensor | None) -> None:
    if t is None:
        h.update(b"none")
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def router_hash(block: Any) -> str:
    """sha256 of one block's router weight and bias (exact bytes, dtype included)."""
    h = hashlib.sha256()
    _sha_tensor(h, block.router_weight)
    _sha_tensor(h, block.router_bias)
    _sha_tensor(h, block.correction_bias)
    return h.hexdigest()


def model_fingerprint(view: Any) -> dict[str, Any]:
    """Architecture, config (and its hash), per-layer router hashes and dtype of a model view."""
    config = canonical_config(view.config)
    per_layer = {str(b.layer): router_hash(b) for b in view.blocks}
    return {
        "architecture": type(view.model).__name__,
        "family": view.family,
        "name_or_path": str(getattr(view.config, "_name_or_path", "") or ""),
        "dtype": str(view.blocks[0].router_weight.dtype).replace("torch.", ""),
        "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "config": config,
        "router_hash": hashlib.sha256("".join(per_layer.values()).encode()).hexdigest(),
        "router_hashes": per_layer,
    }


def describe_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two model fingerprints (empty: they match)."""
    diffs = []
    if recorded["architecture"] != current["architecture"]:
        diffs.append(f"architecture {recorded['architecture']} (trace) vs {current['architecture']} (model)")
    if recorded["config_hash"] != current["config_hash"]:
        a, b = recorded["config"], current["config"]
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        shown = ", ".join(f"{k}={a.get(k)!r} (trace) vs {b.get(k)!r} (model)" for k in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        diffs.append(f"config keys differ: {shown}{more}")
    ra, rb = recorded["router_hashes"], current["router_hashes"]
    if set(ra) != set(rb):
        diffs.append(f"MoE layers {sorted(map(int, ra))} (trace) vs {sorted(map(int, rb))} (model)")
    else:
        bad = sorted(int(k) for k in ra if ra[k] != rb[k])
        if bad:
            dt = ""
            if recorded["dtype"] != current["dtype"]:
                dt = f" (router dtype {recorded['dtype']} in the trace, {current['dtype']} in the model)"
            diffs.append(f"router weights differ in layers {bad}{dt}")
    return diffs


def file_differences(recorded: Any, current: dict[str, Any]) -> list[str]:
    """:func:`describe_differences` for a fingerprint read from a file (a steering or predictor
    file): worded for a file, and one entry when the recorded fingerprint is malformed."""
    try:
        diffs = describe_differences(recorded, current)
    except (KeyError, TypeError):
        return ["its 'model' fingerprint is malformed"]
    return [d.replace("(trace)", "(file)") for d in diffs]


def compare_model(recorded: dict[str, Any], model: Any, where: str) -> None:
    """Raise :class:`TraceError` listing what differs between a recorded fingerprint and ``model``."""
    diffs = describe_differences(recorded, model_fingerprint(as_view(model)))
    if diffs:
        raise TraceError(f"{where}: the trace does not match the model: " + "; ".join(diffs))
