"""Predictor files: a trained :class:`~moelab.offload.predictor.ExpertPredictor` saved once and
used by ``moelab generate --policy predictive --predictor FILE`` and ``moelab offload bench``.

One safetensors file (read without unpickling): the heads' tensors under their state-dict names
(``heads.<src>-><dst>+<dt>.mean_H``, ``.std_H``, ``.net...``) and, in the header's metadata,
JSON strings::

    format   "moelab.predictor"
    version  "1"
    config   PredictorConfig's fields
    pairs    [[src, dst, dt], ...]        one head each, in training order
    top_k    {"<layer>": k, ...}
    model    moelab.trace.fingerprint.model_fingerprint of the model it was trained on

:func:`load_predictor` checks the file against the model it is used with (the same fingerprint
check as a trace or a steering file) and every head's shapes before it builds the heads, so a file
for another model fails when it is opened, naming the file and what differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from moelab.errors import MoelabError
from moelab.offload.predictor import ExpertPredictor, Head, PredictorConfig

FORMAT, VERSION = "moelab.predictor", "1"


class PredictorFileError(MoelabError):
    """A predictor file that is missing, unreadable, malformed or made for another model."""


def save_predictor(predictor: ExpertPredictor, path: str | os.PathLike, model: Any = None) -> Path:
    """Write ``predictor`` to ``path``, atomically; returns the path. ``model`` (a model, view or
    checkpoint dir) is the one it was trained on; default: the fingerprint
    :func:`~moelab.offload.runtime.fit_predictor` recorded on it."""
    from safetensors.torch import save_file

    from moelab.data.atomic import atomic_write
    from moelab.trace.fingerprint import as_view, model_fingerprint

    if model is not None:
        fp = model_fingerprint(as_view(model))
    elif predictor.fingerprint is not None:
        fp = predictor.fingerprint
    else:
        raise MoelabError("save_predictor: model= is required (the model the predictor was trained on)")
    meta = {"format": FORMAT, "version": VERSION,
            "config": json.dumps(dataclasses.asdict(predictor.config)),
            "pairs": json.dumps([list(p) for p in predictor.pairs]),
            "top_k": json.dumps({str(k): v for k, v in predictor.top_k.items()}),
            "model": json.dumps(fp)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in predictor.state_dict().items()}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise PredictorFileError(f"predictor file {path} does not exist (write one with `moelab offload "
                                 "train-predictor`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as err:
        raise PredictorFileError(f"predictor file {path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise PredictorFileError(f"predictor file {path}: metadata 'format' must be {FORMAT!r}, got "
                                 f"{meta.get('format')!r} (written by `moelab offload train-predictor` or "
                                 "moelab.offload.predictor_file.save_predictor)")
    if meta.get("version") != VERSION:
        raise PredictorFileError(f"predictor file {path}: version {meta.get('version')!r}, this moelab reads "
                                 f"{VERSION}")
    return tensors, meta


def _check_model(path: Path, fp: dict[str, Any], view: Any) -> None:
    from moelab.trace.fingerprint import file_differences, model_fingerprint

    diffs = file_differences(fp, model_fingerprint(view))
    if diffs:
        raise PredictorFileError(f"predictor file {path} was trained on another model: {'; '.join(diffs)}")


def load_predictor(path: str | os.PathLike, model: Any) -> ExpertPredictor:
    """The predictor saved at ``path``, checked against ``model`` (a model, view or checkpoint dir):
    the fingerprint, each head's MoE layers and its tensor shapes."""
    from moelab.trace.fingerprint import as_view

    path = Path(path)
    tensors, meta = _read(path)
    view = as_view(model)
    try:
        config = PredictorConfig(**json.loads(meta["config"]))
        pairs = [tuple(int(v) for v in p) for p in json.loads(meta["pairs"])]
        top_k = {int(k): int(v) for k, v in json.loads(meta["top_k"]).items()}
        _check_model(path, json.loads(meta["model"]), view)
    except (KeyError, TypeError, ValueError) as err:
        raise PredictorFileError(f"predictor file {path}: missing or malformed metadata field {err}") from None
    except PredictorFileError:
        raise
    except MoelabError as err:
        raise PredictorFileError(f"predictor file {path}: config: {err}") from None
    experts = {b.layer: b.num_experts for b in view.blocks}
    heads = {}
    for src, dst, dt in pairs:
        if src not in experts or dst not in experts:
            raise PredictorFileError(f"predictor file {path}: head {src}->{dst}+{dt} names a layer that is not "
                                     f"an MoE layer of the model ({sorted(experts)})")
        prefix = f"heads.{src}->{dst}+{dt}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if "mean_H" not in state or "std_H" not in state:
            raise PredictorFileError(f"predictor file {path}: head {src}->{dst}+{dt} lacks its tensors")
        head = Head(state["mean_H"], state["std_H"], experts[dst], config.hidden)
        try:
            head.load_state_dict(state)
        except RuntimeError as err:
            raise PredictorFileError(f"predictor file {path}: head {src}->{dst}+{dt} does not fit the model "
                                     f"({str(err).splitlines()[-1].strip()})") from None
        heads[(src, dst, dt)] = head.eval()
    if not heads:
        raise PredictorFileError(f"predictor file {path}: it holds no heads")
    predictor = ExpertPredictor(heads, top_k, config)
    predictor.fingerprint = json.loads(meta["model"])
    return predictor


__all__ = ["PredictorFileError", "load_predictor", "save_predictor"]
