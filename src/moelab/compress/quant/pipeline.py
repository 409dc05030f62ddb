"""The whole quantisation job as one library call: check, open, calibrate, quantise, write.

Used by ``moelab quantize`` and ``bench/quant.py``::

    run = quantize_checkpoint("path/to/model", QuantSpec("gptq", QuantConfig(4, 64)), out="q4/",
                              format="compressed-tensors")

``eaquant=EAQuantConfig(...)`` runs EAQuant (:mod:`.eaquant`) with ``spec``'s weight format; ``act``
(:mod:`.act`) records per-token activation bits (and with EAQuant, aligns the routers under them).

Calibration text comes from :func:`moelab.compress.calib.calibration_batches` given a corpus path
(the train split of a ``moelab data build`` corpus, an equal share per label), as for pruning.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moelab.compress.calib import calibration_batches
from moelab.compress.quant.act import ActQuantConfig
from moelab.compress.quant.calibrate import collect_hessians
from moelab.compress.quant.checkpoint import (
    FORMATS,
    check_ct_loadable,
    checkpoint_bytes,
    save_quantized,
)
from moelab.compress.quant.eaquant import EAQuantConfig
from moelab.compress.quant.eaquant import eaquant as run_eaquant
from moelab.compress.quant.pmq import ALLOCATORS, PMQConfig, mixed_precision
from moelab.compress.quant.quantize import (
    QuantResult,
    QuantSpec,
    check_not_quantized,
    quantize_experts,
)
from moelab.errors import MoelabError
from moelab.models import ModelView, open_model


@dataclass
class QuantRun:
    """What :func:`quantize_checkpoint` made."""

    result: QuantResult
    view: ModelView
    out: Path | None
    bytes_before: int
    bytes_after: int | None
    seconds: float


def check_inputs(model: str | os.PathLike, out: str | os.PathLike | None, overwrite: bool, format: str,
                 calib_corpus: str | os.PathLike | None) -> None:
    """Everything that can be refused before loading: the output folder, the format, an already
    quantised checkpoint, and a calibration corpus tokenised for another model."""
    from moelab.compress.evaluate import check_same_tokenizer

    if format not in FORMATS:
        raise MoelabError(f"format: {format!r}; expected one of {FORMATS}")
    if out is not None and Path(out).exists() and not overwrite:
        raise MoelabError(f"out: {out} already exists; choose another folder or pass --overwrite")
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        try:
            config = json.loads(cfg.read_text())
        except ValueError as err:
            raise MoelabError(f"{cfg}: not valid JSON ({err})") from None
        check_not_quantized(config, str(model))
    if calib_corpus is not None and Path(calib_corpus).is_dir():
        check_same_tokenizer(Path(model), Path(calib_corpus))


def quantize_checkpoint(model: str | os.PathLike, spec: QuantSpec, *, out: str | os.PathLike | None = None,
                        format: str = "dequantized", overwrite: bool = False,
                        calib_corpus: str | os.PathLike | None = None, calib_tokens: int = 8192,
                        calib_label: str | None = None, seq_len: int = 256, seed: int = 0,
                        pmq: PMQConfig | None = None, allocate: str = "pmq",
                        eaquant: EAQuantConfig | None = None, act: ActQuantConfig | None = None,
                        progress: bool = False) -> QuantRun:
    """Open the checkpoint ``model``, calibrate (GPTQ, EAQuant, or any mixed precision), quantise the
    routed experts, write ``out``. ``pmq``: bits per expert under an average-bits budget, chosen by
    ``allocate`` ('pmq', 'greedy', 'uniform'; :mod:`moelab.compress.quant.pmq`). The returned view is
    of the model that was written (EAQuant: smoothed and router-aligned)."""
    t0 = time.perf_counter()
    check_inputs(model, out, overwrite, format, calib_corpus)
    if pmq is not None and allocate not in ALLOCATORS:
        raise MoelabError(f"allocate: {allocate!r}; expected one of {ALLOCATORS}")
    if pmq is not None and eaquant is not None:
        raise MoelabError("eaquant: mixed precision (--avg-bits) with EAQuant is not supported; choose one")
    if pmq is not None and allocate != "uniform" and format == "compressed-tensors":
        raise MoelabError("format compressed-tensors: mixed bit-widths per expert do not load in stock "
                          "transformers 5 (one scheme for all fused experts); use --format dequantized")
    view = open_model(model)
    calib = None
    if spec.needs_calibration or pmq is not None or eaquant is not None:
        if calib_corpus is None:
            from moelab.data import default_corpus

            calib_corpus = default_corpus()
        calib = calibration_batches(view, Path(calib_corpus), tokens=calib_tokens, seq_len=seq_len, seed=seed,
                                    label=calib_label, tokenizer=model)
    if eaquant is not None:
        run = run_eaquant(view, calib, spec, replace(eaquant, act=act or eaquant.act), progress=progress)
        result, view = run.result, open_model(run.model)
    elif pmq is not None:
        result = mixed_precision(view, spec, collect_hessians(view, calib, spec.policy, progress=progress), pmq,
                                 allocate, progress=progress)
    else:
        result = quantize_experts(view, spec, calib, progress=progress)
    if act is not None:
        result.extra = result.extra | {"act_bits": act.bits, "activations": f"{act.describe()} symmetric fake "
                                       "quantisation of the expert linears' inputs, simulated; not stored"}
    if format == "compressed-tensors":
        check_ct_loadable(result)
    written = None
    if out is not None:
        written = save_quantized(view, result, out, format=format, tokenizer_from=_tokenizer_dir(model),
                                 overwrite=overwrite)
    return QuantRun(result, view, written, checkpoint_bytes(model), None if written is None else checkpoint_bytes(written),
                    time.perf_counter() - t0)


def _tokenizer_dir(model: Any) -> Path | None:
    path = Path(model)
    return path if (path / "tokenizer.json").is_file() else None


__all__ = ["QuantRun", "check_inputs", "quantize_checkpoint"]
