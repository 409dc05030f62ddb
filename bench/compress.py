"""Benchmark: every compression planner on the embedded default model, per domain, against the original.

    python bench/compress.py                          # default model -> bench/results/compress-fine.json
    python bench/compress.py --model coarse           # -> bench/results/compress-coarse.json
    python bench/compress.py --ratios 0.5 --methods random,reap --model DIR --corpus DIR

For each planner in the registry and each ratio (share of experts removed; for the atomic HEAPr the
same share of routed-expert parameters, ranked globally across layers as in its paper), calibrate on
``--calib-tokens`` tokens of the corpus' training split (seeded), plan, apply, and evaluate on the
first ``--eval-tokens`` validation tokens of each domain: perplexity, KL(original || compressed) and
top-1 agreement. Domain-specific rows calibrate EASY-EP and frequency pruning on one domain's text
only, so the two compare on that domain. ``random`` and the domain-calibrated rows are run with several
seeds (mean, and the per-seed range of perplexity): their differences are of the size of the seed spread.

Each model's table is regenerated between its own markers in ``docs/results/compression.md``, and
so is the granularity table that sets the shipped models side by side (from every
``bench/results/compress-*.json`` present); the hand-written notes are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from _docs import replace_between  # bench/_docs.py: the script's folder is on sys.path
from rich.console import Console
from rich.table import Table

import moelab
from moelab.compress.evaluate import corpus_streams, evaluate_compressed, load_model
from moelab.compress.pipeline import compress
from moelab.compress.registry import PLANNERS
from moelab.compress.spec import CompressSpec
from moelab.data import DEFAULT_MODEL, MODEL_NAMES
from moelab.data.atomic import atomic_write_text

MARK = "<!-- bench/compress.py: {} {} -->"  # (begin | end, section)
DOMAIN_METHODS = ("easy-ep", "frequency")  # calibrated per domain as well
RANDOM_SEEDS = (0, 1, 2)
DOMAIN_SEEDS = (0, 1, 2, 3, 4)


def runs(methods: list[str], ratios: list[float], domains: list[str], random_seeds=RANDOM_SEEDS,
         domain_seeds=DOMAIN_SEEDS) -> list[dict]:
    """The (method, ratio, label, seed, budget) of every row, in table order."""
    out = []
    for ratio in ratios:
        for m in methods:
            seeds = random_seeds if m == "random" else (0,)
            budget = "global" if PLANNERS[m][0] == "atomic" else "layer"
            out += [dict(method=m, ratio=ratio, label=None, seed=s, budget=budget) for s in seeds]
            if m in DOMAIN_METHODS:
                out += [dict(method=m, ratio=ratio, label=d, seed=s, budget="layer") for d in domains
                        for s in domain_seeds]
    return out


def routed_nonzero(model: torch.nn.Module) -> int:
    """Non-zero routed-expert weights (atomic pruning zeroes neurons without shrinking tensors)."""
    from moelab.models import view_model

    return sum(int((t != 0).sum()) for b in view_model(model).blocks for t in (b.gate, b.up, b.down) if t is not None)


def run_one(r: dict, model_dir: Path, corpus: Path, streams, reference, args) -> dict:
    spec = CompressSpec(ratio=r["ratio"], budget=r["budget"], seed=r["seed"])
    res = compress(model_dir, r["method"], spec, calib_corpus=corpus, calib_tokens=args.calib_tokens,
                   calib_label=r["label"], seq_len=args.seq_len)
    ev = evaluate_compressed(res.model, streams, reference=reference, seq_len=args.seq_len)
    return {**r, "kind": PLANNERS[r["method"]][0], "params": res.params_after,
            "routed_nonzero": routed_nonzero(res.model), "perplexity": ev.perplexity, "kl": ev.kl,
            "top1": ev.top1, "seconds": round(res.seconds, 2), "warnings": res.warnings}


def aggregate_seeds(rows: list[dict]) -> list[dict]:
    """One row per (method, ratio, label): the mean over its seeds, with the per-seed perplexity range."""
    out, seen = [], set()
    for r in rows:
        key = (r["method"], r["ratio"], r["label"])
        group = [x for x in rows if (x["method"], x["ratio"], x["label"]) == key]
        if len(group) == 1:
            out.append(r)
            continue
        if key in seen:
            continue
        seen.add(key)
        mean = {k: {d: statistics.mean(x[k][d] for x in group) for d in r[k]} for k in ("perplexity", "kl", "top1")}
        spread = {d: (min(x["perplexity"][d] for x in group), max(x["perplexity"][d] for x in group))
                  for d in r["perplexity"]}
        out.append({**r, **mean, "seed": [x["seed"] for x in group], "ppl_range": spread,
                    "seconds": statistics.mean(x["seconds"] for x in group)})
    return out


def markdown(rows: list[dict], original: dict, meta: dict) -> str:
    domains = list(original["perplexity"])
    head = ["method", "calibrated on", "removed", "routed params kept", *[f"ppl {d}" for d in domains],
            "KL", "top-1", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| original | - | 0% | 100% | " + " | ".join(f"{original['perplexity'][d]:.2f}" for d in domains)
                 + " | - | - | - |")
    for r in rows:
        kept = r["routed_nonzero"] / original["routed_nonzero"]
        ppl = [f"{r['perplexity'][d]:.2f}" + (f" ({r['ppl_range'][d][0]:.1f}-{r['ppl_range'][d][1]:.1f})"
                                              if "ppl_range" in r else "") for d in domains]
        kl, top1 = statistics.mean(r["kl"].values()), statistics.mean(r["top1"].values())
        name = r["method"] + (f" (mean of {len(r['seed'])} seeds)" if isinstance(r["seed"], list) else "")
        lines.append(f"| {name} | {r['label'] or 'all'} | {r['ratio']:.0%} | {kept:.0%} | " + " | ".join(ppl)
                     + f" | {kl:.3f} | {top1:.3f} | {r['seconds']:.1f} |")
    info = (f"Generated by `{meta.get('command', 'python bench/compress.py')}` on {meta['date']} ({meta['machine']}, torch {meta['torch']}, "
            f"{meta['threads']} threads). Model: `{meta['model']}`; calibration: {meta['calib_tokens']:,} tokens "
            f"of the training split per run, an equal share per domain unless calibrated on one (seed 0; random: "
            f"seeds {meta.get('random_seeds', list(RANDOM_SEEDS))}; domain-calibrated rows: seeds "
            f"{meta.get('domain_seeds', list(DOMAIN_SEEDS))}, perplexity range "
            "in brackets); evaluation: the first "
            f"{meta['eval_tokens']:,} validation tokens of each domain, windows of {meta['seq_len']}. KL is "
            "KL(original || compressed) in nats per token and top-1 the share of identical argmax predictions, "
            "both averaged over domains; s is seconds to calibrate, plan and apply.")
    return "\n".join([info, "", *lines])


def granularity(results: dict[str, dict]) -> str:
    """Models side by side: per planner and ratio, the geometric-mean perplexity ratio over domains."""
    names = sorted(results)
    head = ["method", "removed", *[f"{n}: ppl ×, KL" for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = {}
    for n, res in results.items():
        base = res["original"]["perplexity"]
        for r in res["rows"]:
            if r["label"] is None:
                ratio = statistics.geometric_mean(r["perplexity"][d] / base[d] for d in base)
                cell[n, r["method"], r["ratio"]] = f"×{ratio:.2f}, {statistics.mean(r['kl'].values()):.3f}"
    keys = sorted({(m, q) for _, m, q in cell}, key=lambda k: (k[1], k[0]))
    for m, q in keys:
        lines.append(f"| {m} | {q:.0%} | " + " | ".join(cell.get((n, m, q), "-") for n in names) + " |")
    models = "; ".join(f"{n}: `{results[n]['meta']['model']}` ({results[n]['meta']['date']})" for n in names)
    info = ("Perplexity after compression over the original's, geometric mean over the domains, and KL "
            f"(nats per token, mean over domains), from each model's table below. Models: {models}.")
    return "\n".join([info, "", *lines])


def write_doc(path: Path, section: str, body: str, title: str) -> None:
    """Replace ``section``'s text between its markers, or add it as a new ``## title`` before the notes."""
    begin, end = MARK.format("begin", section), MARK.format("end", section)
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Compression methods on the shipped models\n\n## Notes\n"
    new = replace_between(old, begin, end, body)
    if new is None:
        at = old.index("## Notes") if "## Notes" in old else len(old)
        new = old[:at] + f"## {title}\n\n{begin}\n{body}\n{end}\n\n" + old[at:]
    atomic_write_text(path, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"shipped model ({', '.join(MODEL_NAMES)}) or a model folder "
                    "(default: the default model)")
    ap.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: the embedded corpus)")
    ap.add_argument("--methods", default=",".join(sorted(PLANNERS)), help="comma-separated planners")
    ap.add_argument("--ratios", default="0.25,0.5", help="comma-separated shares of experts removed")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-seeds", type=int, default=len(RANDOM_SEEDS), help="seeds of random pruning")
    ap.add_argument("--domain-seeds", type=int, default=len(DOMAIN_SEEDS), help="seeds of domain-calibrated rows")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/compress-NAME.json")
    ap.add_argument("--doc", type=Path, default=Path("docs/results/compression.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shipped = args.model is None or args.model in MODEL_NAMES
    model_dir = moelab.default_model(args.model) if shipped else Path(args.model)
    name = (args.model or DEFAULT_MODEL) if shipped else model_dir.name
    args.out = args.out or Path(f"bench/results/compress-{name}.json")
    corpus = args.corpus or moelab.default_corpus()
    reference = load_model(model_dir)
    streams = corpus_streams(corpus, model_dir, args.eval_tokens)
    base = evaluate_compressed(reference, streams, seq_len=args.seq_len)
    original = {"perplexity": base.perplexity, "params": base.params, "routed_nonzero": routed_nonzero(reference)}
    todo = runs(args.methods.split(","), [float(x) for x in args.ratios.split(",")], list(streams),
                tuple(range(args.random_seeds)), tuple(range(args.domain_seeds)))
    console = Console(stderr=True)
    rows = []
    for i, r in enumerate(todo):
        console.print(f"[{i + 1}/{len(todo)}] {r['method']} ratio {r['ratio']} label {r['label']} seed {r['seed']}")
        rows.append(run_one(r, model_dir, corpus, streams, reference, args))
    rows = aggregate_seeds(rows)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine":
            f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__, "threads": args.threads,
            "model": str(model_dir.relative_to(Path.cwd()) if model_dir.is_relative_to(Path.cwd()) else model_dir),
            "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens, "seq_len": args.seq_len,
            "command": " ".join(["python bench/compress.py", *sys.argv[1:]]),
            "random_seeds": list(range(args.random_seeds)), "domain_seeds": list(range(args.domain_seeds)),
            "python": sys.version.split()[0]}
    table = Table("method", "calib", "ratio", *[f"ppl {d}" for d in streams], "KL", title="compression")
    table.add_row("original", "-", "0", *[f"{original['perplexity'][d]:.2f}" for d in streams], "-")
    for r in rows:
        table.add_row(r["method"], r["label"] or "all", f"{r['ratio']:.2f}",
                      *[f"{r['perplexity'][d]:.2f}" for d in streams], f"{statistics.mean(r['kl'].values()):.3f}")
    Console().print(table)
    atomic_write_text(args.out, json.dumps({"meta": meta, "original": original, "rows": rows}, indent=1) + "\n")
    write_doc(args.doc, name, markdown(rows, original, meta), f"The {name} model")
    results = {f.stem.removeprefix("compress-"): json.loads(f.read_text(encoding="utf-8"))
               for f in sorted(args.out.parent.glob("compress-*.json"))}
    if len(results) > 1:
        write_doc(args.doc, "granularity", granularity(results), "Granularity: the shipped models side by side")
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
