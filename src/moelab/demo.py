"""The main job, ``moelab demo``: trace, analyse, compress three ways, evaluate, and report on one page.

    result = run_demo(DemoConfig())            # embedded default model and corpus -> moelab-demo/
    result.report                              # moelab-demo/report.html

Steps, each a call into the stage packages (nothing is computed here that a stage already offers):
    1. trace the corpus' validation text (:func:`moelab.trace.record`, with down-projection maxima for
       the super-expert table) into ``OUT/trace``;
    2. for each method, calibrate on the corpus' training text, plan and write a stock checkpoint
       (:func:`moelab.compress.pipeline.compress`) into ``OUT/<method>``;
    3. evaluate the original and every compressed model on the same validation windows: perplexity
       per label (domain), KL to the original and top-1 agreement (:mod:`moelab.compress.evaluate`);
    4. write ``OUT/report.html``: the analysis report (:func:`moelab.report.build_report`) plus a
       "Compression" section (per-domain table, quality-vs-size plot), and ``OUT/demo.json``.

A folder written by an earlier demo (it holds ``demo.json``) is replaced; any other existing folder
is refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelab.errors import MoelabError

DEMO_MARKER = "demo.json"
DEFAULT_METHODS = ("frequency", "reap", "m-smoe")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo runs on. ``model``/``corpus`` None: the embedded defaults.

    trace_tokens: validation tokens traced; calib_tokens: training tokens each planner calibrates on;
    eval_tokens: validation tokens per label for perplexity / KL; ratio: share of experts removed.
    """

    model: Path | None = None
    corpus: Path | None = None
    out: Path = Path("moelab-demo")
    methods: tuple[str, ...] = DEFAULT_METHODS
    ratio: float = 0.5
    trace_tokens: int = 32768
    calib_tokens: int = 8192
    eval_tokens: int = 16384
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        from moelab.compress.registry import PLANNERS

        if not self.methods:
            raise MoelabError("methods: expected at least one compression method")
        unknown = [m for m in self.methods if m not in PLANNERS]
        if unknown:
            raise MoelabError(f"methods: unknown {unknown}; known: {', '.join(sorted(PLANNERS))}")
        if not 0 < self.ratio < 1:
            raise MoelabError(f"ratio: expected a share of experts to remove in (0, 1), got {self.ratio}")
        for name in ("trace_tokens", "calib_tokens", "eval_tokens", "seq_len"):
            if getattr(self, name) < 1:
                raise MoelabError(f"{name}: expected a positive integer, got {getattr(self, name)}")


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and the evaluation of every model (``original`` first)."""

    out: Path
    report: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _prepare_out(out: Path) -> None:
    if out.exists() and not (out / DEMO_MARKER).is_file() and any(out.iterdir()):
        raise MoelabError(f"out: {out} exists and was not written by `moelab demo`; choose another folder")
    out.mkdir(parents=True, exist_ok=True)


def run_demo(cfg: DemoConfig, progress: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole demo (see the module docstring); ``progress(stage)`` is called before each step."""
    import moelab.trace
    from moelab.compress.evaluate import corpus_streams, evaluate_compressed, load_model
    from moelab.compress.pipeline import compress
    from moelab.compress.spec import CompressSpec
    from moelab.data import default_corpus, default_model
    from moelab.report import build_report, write_report
    from moelab.report.compression import compression_section

    t0 = time.perf_counter()
    say = progress or (lambda stage: None)
    model_dir = Path(cfg.model) if cfg.model is not None else default_model()
    corpus = Path(cfg.corpus) if cfg.corpus is not None else default_corpus()
    out = Path(cfg.out)
    _prepare_out(out)
    (out / DEMO_MARKER).write_text(json.dumps({"status": "running"}) + "\n", encoding="utf-8")

    say("tracing")
    trace = moelab.trace.record(model_dir, corpus, out / "trace", seq_len=cfg.seq_len,
                                max_tokens=cfg.trace_tokens, act_max=True, overwrite=True, resume=False,
                                progress=False)
    say("evaluating the original")
    reference = load_model(model_dir, "model")
    streams = corpus_streams(corpus, model_dir, cfg.eval_tokens)
    seq = min(cfg.seq_len, min(s.numel() for s in streams.values()))
    rows = [_row("original", "-", reference, evaluate_compressed(reference, streams, seq_len=seq), model_dir)]
    for method in cfg.methods:
        say(f"compressing with {method}")
        res = compress(model_dir, method, CompressSpec(ratio=cfg.ratio, seed=cfg.seed), out=out / method,
                       overwrite=True, calib_corpus=corpus, calib_tokens=cfg.calib_tokens, seq_len=cfg.seq_len)
        say(f"evaluating {method}")
        ev = evaluate_compressed(res.model, streams, reference=reference, seq_len=seq)
        rows.append(_row(method, res.plan.meta.get("kind", _kind(method)), res.model, ev, out / method,
                         res.seconds, res.warnings))
    say("writing the report")
    section = compression_section(rows, cfg.ratio)
    page = build_report(trace, model=model_dir, extra_sections=[section],
                        title=f"moelab demo: {model_dir.name} on {corpus.name}")
    report = write_report(page, out / "report.html")
    result = DemoResult(out, report, rows, time.perf_counter() - t0)
    summary = {"status": "complete", "model": str(model_dir), "corpus": str(corpus), "config": _jsonable(cfg),
               "seconds": round(result.seconds, 1), "rows": rows}
    tmp = out / f".{DEMO_MARKER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / DEMO_MARKER)
    return result


def _kind(method: str) -> str:
    from moelab.compress.registry import PLANNERS

    return PLANNERS[method][0]


def _row(name: str, kind: str, model: torch.nn.Module, ev: Any, path: Path, seconds: float = 0.0,
         notes: list[str] | None = None) -> dict[str, Any]:
    from moelab.models import view_model

    view = view_model(model)
    return {"method": name, "kind": kind, "path": str(path), "params": ev.params,
            "routed_params": view.param_counts()["routed"], "experts": view.blocks[0].num_experts,
            "top_k": view.blocks[0].top_k, "perplexity": ev.perplexity, "kl": ev.kl, "top1": ev.top1,
            "seconds": round(seconds, 2), "notes": notes or []}


def _jsonable(cfg: DemoConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in cfg.__dict__.items()}
