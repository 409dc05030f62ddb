"""The training loop of ``moelab train``: AdamW, linear warmup then cosine decay, checkpoints, resume.

A run lives in one folder: ``config.json`` (the TrainConfig), ``checkpoint/`` (see
:mod:`moelab.train.checkpoint`), ``train.jsonl`` and ``loss.png`` (see :mod:`moelab.train.log`).
Starting ``train`` on a folder with a checkpoint resumes it, if the checkpoint's fingerprint matches
the config; batches, dropout-free forward passes and optimizer updates are then the same as in an
uninterrupted run, so the losses match it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moelab.data.atomic import atomic_write_text
from moelab.data.corpus import MANIFEST, verify_corpus
from moelab.data.sources import sha256_file
from moelab.data.streams import encode_split
from moelab.data.tokenizer import eos_id, load_tokenizer
from moelab.errors import MoelabError
from moelab.run.evaluate import evaluate_streams, load_entropy, validation_streams
from moelab.train.batches import sample_batch
from moelab.train.checkpoint import (
    TrainState,
    check_fingerprint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from moelab.train.config import TrainConfig, hf_config
from moelab.train.log import append_log, plot_loss, truncate_log
from moelab.train.losses import MoeLosses, dense_lm_losses, lm_losses, sigmoid_lm_losses
from moelab.train.routing import RoutingRecorder, update_correction_bias

QUICK_EVAL_TOKENS = 8192


@dataclass
class TrainResult:
    """What a call to :func:`train` did: final state and the losses of the steps it ran."""

    run_dir: Path
    state: TrainState
    losses: list[float]  # total loss of each step run in this call, in order
    resumed_from: int  # step of the checkpoint this call started from (0 = fresh)
    interrupted: bool = False  # stopped by ``should_stop`` before reaching its last step


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


_MODEL_CLASSES = {"qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def build_model(cfg: TrainConfig, vocab_size: int, eos: int) -> torch.nn.Module:
    """A freshly initialised stock transformers model of ``cfg.arch`` (float32), seeded by ``cfg.seed``."""
    import transformers

    torch.manual_seed(cfg.seed)
    return getattr(transformers, _MODEL_CLASSES[cfg.arch])(hf_config(cfg, vocab_size, eos)).float()


def init_weights(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Load the model folder ``cfg.init_from`` (moelab's checkpoint loader: safetensors only) into
    ``model``; every tensor must match in name and shape."""
    from moelab.models.checkpoint import load_checkpoint

    try:
        source = load_checkpoint(Path(cfg.init_from), dtype=torch.float32, dense_ok=True).state_dict()
    except MoelabError as err:
        raise MoelabError(f"init_from: {err}") from None
    target = model.state_dict()
    wrong = [k for k in target if k not in source or source[k].shape != target[k].shape]
    extra = [k for k in source if k not in target]
    if wrong or extra:
        raise MoelabError(f"init_from: {cfg.init_from} does not match the {cfg.arch} model of this preset "
                          f"(missing or other shape: {wrong[:3]}, unexpected: {extra[:3]})")
    model.load_state_dict(source)


def use_experts_backend(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Run the routed experts on moelab's experts backend where the config asks for it: with the
    straight-through ternary provider for ``ternary_experts``, else the model's own weights."""
    if not (cfg.ternary_experts or (cfg.experts_implementation == "moelab" and cfg.arch != "qwen3")):
        return
    from moelab.models import open_model
    from moelab.models.backend import enable_experts_backend
    from moelab.nn.ternary import ternary_provider

    enable_experts_backend(open_model(model), ternary_provider if cfg.ternary_experts else None)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are left undecayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _prepare_run(cfg: TrainConfig, run_dir: Path, model, opt, gen) -> tuple[TrainState, dict]:
    fingerprint = cfg.fingerprint(sha256_file(cfg.corpus / MANIFEST))
    meta = read_checkpoint_meta(run_dir)
    if meta is not None:
        check_fingerprint(run_dir, meta.get("fingerprint", {}), fingerprint)
        state = load_checkpoint(run_dir, model, opt, gen)
    else:
        state = TrainState()
    truncate_log(run_dir, state.step)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return state, fingerprint


def _step_losses(cfg: TrainConfig, model, ids_BS, recorder: RoutingRecorder | None) -> MoeLosses:
    """Forward one batch and compute the losses of ``cfg.arch`` (see :mod:`moelab.train.losses`)."""
    if cfg.arch == "qwen3":
        return dense_lm_losses(model(input_ids=ids_BS, use_cache=False).logits, ids_BS)
    if recorder is not None:
        recorder.clear()
    out = model(input_ids=ids_BS, output_router_logits=True, use_cache=False)
    if cfg.arch == "deepseek_v3":
        return sigmoid_lm_losses(out.logits, ids_BS, out.router_logits, recorder.routings, cfg.aux_coef)
    return lm_losses(out.logits, ids_BS, out.router_logits, cfg.top_k, cfg.aux_coef, cfg.z_coef)


def train_step(cfg: TrainConfig, model, opt, streams, gen, step: int, recorder: RoutingRecorder | None = None):
    """One optimizer step of :func:`train` on a batch drawn from ``streams`` with ``gen``; returns its
    :class:`MoeLosses`. ``recorder``: the model's :class:`RoutingRecorder` (DeepSeek-V3 presets)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    ids_BS, _ = sample_batch(streams, cfg.domain_weights, cfg.batch_size, cfg.seq_len, gen)
    losses = _step_losses(cfg, model, ids_BS, recorder)
    opt.zero_grad(set_to_none=True)
    losses.total.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if cfg.bias_rate > 0:  # after the step, from the counts of the routing this step's loss saw
        update_correction_bias(recorder.view, losses.load_LE, cfg.bias_rate)
    return losses


def _quick_eval(model, val_streams, state: TrainState, run_dir: Path) -> None:
    res = evaluate_streams(model, val_streams, seq_len=min(256, min(s.numel() for s in val_streams.values())))
    ent = {d: round(min(load_entropy(v)), 4) for d, v in res.load_LE.items() if v}
    append_log(run_dir, {"kind": "eval", "step": state.step, "tokens": state.tokens,
                         "val_loss": {d: round(v, 4) for d, v in res.loss.items()}, "min_load_entropy": ent})


def train(cfg: TrainConfig, run_dir: Path, stop_at: int | None = None, progress: bool = True,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or resume) the run in ``run_dir`` up to ``cfg.steps``, or up to ``stop_at`` steps if given.

    A checkpoint is written every ``checkpoint_every_s`` seconds / ``checkpoint_every_steps`` steps
    and at the end. ``should_stop`` is polled between steps (the CLI sets it from SIGINT/SIGTERM): when
    it returns True the run checkpoints and returns with ``interrupted=True``. A KeyboardInterrupt
    between steps is checkpointed too; one inside a step (parameters possibly half-updated) is not,
    so the last checkpoint stays consistent.
    """
    torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    verify_corpus(cfg.corpus)
    tok = load_tokenizer(cfg.corpus)
    streams = encode_split(cfg.corpus, "train")
    val_streams = validation_streams(cfg.corpus, QUICK_EVAL_TOKENS) if cfg.eval_every else None
    model = build_model(cfg, tok.get_vocab_size(), eos_id(tok))
    if cfg.init_from:
        init_weights(cfg, model)  # a resumed checkpoint overwrites these below
    use_experts_backend(cfg, model)
    opt = make_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(cfg.seed)
    state, fingerprint = _prepare_run(cfg, run_dir, model, opt, gen)
    result = TrainResult(run_dir=run_dir, state=state, losses=[], resumed_from=state.step)
    end = min(cfg.steps, stop_at if stop_at is not None else cfg.steps)
    model.train()
    # routing hooks, where losses or the bias update need the experts each token was sent to
    recorder = RoutingRecorder(model) if cfg.arch == "deepseek_v3" else None
    acc = _Accumulator(len(cfg.moe_layers), cfg.num_experts)
    last_save, consistent = time.monotonic(), True
    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=state.step, info="")
        try:
            while state.step < end and not (should_stop is not None and should_stop()):
                consistent = False
                t0 = time.perf_counter()
                step_losses = train_step(cfg, model, opt, streams, gen, state.step, recorder)
                dt = time.perf_counter() - t0
                state.step, state.tokens, state.elapsed_s = state.step + 1, state.tokens + cfg.tokens_per_step, state.elapsed_s + dt
                consistent = True
                result.losses.append(step_losses.total.item())
                acc.add(step_losses, cfg.tokens_per_step, dt)
                if state.step % cfg.log_every == 0 or state.step == end:
                    rec = acc.record(state, lr_at(cfg, state.step - 1))
                    append_log(run_dir, rec)
                    bar.update(task, completed=state.step, info=f"loss {rec['ce']:.3f}  {rec['tok_s']:,.0f} tok/s")
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    _quick_eval(model, val_streams, state, run_dir)
                if _due(cfg, state.step, last_save):
                    save_checkpoint(run_dir, model, opt, gen, state, fingerprint)
                    plot_loss(run_dir)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            if consistent:
                save_checkpoint(run_dir, model, opt, gen, state, fingerprint)
                plot_loss(run_dir)
            raise
        finally:
            if recorder is not None:
                recorder.close()
    save_checkpoint(run_dir, model, opt, gen, state, fingerprint)
    plot_loss(run_dir)
    result.interrupted = state.step < end
    return result


def _due(cfg: TrainConfig, step: int, last_save: float) -> bool:
    by_steps = cfg.checkpoint_every_steps > 0 and step % cfg.checkpoint_every_steps == 0
    by_time = cfg.checkpoint_every_s > 0 and time.monotonic() - last_save >= cfg.checkpoint_every_s
    return by_steps or by_time


class _Accumulator:
    """Means of the losses and the summed expert load over one logging interval."""

    def __init__(self, layers: int, experts: int) -> None:
        self.shape = (layers, experts)
        self.reset()

    def reset(self) -> None:
        self.n, self.tokens, self.seconds = 0, 0, 0.0
        self.sums = {"loss": 0.0, "ce": 0.0, "balance": 0.0, "z": 0.0}
        self.load_LE = torch.zeros(self.shape)

    def add(self, losses, tokens: int, seconds: float) -> None:
        self.n += 1
        self.tokens += tokens
        self.seconds += seconds
        for key, val in zip(("loss", "ce", "balance", "z"), losses[:4], strict=True):
            self.sums[key] += val.item()
        self.load_LE += losses.load_LE

    def record(self, state: TrainState, lr: float) -> dict:
        if self.n == 0:
            raise MoelabError("training log: no steps in the interval")
        rec = {"kind": "train", "step": state.step, "tokens": state.tokens, "elapsed_s": round(state.elapsed_s, 2),
               **{k: round(v / self.n, 5) for k, v in self.sums.items()},
               "lr": lr, "tok_s": round(self.tokens / max(self.seconds, 1e-9), 1)}
        if self.load_LE.numel():  # a dense model has no expert load
            share_LE = self.load_LE / self.load_LE.sum(dim=1, keepdim=True)
            rec |= {"load_min": round(share_LE.min().item(), 4), "load_max": round(share_LE.max().item(), 4)}
        self.reset()
        return rec
