"""Benchmark: dynamic expert count on the embedded default model, and the cost of a steering edit.

    python bench/dyncount.py            # -> bench/results/dyncount.json, docs/results/dyncount.md
    python bench/dyncount.py --eval-tokens 2048 --train-steps 8 --runs 3   # quick look

Quality vs experts: per-domain test perplexity (the first ``--eval-tokens`` tokens of each domain's
test split, windows of 256) against the average active routed experts per token (over every MoE
layer and token, counted from the routing the experts received), for the family's fixed top-k, a
fixed top-(k-1) (the family's own rule at k-1), MC-MoE online dynamic pruning calibrated to 2-3
targets, top-p post hoc at 3 p values (cap k) and MC#-style top-any gates trained to 2 targets, each
from the all-keep gate (lr 0.05) and from ODP's calibrated thresholds at the same target (lr 0.01).
Calibration and gate training use ``--calib-tokens`` tokens of the training split (seed 0).

Overhead: CPU time (``time.process_time``, so the other jobs on a shared machine do not count) of a
greedy generation (``--new-tokens`` tokens from a fixed prompt, KV cache) and of a plain forward
(8 x 256 tokens) with an ``experts_off`` edit (expert 0 off in every MoE layer), with an identity
edit (the routing seam alone) and with none, in ``--runs`` rounds after a warm-up round (each round
runs the three back to back in rotating order); the slowdown is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import moelab
from moelab.compress.calib import calibration_batches
from moelab.data.atomic import atomic_write_text
from moelab.data.streams import encode_split
from moelab.data.tokenizer import load_tokenizer
from moelab.models import open_model
from moelab.run import run_batches
from moelab.run.evaluate import evaluate_streams
from moelab.run.generate import GenerationConfig, generate
from moelab.steer import experts_off
from moelab.steer.dyncount import fixed_top_k
from moelab.steer.mcmoe import calibrate_odp, online_dynamic_pruning
from moelab.steer.topany import TopAnyConfig, TopAnyGates, top_any, train_top_any
from moelab.steer.topp import top_p

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def read_config(path):\n    "


def measure(view, streams: dict) -> dict:
    """Perplexity per domain and active routed experts per token (all layers, all domains)."""
    slots, tokens = [0], [0]

    def count(ev) -> None:
        slots[0] += int(ev.routing.real_mask().sum())
        tokens[0] += int(ev.ids_TK.shape[0])

    hooks = [b.register_routing_hook(count) for b in view.blocks]
    try:
        result = evaluate_streams(view.model, streams, seq_len=256, batch_size=8)
    finally:
        for h in hooks:
            h.remove()
    return {"ppl": result.perplexity, "active": slots[0] / tokens[0]}


def quality_rows(view, streams, calib, args) -> list[dict]:
    k = view.blocks[0].top_k
    rows = []

    def row(method: str, setting: str, install) -> None:
        t = time.perf_counter()
        handle = install()
        try:
            m = measure(view, streams)
        finally:
            if handle is not None:
                handle.remove()
        rows.append({"method": method, "setting": setting, **m, "seconds": time.perf_counter() - t})
        print(f"  {method} {setting}: active {m['active']:.2f}", flush=True)

    row("fixed top-k", f"k={k}", lambda: None)
    row("fixed top-k", f"k={k - 1}", lambda: fixed_top_k(view, k - 1))
    for target in args.odp_targets:
        cal = calibrate_odp(view, calib.batches, target_active=target, protect=0.02)
        betas = ", ".join(f"{b:.2f}" for b in cal.beta.values())
        row("MC-MoE ODP", f"target {target:g} (beta {betas})", lambda cal=cal: online_dynamic_pruning(view, cal))
    for p in args.top_p:
        row("top-p", f"p={p:g}", lambda p=p: top_p(view, p))
    for target in args.top_any_targets:
        for start in ("identity", "ODP"):
            gates = TopAnyGates(view)
            if start == "ODP":
                gates.start_from_thresholds(calibrate_odp(view, calib.batches, target_active=target, protect=0).beta)
            t = time.perf_counter()
            cfg = TopAnyConfig(target_active=target, steps=args.train_steps, lr=0.01 if start == "ODP" else 0.05)
            gates, _ = train_top_any(view, calib.batches, cfg, gates=gates)
            trained = time.perf_counter() - t
            row("top-any (MC#)", f"target {target:g}, from {start} ({args.train_steps} steps, {trained:.0f} s)",
                lambda gates=gates: top_any(view, gates))
    return rows


def overhead(view, tokenizer, args) -> dict:
    """Median CPU seconds (``time.process_time``: this process only, so other jobs sharing the cores
    do not count) of a generation and of a forward: no edit, an identity edit on every MoE layer
    (the seam alone) and the ``experts_off`` edit, interleaved."""
    off = {b.layer: [0] for b in view.blocks}
    edits = {"none": lambda: [],
             "identity": lambda: [b.register_routing_edit(lambda b, h, r: r) for b in view.blocks],
             "experts_off": lambda: [experts_off(view, off)]}
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, view.model.config.vocab_size, (8, 256), generator=g)

    def gen(handles) -> float:
        generate(view.model, tokenizer, PROMPT, cfg, handles=handles)

    def fwd(handles) -> None:
        run_batches(view.model, [batch], handles=handles, use_cache=False)

    out = {}
    names = list(edits)
    for name, fn in (("generate", gen), ("forward", fwd)):
        times = {e: [] for e in edits}
        for rep in range(args.runs + 1):  # the first round is the warm-up
            order = names[rep % 3:] + names[:rep % 3]  # rotate, so no setting always runs first
            for e in order:
                t = time.process_time()
                fn(edits[e]())
                if rep:
                    times[e].append(time.process_time() - t)
        med = {e: statistics.median(v) for e, v in times.items()}
        # each round's ratio to the no-edit run of the same round: drifts in machine load cancel
        paired = {e: statistics.median(a / b for a, b in zip(times[e], times["none"], strict=True)) - 1
                  for e in edits if e != "none"}
        out[name] = {"cpu_s": med, "slowdown": {e: med[e] / med["none"] - 1 for e in edits if e != "none"},
                     "slowdown_paired": paired}
    out["generate"]["tokens_per_cpu_s"] = {e: args.new_tokens / t for e, t in out["generate"]["cpu_s"].items()}
    return out


def _slow(m: dict) -> str:
    med, pair = m["slowdown"], m["slowdown_paired"]
    return (f"{100 * pair['identity']:+.1f} % / {100 * pair['experts_off']:+.1f} % "
            f"({100 * med['identity']:+.1f} % / {100 * med['experts_off']:+.1f} %)")


def markdown(meta: dict, rows: list[dict], over: dict, domains: list[str]) -> str:
    lines = [
        "# Dynamic expert count on the embedded default model", "",
        f"Generated by `python bench/dyncount.py` on {meta['date']} ({meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} thread(s)). Model: `{meta['model']}` (top-{meta['top_k']} of {meta['experts']} routed "
        f"experts, {meta['moe_layers']} MoE layers); perplexity on the first {meta['eval_tokens']:,} test tokens of "
        f"each domain (windows of 256); calibration and gate training on {meta['calib_tokens']:,} training-split "
        "tokens (seed 0). Active = routed experts per token averaged over every MoE layer and evaluated token "
        "(the shared expert is not counted).", "",
        "| method | setting | active experts | " + " | ".join(f"ppl {d}" for d in domains) + " |",
        "|---|---|---|" + "---|" * len(domains),
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['active']:.2f} | "
                     + " | ".join(f"{r['ppl'][d]:.2f}" for d in domains) + " |")
    g, f = over["generate"], over["forward"]
    lines += [
        "", f"Overhead of a steering edit: CPU seconds (`time.process_time`, median of {meta['runs']} rounds after "
        "a warm-up round; each round runs the three settings back to back in rotating order) with no edit, an identity edit on every MoE layer (the routing seam alone) and "
        "`experts_off` (expert 0 of every MoE layer); generation is greedy with the KV cache.", "",
        "| | no edit | identity edit | experts_off | slowdown, identity / experts_off: median of the "
        "per-round ratios (ratio of the medians) |", "|---|---|---|---|---|",
        f"| generation, {meta['new_tokens']} new tokens (tokens per CPU s) | {g['tokens_per_cpu_s']['none']:.1f} | "
        f"{g['tokens_per_cpu_s']['identity']:.1f} | {g['tokens_per_cpu_s']['experts_off']:.1f} | {_slow(g)} |",
        f"| forward, 8 x 256 tokens (CPU s) | {f['cpu_s']['none']:.3f} | {f['cpu_s']['identity']:.3f} | "
        f"{f['cpu_s']['experts_off']:.3f} | {_slow(f)} |",
        "", "Notes:", "",
        "- fixed top-k: the family's own rule (sigmoid scores + correction bias, renormalised) at k experts "
        "(`moelab.steer.dyncount.fixed_top_k`).",
        "- MC-MoE ODP (`moelab.steer.mcmoe`): slot j is dropped when w_j < beta_l * w_1; beta_l is the quantile "
        "of the calibration ratios w_j / w_1 that drops the share of slots the target needs; the 2 % most "
        "important tokens (hidden-state L1 norm above a calibrated per-layer threshold; attention is not "
        "available under SDPA) keep all their experts.",
        "- top-p (`moelab.steer.topp`): the fewest of the top-k experts whose probabilities (sigmoid scores "
        "normalised over all experts) reach p; kept weights rescaled to the token's original total.",
        "- top-any (`moelab.steer.topany`): a per-layer gate on the block input and log(w_j / w_1), trained with a "
        "straight-through Gumbel mask, the model frozen; from the all-keep gate, or started from ODP's thresholds.",
        "- The overhead is a fixed cost per MoE layer call, so it is a visible share of a decode step of this "
        "128-wide model and a smaller one of a larger model's. The identity column is the routing seam alone (its "
        "torch hooks on the router and the experts, which build a `Routing` on every call); `experts_off` adds "
        "to it a second selection from the logits on the steps where a token chose a switched-off expert. "
        "Timings on a machine shared with other jobs vary by several per cent between runs (load average "
        f"{meta.get('load_average', float('nan')):.1f} on {os.cpu_count()} cores at this run); "
        "[steering.md](steering.md) adds the count of dispatched torch ops and the time spent inside the edit, "
        "which other jobs do not disturb.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--corpus", type=Path, default=None, help="moelab corpus (default: the embedded corpus)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--odp-targets", type=float, nargs="+", default=[6.0, 5.0, 4.0])
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.6, 0.5, 0.4])
    ap.add_argument("--top-any-targets", type=float, nargs="+", default=[5.0, 4.0])
    ap.add_argument("--train-steps", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/dyncount.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs/results/dyncount.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or moelab.default_model()
    corpus = args.corpus or moelab.default_corpus()
    view = open_model(model_dir)
    streams = encode_split(corpus, "test", max_tokens=args.eval_tokens)
    calib = calibration_batches(view, Path(corpus), tokens=args.calib_tokens, seq_len=256, batch_size=4, seed=0)
    start = time.perf_counter()
    rows = quality_rows(view, streams, calib, args)
    over = overhead(view, load_tokenizer(model_dir), args)
    b = view.blocks[0]
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": args.threads, "model": os.path.relpath(model_dir, ROOT), "top_k": b.top_k,
            "experts": b.num_experts, "moe_layers": len(view.blocks), "eval_tokens": args.eval_tokens,
            "calib_tokens": calib.num_tokens, "runs": args.runs, "new_tokens": args.new_tokens,
            "load_average": os.getloadavg()[0],
            "seconds": time.perf_counter() - start}
    domains = list(streams)
    table = Table(title="dynamic expert count")
    for col in ["method", "setting", "active", *[f"ppl {d}" for d in domains]]:
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], r["setting"], f"{r['active']:.2f}", *[f"{r['ppl'][d]:.2f}" for d in domains])
    Console().print(table)
    print(f"slowdown with experts_off: generation {100 * over['generate']['slowdown_paired']['experts_off']:+.1f} %, "
          f"forward {100 * over['forward']['slowdown_paired']['experts_off']:+.1f} % (median of per-round ratios)")
    for path, text in ((args.out, json.dumps({"meta": meta, "rows": rows, "overhead": over}, indent=2) + "\n"),
                       (args.md, markdown(meta, rows, over, domains))):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    print(f"wrote {args.out} and {args.md} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
