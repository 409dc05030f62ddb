"""The whole compression job as one library call: open, calibrate, plan, apply, save.

Used by ``moelab prune`` / ``moelab merge``, the demo and ``bench/compress.py``::

    result = compress("path/to/model", "reap", CompressSpec(ratio=0.5), out="pruned/")

Calibration data comes from :func:`moelab.compress.calib.calibration_batches` given the corpus path,
so a library user gets what the CLI gets: the train split of a ``moelab data build`` corpus, an
equal share per label (see :mod:`moelab.compress.calib`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moelab.compress.apply import CompressWarning, apply_plan, save_compressed
from moelab.compress.calib import Calibration, calibration_batches
from moelab.compress.plan import Plan
from moelab.compress.registry import check_method, get_planner
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import ModelView, open_model


@dataclass
class CompressResult:
    """What :func:`compress` made: the plan, the compressed model, where it went, what changed."""

    plan: Plan
    model: nn.Module
    out: Path | None
    params_before: int
    params_after: int
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _tokenizer_source(model: Any, view: ModelView) -> Path | None:
    """The folder whose tokenizer files go beside the checkpoint: the model's own, when it has one."""
    path = Path(model) if isinstance(model, (str, os.PathLike)) else Path(view.config._name_or_path or "")
    return path if str(path) and (path / "tokenizer.json").is_file() else None


@contextmanager
def _count_tokens(model: nn.Module, advance: Callable[[int], None]) -> Iterator[None]:
    """Advance a progress bar by the tokens of every forward of ``model`` (any planner's passes)."""

    def hook(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            advance(int(ids.numel()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def make_plan(view: ModelView, method: str, spec: CompressSpec, *, kind: str | None = None,
              calib: Calibration | None = None, progress: bool = False, **options: Any) -> Plan:
    """Run planner ``method`` (checked against ``kind``: 'prune' or 'merge') on ``view``."""
    from moelab.trace.progress import token_progress

    check_method(method, kind)
    _, planner, needs_calib = get_planner(method)
    if needs_calib and calib is None:
        raise MoelabError(f"calib: method {method!r} needs calibration data")
    total = calib.num_tokens if calib is not None else 0
    with token_progress(max(total, 1), enabled=progress and total > 0, label=f"calibrating {method}") as adv, \
            _count_tokens(view.model, adv):
        return planner(view, calib if needs_calib else None, spec, **options)


def compress(model: str | os.PathLike | nn.Module, method: str, spec: CompressSpec, *, kind: str | None = None,
             out: str | os.PathLike | None = None, overwrite: bool = False,
             calib_corpus: str | os.PathLike | None = None, calib_tokens: int = 16384,
             calib_label: str | None = None, seq_len: int = 256, progress: bool = False,
             **options: Any) -> CompressResult:
    """Open ``model``, calibrate (if the method needs it), plan, apply, and save to ``out`` (if given).

    ``calib_corpus`` defaults to the embedded corpus. ``out`` is checked before any work is done.
    Warnings of :func:`apply_plan` (clamped top-k, groups switched off) are returned, not printed.
    """
    t0 = time.perf_counter()
    check_method(method, kind)  # before loading anything: a misspelt method fails at once
    if out is not None and Path(out).exists() and not overwrite:
        raise MoelabError(f"out: {out} already exists; choose another folder or pass --overwrite")
    view = open_model(model)
    _, _, needs_calib = get_planner(method)
    calib = None
    if needs_calib:
        if calib_corpus is None:
            from moelab.data import default_corpus

            calib_corpus = default_corpus()
        tok_dir = model if isinstance(model, (str, os.PathLike)) else None
        calib = calibration_batches(view, Path(calib_corpus), tokens=calib_tokens, seq_len=seq_len,
                                    seed=spec.seed, label=calib_label, tokenizer=tok_dir)
    plan = make_plan(view, method, spec, kind=kind, calib=calib, progress=progress, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = apply_plan(view, plan)
    notes = [str(w.message) for w in caught if issubclass(w.category, CompressWarning)]
    if out is not None:
        save_compressed(new, plan, out, tokenizer_from=_tokenizer_source(model, view), overwrite=overwrite)
    return CompressResult(plan, new, Path(out) if out is not None else None,
                          sum(p.numel() for p in view.model.parameters()),
                          sum(p.numel() for p in new.parameters()), notes, time.perf_counter() - t0)
