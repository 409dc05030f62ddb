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

from moelab.compress.apply import CompressWarning, apply_plan, view_expert
from moelab.compress.calib import Calibration, calibration_batches
from moelab.compress.plan import Plan, PlanError
from moelab.compress.registry import OUT_OF_CORE, check_method, get_planner
from moelab.compress.spec import CompressSpec
from moelab.compress.stream import store_expert, write_plan
from moelab.errors import MoelabError
from moelab.models import ModelView
from moelab.models.writer import SHARD_BYTES, parse_size
from moelab.offload.outofcore import analysis_view


@dataclass
class CompressResult:
    """What :func:`compress` made: the plan, the compressed model, where it went, what changed.

    ``model``: the compressed model; when it was written straight to ``out`` (not built in memory),
    it is loaded from there on first use."""

    plan: Plan
    built: nn.Module | None
    out: Path | None
    params_before: int
    params_after: int
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def model(self) -> nn.Module:
        if self.built is None:
            from moelab.models.checkpoint import load_checkpoint

            self.built = load_checkpoint(self.out)
        return self.built


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
             expert_budget: int | float | str | None = None, policy: str = "lru",
             max_shard_size: int | str = SHARD_BYTES, **options: Any) -> CompressResult:
    """Open ``model``, calibrate (if the method needs it), plan, apply, and save to ``out`` (if given).

    ``calib_corpus`` defaults to the embedded corpus. ``out`` is checked before any work is done.
    Warnings of :func:`apply_plan` (clamped top-k, groups switched off) are returned, not printed.

    With ``out``, the checkpoint is written layer by layer (:func:`moelab.compress.stream.write_plan`),
    so the model is held once; ``result.model`` is then loaded from ``out`` when first asked for.
    ``max_shard_size`` (bytes or e.g. ``"5GB"``, save_pretrained's 50 GB by default): the largest
    safetensors file written; a bigger checkpoint is sharded with its index, as save_pretrained does.
    ``expert_budget`` (with a checkpoint directory and ``out``): open it with its experts offloaded
    into a cache of that many bytes under ``policy`` (:mod:`moelab.offload.outofcore`), for the
    planners that read no expert weights directly (:data:`moelab.compress.registry.OUT_OF_CORE`).
    """
    t0 = time.perf_counter()
    check_method(method, kind)  # before loading anything: a misspelt method fails at once
    shard = parse_size(max_shard_size, "max_shard_size")
    if out is not None and Path(out).exists() and not overwrite:
        raise MoelabError(f"out: {out} already exists; choose another folder or pass --overwrite")
    if expert_budget is not None:
        check_out_of_core(method, out)
    with analysis_view(model, expert_budget, policy) as (view, experts):
        calib = _calibration(view, model, method, spec, calib_corpus, calib_tokens, calib_label, seq_len)
        plan = make_plan(view, method, spec, kind=kind, calib=calib, progress=progress, **options)
        return _apply(view, experts, model, plan, out, overwrite, progress, t0, shard)


def read_plan(path: str | os.PathLike) -> Plan:
    """The plan in ``path`` (the ``plan.json`` written beside every compressed checkpoint); a
    PlanError naming the file when it cannot be read or is not a moelab plan."""
    path = Path(path)
    try:
        return Plan.from_json(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PlanError(f"plan: cannot read {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PlanError(f"plan: {path} is not a moelab plan.json ({type(err).__name__}: {err})") from None


def apply_saved_plan(model: str | os.PathLike | nn.Module, plan: Plan | str | os.PathLike,
                     out: str | os.PathLike, *, overwrite: bool = False,
                     expert_budget: int | float | str | None = None, policy: str = "lru",
                     progress: bool = False, max_shard_size: int | str = SHARD_BYTES) -> CompressResult:
    """Apply a saved ``plan`` (a :class:`Plan` or its ``plan.json``) to ``model`` and write the stock
    checkpoint to ``out``, without calibrating. ``expert_budget`` (with a checkpoint directory):
    the experts stay on disk and the kept ones are copied from its safetensors by offset, so the
    model is never loaded whole. ``max_shard_size``: as :func:`compress`'s. Raises PlanError when the
    plan does not fit the model."""
    t0 = time.perf_counter()
    shard = parse_size(max_shard_size, "max_shard_size")
    plan = plan if isinstance(plan, Plan) else read_plan(plan)
    if Path(out).exists() and not overwrite:
        raise MoelabError(f"out: {out} already exists; choose another folder or pass --overwrite")
    with analysis_view(model, expert_budget, policy) as (view, experts):
        return _apply(view, experts, model, plan, out, overwrite, progress, t0, shard)


def _apply(view: ModelView, experts: Any, model: Any, plan: Plan, out: Any, overwrite: bool, progress: bool,
           t0: float, max_shard_bytes: int) -> CompressResult:
    """Build (``out`` None) or write ``plan`` applied to ``view``; the :class:`CompressResult`."""
    params_before = sum(p.numel() for p in view.model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if out is None:
            new, params_after = apply_plan(view, plan), None
        else:
            rows = view_expert if experts is None else store_expert(experts.store)
            out, params_after = write_plan(view, plan, out, expert_rows=rows, overwrite=overwrite,
                                           tokenizer_from=_tokenizer_source(model, view), progress=progress,
                                           max_shard_bytes=max_shard_bytes)
            new = None
    notes = [str(w.message) for w in caught if issubclass(w.category, CompressWarning)]
    if new is not None:
        params_after = sum(p.numel() for p in new.parameters())
    return CompressResult(plan, new, Path(out) if out is not None else None, params_before, params_after,
                          notes, time.perf_counter() - t0)


def check_out_of_core(method: str, out: Any) -> None:
    """MoelabError unless ``method`` runs with offloaded experts and there is an ``out`` to write to."""
    if method not in OUT_OF_CORE:
        raise MoelabError(f"expert_budget: method {method!r} reads every expert's weights, which an "
                          f"offloaded model does not hold; without a budget it runs on the whole model. "
                          f"Methods that run offloaded: {', '.join(OUT_OF_CORE)}")
    if out is None:
        raise MoelabError("expert_budget: needs out (the folder to write the compressed checkpoint to): "
                          "an offloaded model is compressed straight into a checkpoint")


def _calibration(view: ModelView, model: Any, method: str, spec: CompressSpec, corpus: Any, tokens: int,
                 label: str | None, seq_len: int) -> Calibration | None:
    """The calibration batches ``method`` needs (None if it needs none), drawn from ``corpus``
    (default: the embedded corpus) with the model's tokenizer."""
    if not get_planner(method)[2]:
        return None
    if corpus is None:
        from moelab.data import default_corpus

        corpus = default_corpus()
    tok_dir = model if isinstance(model, (str, os.PathLike)) else None
    return calibration_batches(view, Path(corpus), tokens=tokens, seq_len=seq_len, seed=spec.seed,
                               label=label, tokenizer=tok_dir)
