"""Benchmark: test-time routing on the shipped default model, per domain of the test split.

    python bench/test_time_routing.py          # -> bench/results/test_time_routing.json, docs/results/test_time_routing.md
    python bench/test_time_routing.py --model coarse --windows 8 --window 64

Each domain's test stream is cut into ``--windows`` windows of ``--window`` tokens. Every method
sees a window's first half as context and is scored on the second half: next-token loss (nats) and
top-1 accuracy of the predictions of tokens ``window/2 .. window-1``, all methods on the same
positions. Methods:
- base: the model as it is;
- SCMoE (``moelab.steer.scmoe``, alpha 0.1, beta 0.5, rank = top_k): top-1 accuracy of the contrast
  score; its loss is the cross-entropy of softmax(score) without the plausibility cut-off (with it,
  a target outside the plausible set has infinite loss) and the table gives the share of targets
  the cut-off would exclude;
- C3PO (``moelab.steer.c3po``): reference set = the lowest-loss half of ``--pool`` training windows
  per domain; a test window's embedding and neighbours come from its first half only; kernel, mode
  and neighbourhood-GD surrogates, and the oracle fitted on the window's own labels (a bound);
- Rewiring (``moelab.steer.rewire``): logit offsets fitted on the first half.
Cost per token: seconds per window over base's, median over windows (includes each method's fitting).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _docs import replace_between  # bench/_docs.py: the script's folder is on sys.path

import moelab
from moelab.data import DEFAULT_MODEL, MODEL_NAMES
from moelab.data.atomic import atomic_write_text
from moelab.data.streams import encode_split
from moelab.models import open_model
from moelab.steer._fit import FitConfig
from moelab.steer.c3po import C3POConfig, build_reference, remixed, surrogate
from moelab.steer.rewire import RewireConfig, fit_offsets, rewired
from moelab.steer.scmoe import SCMoEConfig, contrast, weak_pass

METHODS = ("base", "scmoe", "c3po-kernel", "c3po-mode", "c3po-ngd", "c3po-oracle", "rewire")


def windows(stream: torch.Tensor, n: int, length: int) -> torch.Tensor:
    usable = stream[: (stream.numel() // length) * length].reshape(-1, length)
    if usable.shape[0] < n:
        raise SystemExit(f"only {usable.shape[0]} windows of {length} tokens in the stream, asked {n}")
    return usable[:n]


def scored(logits_1SV: torch.Tensor, ids_1S: torch.Tensor, start: int) -> tuple[float, float, int]:
    """(sum of NLL, correct, count) of predictions of tokens start..S-1."""
    pred_V = logits_1SV[0, start - 1:-1].float()
    target = ids_1S[0, start:]
    nll = torch.nn.functional.cross_entropy(pred_V, target, reduction="sum").item()
    return nll, float((pred_V.argmax(-1) == target).sum()), int(target.numel())


def logits_of(view, ids):
    with torch.no_grad():
        return view.model(input_ids=ids, use_cache=False).logits


def run_method(view, method: str, ids: torch.Tensor, ref, cfg: C3POConfig, rw: RewireConfig, sc: SCMoEConfig):
    """(nll, correct, count, extra) on window ``ids [1, S]``, scored on its second half."""
    half = ids.shape[1] // 2
    if method == "base":
        return (*scored(logits_of(view, ids), ids, half), 0.0)
    if method == "scmoe":
        strong = logits_of(view, ids)
        with weak_pass(view, sc.rank):
            weak = logits_of(view, ids)
        score = contrast(strong, weak, sc.alpha, sc.beta)
        open_score = contrast(strong, weak, 1e-30, sc.beta)  # no cut-off: a proper distribution
        nll, _, n = scored(open_score, ids, half)
        _, correct, _ = scored(score.masked_fill(score.isinf(), -1e30), ids, half)
        target = ids[0, half:]
        excluded = float(score[0, half - 1:-1].gather(-1, target[:, None]).isinf().sum())
        return nll, correct, n, excluded
    if method == "rewire":
        offsets, _ = fit_offsets(view, ids[:, :half], rw)
        with rewired(view, offsets):
            return (*scored(logits_of(view, ids), ids, half), 0.0)
    kind = method.removeprefix("c3po-")
    sample = ids if kind == "oracle" else ids[:, :half]  # only the oracle sees the labels
    targets, _ = surrogate(view, ref, sample, kind, cfg)
    with remixed(view, targets, cfg.mix):
        return (*scored(logits_of(view, ids), ids, half), 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help=f"shipped model ({', '.join(MODEL_NAMES)}) or a folder")
    ap.add_argument("--windows", type=int, default=12, help="test windows per domain")
    ap.add_argument("--window", type=int, default=96, help="tokens per window")
    ap.add_argument("--pool", type=int, default=24, help="training windows per domain for C3PO's reference pool")
    ap.add_argument("--mix", type=float, default=0.5, help="C3PO's re-mixing strength (1: replace, as the paper)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/test_time_routing.json"))
    ap.add_argument("--doc", type=Path, default=Path("docs/results/test_time_routing.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shipped = args.model is None or args.model in MODEL_NAMES
    model_dir = moelab.default_model(args.model) if shipped else Path(args.model)
    corpus = moelab.default_corpus()
    from moelab.compress.evaluate import check_same_tokenizer, load_model

    check_same_tokenizer(model_dir, corpus)
    view = open_model(load_model(model_dir))
    test = encode_split(corpus, "test", args.windows * args.window + 1)
    train = encode_split(corpus, "train", args.pool * args.window + 1)
    cfg = C3POConfig(critical_layers=2, neighbours=3, mix=args.mix, fit=FitConfig(steps=5, lr=0.05))
    rw = RewireConfig(last_layers=2, fit=FitConfig(steps=5, lr=0.1))
    sc = SCMoEConfig()
    pool = torch.cat([windows(s, args.pool, args.window) for s in train.values()])
    ref = build_reference(view, pool, keep=pool.shape[0] // 2, cfg=cfg)
    rows = {}
    for domain, stream in test.items():
        wins = windows(stream, args.windows, args.window)
        for method in METHODS:
            nll = correct = count = extra = 0.0
            secs = []
            for w in wins:
                t0 = time.perf_counter()
                a, b, c, d = run_method(view, method, w.unsqueeze(0), ref, cfg, rw, sc)
                secs.append(time.perf_counter() - t0)
                nll, correct, count, extra = nll + a, correct + b, count + c, extra + d
            rows[domain, method] = {"loss": nll / count, "top1": correct / count, "tokens": int(count),
                                    "excluded": extra / count, "s_per_window": statistics.median(secs)}
            print(f"{domain:6s} {method:12s} loss {nll / count:.4f} top1 {correct / count:.4f}", flush=True)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": args.threads, "model": args.model or DEFAULT_MODEL, "windows": args.windows,
            "window": args.window, "pool": args.pool, "reference": int(ref.ids_NS.shape[0]),
            "c3po": {"critical_layers": cfg.critical_layers, "neighbours": cfg.neighbours, "steps": cfg.fit.steps, "mix": cfg.mix,
                     "lr": cfg.fit.lr}, "rewire": {"last_layers": rw.last_layers, "steps": rw.fit.steps,
                                                   "lr": rw.fit.lr}}
    write(args, meta, rows, list(test))


def write(args, meta: dict, rows: dict, domains: list[str]) -> None:
    base = {d: rows[d, "base"] for d in domains}
    head = ["method", *[f"{d} loss" for d in domains], *[f"{d} top-1" for d in domains], "cost ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        cost = statistics.median(rows[d, m]["s_per_window"] / base[d]["s_per_window"] for d in domains)
        cells = [f"{rows[d, m]['loss']:.4f}" for d in domains] + [f"{rows[d, m]['top1']:.3f}" for d in domains]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {cost:.1f} |")
    oracle_gap = {d: base[d]["loss"] - rows[d, "c3po-oracle"]["loss"] for d in domains}
    closed = {d: {m: ((base[d]["loss"] - rows[d, f"c3po-{m}"]["loss"]) / oracle_gap[d]
                      if oracle_gap[d] > 1e-9 else math.nan) for m in ("kernel", "mode", "ngd")} for d in domains}
    excl = ", ".join(f"{d} {rows[d, 'scmoe']['excluded']:.1%}" for d in domains)
    info = (f"Generated by `python bench/test_time_routing.py` on {meta['date']} ({meta['machine']}, torch "
            f"{meta['torch']}, {meta['threads']} thread). Model: {meta['model']}; per domain {meta['windows']} test "
            f"windows of {meta['window']} tokens, scored on their second halves ({rows[domains[0], 'base']['tokens']:,} "
            f"predictions per domain). C3PO: {meta['reference']} reference windows (the lowest-loss half of "
            f"{meta['pool']} training windows per domain), last {meta['c3po']['critical_layers']} MoE layers, mix {meta['c3po']['mix']}, "
            f"{meta['c3po']['neighbours']} neighbours, {meta['c3po']['steps']} Adam steps at lr {meta['c3po']['lr']}; "
            f"Rewiring: last {meta['rewire']['last_layers']} MoE layers, {meta['rewire']['steps']} steps at lr "
            f"{meta['rewire']['lr']}, fitted on the first half. SCMoE loss is without the plausibility cut-off; "
            f"targets the cut-off excludes: {excl}. Cost: seconds per window over base's (fitting included).")
    share = "; ".join(f"{d}: " + ", ".join(f"{m} {v:.0%}" if math.isfinite(v) else f"{m} -" for m, v in c.items())
                      for d, c in closed.items())
    body = "\n".join([info, "", *lines, "", f"Share of the base-to-oracle loss gap each C3PO surrogate closes: {share}."])
    begin, end = "<!-- bench/test_time_routing.py: begin -->", "<!-- bench/test_time_routing.py: end -->"
    old = args.doc.read_text(encoding="utf-8") if args.doc.is_file() else (
        "# Test-time routing on the shipped default model\n\n" + begin + "\n" + end + "\n\n## Notes\n")
    doc = replace_between(old, begin, end, body)
    out = {"meta": meta, "rows": [{"domain": d, "method": m, **v} for (d, m), v in rows.items()], "closed": closed}
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    atomic_write_text(args.doc, doc)
    print(body)


if __name__ == "__main__":
    main()
