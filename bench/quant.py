"""Benchmark: quantised experts (RTN, GPTQ, PMQ, EAQuant; W4A4 / W3A4) on the embedded default model, per
domain, against full precision.

    python bench/quant.py                     # -> bench/results/quant.json, docs/results/quant.md
    python bench/quant.py --bits 4 --calib-tokens 4096 --eval-tokens 4096
    python bench/quant.py --methods eaquant --out /tmp/q.json --doc /tmp/q.md   # some rows only

Rows: RTN, GPTQ and EAQuant at each of ``--bits``; PMQ and greedy at each ``--avg-bits`` budget; GPTQ and
EAQuant at each ``--wa`` weight/activation setting (per-token activation fake-quantisation of the expert
linears' inputs, :mod:`moelab.compress.quant.act`). EAQuant: smoothing (alpha 0.6, max aggregation) and its
balanced Hessians computed once and shared by its rows; each row aligns its routers (under its activation
bits) on the calibration tokens, and the routing KL before / after alignment is reported.

Calibration: ``--calib-tokens`` tokens of the corpus' training split, an equal share per domain (seed 0),
one routed pass (plus a pass on all tokens for starved experts); the per-expert Hessians are shared by
every GPTQ/PMQ row. Evaluation: the first ``--eval-tokens`` tokens of each domain's ``--split``
(default test), windows of ``--seq-len`` (the full-precision log-probabilities computed once, then one
pass per row): perplexity (as :func:`moelab.run.evaluate.evaluate_streams`: each window predicts its last
``seq_len - 1`` tokens), KL(full precision || quantised) in nats per token,
top-1 agreement of next-token predictions, and top-k routing agreement (the mean share of each
token's k experts that the quantised model also picks, over the MoE layers after the first: the first
MoE layer's router input is unchanged). Sizes: bytes of the compressed-tensors checkpoint (written
and measured) for uniform rows; for mixed-precision rows the same layout counted (codes packed at each
expert's bits, plus scales), since compressed-tensors checkpoints with mixed bits do not load in stock
transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _docs import replace_between  # bench/_docs.py: the script's folder is on sys.path
from rich.console import Console
from rich.table import Table

import moelab
from moelab.compress.calib import calibration_batches
from moelab.compress.evaluate import check_vocab, load_model
from moelab.compress.quant import (
    ActQuantConfig,
    CalibPolicy,
    EAQuantConfig,
    PMQConfig,
    QuantConfig,
    QuantSpec,
    collect_hessians,
    dequantized_model,
    eaquant,
    install_act_quant,
    mixed_precision,
    quantize_experts,
)
from moelab.compress.quant.checkpoint import checkpoint_bytes, save_quantized
from moelab.compress.quant.eaquant import balanced_policy, smooth
from moelab.data.atomic import atomic_write_text
from moelab.models import open_model
from moelab.run.evaluate import encode_split, eval_windows
from moelab.run.loss import next_token_nll
from moelab.run.runner import evaluating

BEGIN, END = "<!-- bench/quant.py: begin -->", "<!-- bench/quant.py: end -->"


class Reference:
    """The full-precision model's next-token log-probabilities, argmax and routing on every evaluation
    window, computed once; :meth:`compare` runs a quantised model over the same windows in one pass."""

    def __init__(self, model, streams: dict[str, torch.Tensor], seq_len: int, batch: int = 8) -> None:
        self.batches = {d: list(eval_windows(s, seq_len).split(batch)) for d, s in streams.items()}
        self.logp, self.ids, self.nll = {}, {}, {}
        for d, bs in self.batches.items():
            out = [self._run(model, b) for b in bs]
            self.logp[d] = [o[0] for o in out]
            self.ids[d] = [o[1] for o in out]
            self.nll[d] = sum(o[2] for o in out) / sum(b.shape[0] * (b.shape[1] - 1) for b in bs)

    @staticmethod
    @torch.no_grad()
    def _run(model, ids_BS):
        view = open_model(model)
        routed: dict[int, torch.Tensor] = {}
        hooks = [b.register_routing_hook(lambda ev: routed.__setitem__(ev.block.layer, ev.ids_TK)) for b in view.blocks]
        with evaluating(model, hooks):
            logits = model(input_ids=ids_BS, use_cache=False).logits
        nll = float(next_token_nll(logits, ids_BS, reduction="sum"))
        return torch.log_softmax(logits[:, :-1].float(), -1), routed, nll

    def compare(self, model) -> dict:
        """Per domain: perplexity, KL(full || model), top-1 agreement; per MoE layer: top-k routing agreement."""
        ppl, kl, top1, agree, n_agree = {}, {}, {}, {}, {}
        for d, bs in self.batches.items():
            k_sum = t_sum = nll = 0.0
            count = 0
            for i, b in enumerate(bs):
                logp, routed, s = self._run(model, b)
                ref = self.logp[d][i]
                k_sum += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
                t_sum += int((ref.argmax(-1) == logp.argmax(-1)).sum())
                nll += s
                count += ref.shape[0] * ref.shape[1]
                for layer, ids in routed.items():
                    same = (self.ids[d][i][layer].unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).double()
                    agree[layer] = agree.get(layer, 0.0) + float(same.sum())
                    n_agree[layer] = n_agree.get(layer, 0) + same.numel()
            ppl[d], kl[d], top1[d] = math.exp(nll / count), k_sum / count, t_sum / count
        return {"perplexity": ppl, "kl": kl, "top1": top1,
                "routing_agreement": {layer: agree[layer] / n_agree[layer] for layer in sorted(agree)}}


def packed_bytes(view, result, base_bytes: int) -> int:
    """The compressed-tensors layout counted: original bytes minus the experts' weights, plus packed codes,
    scales (4 bytes each here: float32 model) and zero points."""
    elem = next(view.model.parameters()).element_size()
    full = sum(b.gate.numel() + b.up.numel() + b.down.numel() for b in view.blocks) * elem
    packed = 0
    for qb in result.blocks.values():
        for tensors in qb.experts:
            for qt in tensors.values():
                O, I = qt.q.shape  # noqa: E741
                packed += O * -(-I * qt.config.bits // 32) * 4 + qt.scale.numel() * elem + 16
                if not qt.config.symmetric:
                    packed += -(-O * qt.config.bits // 32) * qt.scale.shape[-1] * 4
    return base_bytes - full + packed


KINDS = ("rtn", "gptq", "eaquant", "pmq", "greedy", "noalign")


def rows_to_run(bits: list[int], avg: list[float], wa: list[tuple[int, int]], kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """The rows, in table order; ``kinds`` keeps some of rtn / gptq / eaquant / pmq / greedy / noalign."""
    out = [dict(method=m, bits=b, allocate=None, act_bits=None) for b in bits for m in ("rtn", "gptq", "eaquant")]
    out += [dict(method="gptq", bits=a, allocate=al, act_bits=None) for a in avg for al in ("pmq", "greedy")]
    out += [dict(method=m, bits=w, allocate=None, act_bits=a) for w, a in wa for m in ("gptq", "eaquant")]
    # ablation: EAQuant without its router alignment, at the first weight/activation setting
    out += [dict(method="eaquant", bits=w, allocate=None, act_bits=a, align=False) for w, a in wa[:1]]
    return [r for r in out if ("noalign" if r.get("align") is False else r["allocate"] or r["method"]) in kinds]


def _quantize_row(r, view, hessians, ea, args):
    """``(model to evaluate, view it was quantised from, result, alignment or None)`` of one row."""
    cfg = QuantConfig(int(r["bits"]) if r["allocate"] is None else 4, args.group, True)
    spec = QuantSpec("gptq" if r["method"] == "eaquant" else r["method"], cfg,
                     policy=CalibPolicy(min_tokens=args.min_tokens))
    act = None if r["act_bits"] is None else ActQuantConfig(r["act_bits"])
    if r["method"] == "eaquant":
        cfg_ea = EAQuantConfig(act=act, align=r.get("align", True))
        run = eaquant(view, ea["calib"], spec, cfg_ea, smoothed=ea["smoothed"], hessians=ea["hessians"])
        return run.model, open_model(run.model), run.result, run.alignment
    if r["allocate"] is None:
        res = quantize_experts(view, spec, hessians=hessians if r["method"] == "gptq" else None)
    else:
        res = mixed_precision(view, spec, hessians, PMQConfig(r["bits"]), r["allocate"])
    return dequantized_model(view, res), view, res, None


def run_row(r, view, hessians, ea, reference: Reference, args, base_bytes) -> dict:
    t0 = time.perf_counter()
    model, qview, res, alignment = _quantize_row(r, view, hessians, ea, args)
    seconds = time.perf_counter() - t0
    if r["act_bits"] is not None:
        with install_act_quant(model, ActQuantConfig(r["act_bits"])):
            ev = reference.compare(model)
    else:
        ev = reference.compare(model)
    agree = ev["routing_agreement"]
    if r["allocate"] is None:
        with tempfile.TemporaryDirectory() as tmp:
            size = checkpoint_bytes(save_quantized(qview, res, Path(tmp) / "ct", format="compressed-tensors"))
    else:
        size = packed_bytes(view, res, base_bytes)
    first = min(agree)
    alloc = (res.calibration or {}).get("allocation")
    extra = {} if alloc is None else {
        "objective": sum(v["objective"] for v in alloc["layers"].values()),
        "experts_at_bits": {str(b): sum(v["bits"].count(b) for v in alloc["layers"].values())
                            for b in alloc["candidates"]},
        "bits_per_expert": {k: v["bits"] for k, v in alloc["layers"].items()}}
    if alignment:
        extra["router_alignment"] = {str(k): v for k, v in alignment.items()}
        extra["router_kl_before"] = statistics.mean(v["kl_before"] for v in alignment.values())
        extra["router_kl_after"] = statistics.mean(v["kl_after"] for v in alignment.values())
        extra["calibration_cap"] = res.extra.get("cap")
    return {**r, **ev, **extra, "average_bits": res.average_bits(), "routing_agreement_mean": statistics.mean(
                v for k, v in agree.items() if k != first), "bytes": size, "seconds": round(seconds, 2)}


def row_name(r: dict) -> str:
    if r["allocate"]:
        return f"{r['method']} + {r['allocate']} ({r['bits']} budget)"
    name = f"{r['method']} " + (f"W{r['bits']}A{r['act_bits']}" if r["act_bits"] else f"int{r['bits']}")
    return name + (" (no router alignment)" if r.get("align") is False else "")


def markdown(rows, original, meta, calib) -> str:
    domains = list(original["perplexity"])
    head = ["method", "bits/weight", *[f"ppl {d}" for d in domains], "worst ppl vs full",
            *[f"KL {d}" for d in domains], "top-1", "routing top-k agree", "router KL calib before → after",
            "checkpoint MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| full precision | 32 | " + " | ".join(f"{original['perplexity'][d]:.3f}" for d in domains)
                 + " | - | " + " | ".join("-" for _ in domains) + f" | - | - | - | {original['bytes'] / 1e6:.2f} |")
    for r in rows:
        worst = max(r["perplexity"][d] / original["perplexity"][d] - 1 for d in domains)
        router = (f"{r['router_kl_before']:.4f} → {r['router_kl_after']:.4f}" if "router_kl_before" in r else "-")
        lines.append(f"| {row_name(r)} | {r['average_bits']:.2f} | "
                     + " | ".join(f"{r['perplexity'][d]:.3f}" for d in domains)
                     + f" | {worst:+.2%} | " + " | ".join(f"{r['kl'][d]:.4f}" for d in domains)
                     + f" | {statistics.mean(r['top1'].values()):.3f} | {r['routing_agreement_mean']:.3f}"
                     + f" | {router} | {r['bytes'] / 1e6:.2f} |")
    info = (f"Generated by `python bench/quant.py` on {meta['date']} ({meta['machine']}, torch {meta['torch']}, "
            f"{meta['threads']} threads). Model: `{meta['model']}` (routed experts quantised; routers, the "
            f"shared expert, the dense layer, attention and embeddings in float32). Weights: symmetric int, "
            f"group {meta['group']} along the input dim. Calibration: {meta['calib_tokens']:,} training-split "
            f"tokens (equal share per domain, seed 0); routed tokens per expert min {calib['routed_tokens_min']} / "
            f"median {calib['routed_tokens_median']:.0f} / max {calib['routed_tokens_max']}, "
            f"{calib['recalibrated_on_all_tokens']} experts recalibrated on all tokens (fewer than "
            f"{meta['min_tokens']} routed), {calib['uncalibrated']} uncalibrated. Evaluation: the first "
            f"{meta['eval_tokens']:,} tokens of each domain's {meta['split']} split, windows of {meta['seq_len']}. "
            "KL(full || quantised) in nats per token; top-1: share of identical next-token argmax (mean over "
            "domains); routing top-k agree: mean share of each token's experts kept, MoE layers after the first. "
            "Checkpoint MB: the compressed-tensors checkpoint (uniform rows: written and measured; PMQ/greedy rows: "
            "the same layout counted). PMQ/greedy: bits per expert from {2, 3, 4} under the budget, per layer, "
            "GPTQ at each width. EAQuant: smoothing (alpha 0.6, max aggregation) folded into the norms, "
            "routers and experts, GPTQ on the smoothed model with calibration balance (at most "
            f"{meta.get('eaquant_cap', '-')} routed tokens per expert: 2 x the mean), then the routers aligned "
            "by KL to full-precision routing on the calibration tokens (router KL: mean over the MoE layers after the "
            "first, nats "
            "per calibration token). WxAy: per-token symmetric y-bit fake quantisation of the expert linears' "
            "inputs (gate/up input and down input; attention, routers and the shared expert keep float32 "
            "activations); their checkpoint is the weight-only one.")
    return "\n".join([info, "", *lines])


def write_doc(path: Path, table: str) -> None:
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    new = replace_between(old, BEGIN, END, table)
    if new is None:
        new = f"# Quantised experts on the embedded default model\n\n{BEGIN}\n{table}\n{END}\n\n## Notes\n"
    atomic_write_text(path, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: the embedded corpus)")
    ap.add_argument("--bits", default="8,4,3,2", help="comma-separated uniform bit-widths")
    ap.add_argument("--avg-bits", default="2.5", help="comma-separated PMQ budgets ('' for none)")
    ap.add_argument("--wa", default="4:4,3:4", help="comma-separated weight:activation bits rows ('' for none)")
    ap.add_argument("--methods", default=",".join(KINDS), help=f"comma-separated row kinds, of {', '.join(KINDS)}")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--split", default="test")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant.json"))
    ap.add_argument("--doc", type=Path, default=Path("docs/results/quant.md"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = args.model or moelab.default_model()
    corpus = args.corpus or moelab.default_corpus()
    reference = load_model(model_dir)
    view = open_model(reference)
    streams = encode_split(corpus, args.split, max_tokens=args.eval_tokens)
    check_vocab(streams, reference, "corpus")
    calib = calibration_batches(view, corpus, tokens=args.calib_tokens, seq_len=args.seq_len, seed=0,
                                tokenizer=model_dir)
    t0 = time.perf_counter()
    hessians = collect_hessians(view, calib, CalibPolicy(min_tokens=args.min_tokens))
    calib_s = time.perf_counter() - t0
    from moelab.compress.quant import calibration_report

    cal = calibration_report(hessians)
    ref = Reference(reference, streams, args.seq_len)
    original = {"perplexity": {d: math.exp(v) for d, v in ref.nll.items()}, "bytes": checkpoint_bytes(model_dir)}
    kinds = tuple(k for k in args.methods.split(",") if k)
    if set(kinds) - set(KINDS):
        ap.error(f"--methods: {sorted(set(kinds) - set(KINDS))} not of {KINDS}")
    todo = rows_to_run([int(x) for x in args.bits.split(",") if x], [float(x) for x in args.avg_bits.split(",") if x],
                       [tuple(int(v) for v in x.split(":")) for x in args.wa.split(",") if x], kinds)
    ea = {"calib": calib}
    if any(r["method"] == "eaquant" for r in todo):
        t1 = time.perf_counter()
        ea["smoothed"] = smooth(view, calib, EAQuantConfig())
        policy = balanced_policy(CalibPolicy(min_tokens=args.min_tokens), ea["smoothed"].view, calib,
                                 EAQuantConfig().cap_ratio)
        ea["hessians"] = collect_hessians(ea["smoothed"].view, calib, policy)
        ea["cap"], ea["seconds"] = policy.cap, round(time.perf_counter() - t1, 1)
    console, rows = Console(stderr=True), []
    for i, r in enumerate(todo):
        console.print(f"[{i + 1}/{len(todo)}] {row_name(r)}")
        rows.append(run_row(r, view, hessians, ea, ref, args, original["bytes"]))
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine":
            f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__, "threads": args.threads,
            "model": str(model_dir.relative_to(Path.cwd()) if model_dir.is_relative_to(Path.cwd()) else model_dir),
            "calib_tokens": calib.num_tokens, "calib_seconds": round(calib_s, 1), "eval_tokens": args.eval_tokens,
            "split": args.split, "seq_len": args.seq_len, "group": args.group, "min_tokens": args.min_tokens,
            "eaquant_cap": ea.get("cap"), "eaquant_prepare_seconds": ea.get("seconds"),
            "total_seconds": round(time.perf_counter() - t_start, 1), "python": sys.version.split()[0]}
    table = Table("method", "bits", *[f"ppl {d}" for d in streams], "KL", "route agree", "MB", title="quantisation")
    table.add_row("full", "32", *[f"{original['perplexity'][d]:.3f}" for d in streams], "-", "-",
                  f"{original['bytes'] / 1e6:.2f}")
    for r in rows:
        table.add_row(row_name(r), f"{r['average_bits']:.2f}",
                      *[f"{r['perplexity'][d]:.3f}" for d in streams], f"{statistics.mean(r['kl'].values()):.4f}",
                      f"{r['routing_agreement_mean']:.3f}", f"{r['bytes'] / 1e6:.2f}")
    Console().print(table)
    atomic_write_text(args.out, json.dumps({"meta": meta, "original": original, "calibration": cal, "rows": rows},
                                           indent=1) + "\n")
    write_doc(args.doc, markdown(rows, original, meta, cal))
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
