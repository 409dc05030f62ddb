"""Benchmark of moelab.steer on the shipped model: switch drama-linked experts off, measure per-domain
test perplexity, and time a steering edit on a plain forward.

    python bench/steering.py                  # the default (fine-grained DeepSeek-V3) model
    python bench/steering.py --model coarse   # the coarse Qwen3-MoE model
    python bench/steering.py --part overhead  # only the overhead part (step 5), on the saved selections
    python bench/steering.py --part selection # only the code-aware selection section (step 6)

Steps:
1. the routing of ``--detect-tokens`` train-split tokens each of drama and code (one pass per side);
2. SteerMoE detection (risk difference, drama vs code) and RICE's nPMI ranking on the same routing,
   RICE's marker tokens being the naive Bayes classifier's ``--markers`` most drama-indicative tokens
   (the classifier is trained on the train split; its held-out accuracy on the test split is reported);
3. per-domain test perplexity (the first ``--eval-tokens`` tokens of each domain's test split,
   windows of 256, :func:`moelab.run.evaluate.evaluate_streams`) without steering and with the top
   ``--top`` experts of each ranking switched off (hard mask and SteerMoE's soft-off), and with RICE's
   reinforcement (combine weights x2);
4. greedy continuations (``--new-tokens``) of ``--prompts`` code prompts (the first 32 tokens of
   code test windows) with no edit, with the top ``--on`` drama-linked experts forced on (each
   ranking, hard ``experts_on``), with SteerMoE's soft-on of every slot at a large delta, and with
   the strongest pushes: every slot forced to a drama-linked expert, their weights multiplied, the
   10 most code-linked experts of each layer off; judged by the naive Bayes classifier (the share
   judged drama, also with whitespace-only tokens dropped), with the continuation's perplexity on
   its own under the unsteered model as a fluency check;
5. the overhead of a steering edit (``bench/_steering_overhead.py``): the CPU time of one forward
   (``--batch`` x 256 tokens, ``--repeat`` paired rounds) and of a greedy generation
   (``--new-tokens`` tokens, ``--gen-repeat`` rounds) with no edit, the identity edit (the seam
   alone) and each steering edit, with the torch ops dispatched and the CPU time spent routing.
   ``--part overhead`` reruns only this step, on the selections the last full run saved in ``--out``.
6. the code-aware selection (``bench/_steering_select.py``): switching off ``--sizes`` experts by the
   risk difference, the log odds ratio and per-layer budgets, and the greedy selection under a code
   perplexity ``--budget`` on ``--calib-tokens`` of the train split; forcing on in the last MoE
   layers only. ``--part selection`` runs steps 1-2 and this one and replaces its section.

Writes ``bench/results/steering.json`` and ``docs/results/steering.md``.
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

import _steering_overhead as overhead  # bench/_steering_overhead.py: the script's folder is on sys.path
import _steering_select  # bench/_steering_select.py
import torch
from _steering_overhead import Edits
from rich.console import Console
from rich.table import Table

from moelab.data import default_corpus, default_model
from moelab.data.atomic import atomic_write_text
from moelab.data.streams import encode_split
from moelab.data.tokenizer import load_tokenizer
from moelab.models import open_model
from moelab.run import next_token_nll
from moelab.run.evaluate import evaluate_streams
from moelab.steer import experts_off, experts_on, scale_weights, switch_experts
from moelab.steer.classify import domain_windows, train_domain_classifier
from moelab.steer.detect import gather_pair, rank_risk_difference
from moelab.steer.rice import RICE_FACTOR, concat_routed, rank_npmi


def _push(view, on: dict, factor: float, off: dict | None):
    """Force ``on`` into every token's top-k, multiply their weights by ``factor`` and switch ``off``
    (the code-linked experts) off: the strongest push toward drama tried on this model."""
    def install():
        handles = [experts_off(view, off)] if off else []
        handles.append(experts_on(view, on))
        if factor != 1:
            handles.append(scale_weights(view, {layer: dict.fromkeys(e, factor) for layer, e in on.items()}))
        return Edits(*handles)

    return install


def _perplexity(view, streams, edit=None) -> dict[str, float]:
    handle = edit() if edit is not None else None
    try:
        return evaluate_streams(view.model, streams, 256).perplexity
    finally:
        if handle is not None:
            handle.remove()


def _generation_rates(view, nb, tokenizer, prompts: list[list[int]], conditions: dict, new_tokens: int) -> list[dict]:
    """Per condition: the share of greedy continuations the classifier judges each domain, the share
    judged drama once whitespace-only tokens are dropped (a run of newlines reads as verse), and the
    median perplexity of the continuation on its own (after BOS) under the unsteered model."""
    from moelab.run.generate import GenerationConfig, iter_token_ids

    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    blank = {i for i in range(view.model.config.vocab_size) if not tokenizer.decode([i]).strip()}
    bos = view.model.config.bos_token_id
    out = []
    for name, (selection, edit) in conditions.items():
        texts = []
        for ids in prompts:
            handles = [edit()] if edit is not None else []
            texts.append(list(iter_token_ids(view.model, ids, cfg, handles)))
        labels = nb.predict_many([torch.tensor(t).numpy() for t in texts])
        words = [[i for i in t if i not in blank] for t in texts]
        strict = [nb.predict_many([torch.tensor(w).numpy()])[0] if w else "blank" for w in words]
        with torch.no_grad():
            nll = [float(next_token_nll(view.model(input_ids=torch.tensor([[bos, *t]]), use_cache=False).logits,
                                        torch.tensor([[bos, *t]]))) for t in texts]
        out.append({"condition": name, "selected": selection, "prompts": len(prompts),
                    "rates": {c: labels.count(c) / len(labels) for c in nb.classes},
                    "drama_no_blank": strict.count("drama") / len(strict),
                    "ppl_alone": math.exp(statistics.median(nll)),
                    "example": tokenizer.decode(texts[1]) if len(texts) > 1 else tokenizer.decode(texts[0])})
    return out


def _rows_table(rows: list[dict], title: str, tokens: int) -> Table:
    table = Table(title=title)
    for col in ("selection", "experts", "edit", "code ppl", "drama ppl", "prose ppl", "drama x", "code x"):
        table.add_column(col, justify="left" if col in ("selection", "edit") else "right")
    for r in rows:
        p, x = r["perplexity"], r["ratio"]
        table.add_row(r["selection"], str(r["experts"]), r["edit"], f"{p['code']:.2f}", f"{p['drama']:.2f}",
                      f"{p['prose']:.2f}", f"{x['drama']:.2f}", f"{x['code']:.3f}")
    table.caption = f"{tokens:,} test tokens per domain"
    return table


def _markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"# Steering on the shipped {a['model']} model",
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']['platform']}, "
        f"{result['machine']['cpus']} CPUs (shared), {result['machine']['threads']} torch thread(s), load average "
        f"{result['machine']['load_average'][0]:.2f} at the end. Date: {result['date']}.",
        "",
        f"Detection: {a['detect_tokens']:,} train-split tokens each of drama (positive) and code (negative). "
        f"RICE markers: the {a['markers']} most drama-indicative tokens of a naive Bayes classifier trained on "
        f"the train split (held-out test accuracy {result['classifier']['test_accuracy']:.1%} on "
        f"{result['classifier']['test_windows']} windows of 64 tokens). Perplexity: the first "
        f"{a['eval_tokens']:,} test-split tokens of each domain.",
        "",
        "| selection | experts | edit | code ppl | drama ppl | prose ppl | drama x | code x |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["perplexity"]:
        p, x = r["perplexity"], r["ratio"]
        lines.append(f"| {r['selection']} | {r['experts']} | {r['edit']} | {p['code']:.2f} | {p['drama']:.2f} | "
                     f"{p['prose']:.2f} | {x['drama']:.2f} | {x['code']:.3f} |")
    best = [r for r in result["perplexity"] if r["selection"] == "risk diff" and r["edit"] == "off"][-1]
    routed = sum(result["experts_per_layer"])
    lines += ["", f"Goal of issue 14: drama perplexity up by a large factor, code's within a few per cent. "
              f"Measured: {best['experts']} of {routed} routed experts off multiply drama's test perplexity by "
              f"{best['ratio']['drama']:.2f} and code's by {best['ratio']['code']:.3f} "
              f"(prose {best['ratio']['prose']:.3f})."
        + (" These sizes step over the best trade-off; the code-aware selection below "
           "picks the size from calibration text (its rows are checked against the goal there)." if result.get("selection") else "")]
    same = [r for r in result["perplexity"] if r["edit"].startswith("soft-off")]
    twins = [r for s in same for r in result["perplexity"] if r["edit"] == "off" and r["selected"] == s["selected"]]
    if same and all(a["perplexity"] == b["perplexity"] for a, b in zip(same, twins, strict=False)):
        lines += ["", "Soft-off equals the hard mask here: this model's router scores with a sigmoid and "
                  "renormalises the top-k, so an off expert's logit moves no other weight (see "
                  "`moelab.steer.switch`)."]
    g = result.get("generation")
    if g:
        lines += ["", f"Greedy continuations ({a['new_tokens']} new tokens) of {g[0]['prompts']} code prompts (the first "
                  "32 tokens of code test windows), judged by the naive Bayes classifier; \"no blank\": judged once "
                  "whitespace-only tokens are dropped (a run of newlines reads as verse); \"ppl alone\": median "
                  "perplexity of the continuation on its own (after BOS) under the unsteered model (a fluency "
                  "check; code continuations score low, drama text around the drama test perplexity, broken text "
                  "high):", "", *_steering_select.generation_table(g)]
        best = max(g[1:], key=lambda r: (r["drama_no_blank"], -r["ppl_alone"]))
        lines += ["", "Examples (the second prompt's continuation):", ""]
        for r in (g[0], best):
            lines.append(f"- {r['condition']}: `{r['example']!r}`")
        soft = next(r for r in g if "soft-on" in r["condition"])
        hard = next(r for r in g if r["condition"].endswith("code-linked 10/layer off"))
        drama_ppl = result["perplexity"][0]["perplexity"]["drama"]
        lines += ["", "Goal of issue 14: forcing drama-linked experts on turns code continuations drama-like. "
                  f"Measured: {g[0]['rates']['drama']:.0%} judged drama without an edit; forcing drama experts on "
                  f"alone moves it little ({g[1]['rates']['drama']:.0%} / {g[2]['rates']['drama']:.0%} with "
                  f"{a['on']} forced on by either ranking, {soft['rates']['drama']:.0%} with SteerMoE's soft-on of "
                  "every slot at delta 16): with sigmoid scores renormalised over the top-k, a forced expert's weight "
                  "is its own small score on a code token, and the dense first layer, the always-on shared expert "
                  "and attention carry the context. Switching the code-linked experts off as well gives "
                  f"{hard['rates']['drama']:.0%}. What moves it is weight: every slot forced to a drama-linked "
                  "expert, their combine weights multiplied (no renormalisation), the 10 most code-linked experts of "
                  f"each layer off. Best by the strict count: {best['condition']}, {best['drama_no_blank']:.0%} "
                  f"judged drama without blank tokens ({best['rates']['drama']:.0%} with them), at a fluency cost: "
                  f"ppl alone {best['ppl_alone']:.0f}, against {g[0]['ppl_alone']:.1f} unsteered and "
                  f"{drama_ppl:.0f} for drama test text, so the text is drama-flavoured but broken (see the example): "
                  "the stronger the push, the more drama-like and the less fluent. RICE's selection does worse than "
                  "the risk difference here. The classifier judges 64-token windows at 94 % but short broken text is "
                  "easy to misjudge, so read the rates with the fluency column."]
    if sel := result.get("selection"):  # a --part selection run keeps its own command, date and machine
        lines += ["", *_steering_select.section(sel, sel.get("command", result["command"]),
                                                 sel.get("date", result["date"]), sel.get("machine", result["machine"]))]
    lines += ["", "Top of the risk-difference ranking:", "",
              "| layer | expert | rate drama | rate code | risk diff | z |", "|---:|---:|---:|---:|---:|---:|"]
    for r in result["ranking"][:10]:
        lines.append(f"| {r['layer']} | {r['expert']} | {r['rate_pos']:.3f} | {r['rate_neg']:.3f} | "
                     f"{r['score']:+.3f} | {r['z']:+.1f} |")
    return "\n".join(lines + overhead.markdown(result)) + "\n"


def _run_meta(args, keys: tuple[str, ...] | None = None) -> dict:
    """``command`` (the arguments ``keys`` with ``--part``, default all but the outputs), ``date`` and ``machine``."""
    argv = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items()
                    if v is not None and k not in ("out", "md", "part") and (keys is None or k in keys))
    part = f" --part {args.part}" if keys is not None else ""
    return {"command": f"python bench/steering.py{part} {argv}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "load_average": list(os.getloadavg()), "nice": os.nice(0)}}


def _print_overhead(console: Console, rows: list[dict], gen_rows: list[dict], args) -> None:
    for title, rows_ in ((f"one forward, {args.batch} x 256 tokens (median of {args.repeat})", rows),
                         (f"greedy generation, {args.new_tokens} new tokens (median of {args.gen_repeat})", gen_rows)):
        table = Table(title=title)
        for col in ("edit", "median s", "overhead", "overhead (min)", "routing ms", "edit / run", "torch ops"):
            table.add_column(col, justify="left" if col == "edit" else "right")
        for r in rows_:
            table.add_row(r["edit"], f"{r['median_s']:.4f}", f"{r['overhead']:+.1%}", f"{r['overhead_min']:+.1%}",
                          f"{1e3 * r['routing_s_median']:.2f}", f"{r['edit_share']:+.2%}", f"{r['ops']:,}")
        console.print(table)


_OVERHEAD_ARGS = ("model", "top", "new_tokens", "batch", "repeat", "gen_repeat")
_SELECTION_ARGS = ("model", "detect_tokens", "eval_tokens", "markers", "prompts", "new_tokens", "sizes", "budget",
                   "calib_tokens")


def _overhead_only(args, console: Console) -> None:
    """``--part overhead``: rerun the overhead part on the selections of the saved full run, replace
    it in ``--out`` and rewrite ``--md`` (the rest as the full run left it)."""
    from moelab.errors import MoelabError

    if not args.out.exists():
        raise MoelabError(f"--part overhead: {args.out} not found; run the whole benchmark first")
    result = json.loads(args.out.read_text())
    saved = result["args"]
    if args.top[0] != saved["top"][0] or Path(default_model(args.model)).name != saved["model"]:
        raise MoelabError(f"--part overhead: {args.out} holds a run of model {saved['model']} with --top "
                          f"{saved['top'][0]} first; rerun with the same or run the whole benchmark")
    rows = result["perplexity"]
    sel = next(r["selected"] for r in rows if r["selection"] == "risk diff" and r["edit"] == "off")
    scaled = next(r["selected"] for r in rows if r["edit"].startswith("scale"))
    view = open_model(str(default_model(args.model)))
    tokenizer = load_tokenizer(default_model(args.model))
    sel = {int(k): v for k, v in sel.items()}
    factors = {int(k): dict.fromkeys(e, RICE_FACTOR) for k, e in scaled.items()}
    result["overhead"], result["generation_overhead"] = overhead.measure(view, tokenizer, sel, factors, args)
    for k in ("new_tokens", "batch", "repeat", "gen_repeat"):
        result["args"][k] = getattr(args, k)
    result["overhead_run"] = _run_meta(args, _OVERHEAD_ARGS)
    _print_overhead(console, result["overhead"], result["generation_overhead"], args)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.md, _markdown(result))
    console.print(f"wrote {args.out} and {args.md}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="shipped model name (fine, coarse); default: the default model")
    ap.add_argument("--detect-tokens", type=int, default=8192, help="train tokens per side for detection")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="test tokens per domain for perplexity")
    ap.add_argument("--top", type=int, nargs="+", default=[10, 20], help="experts switched off (each value a run)")
    ap.add_argument("--markers", type=int, default=20, help="RICE marker tokens (naive Bayes' most drama-like)")
    ap.add_argument("--on", type=int, default=12, help="drama-linked experts forced on in the generation test")
    ap.add_argument("--prompts", type=int, default=50, help="code prompts continued in the generation test")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per continuation")
    ap.add_argument("--batch", type=int, default=1, help="sequences of 256 tokens in the timed forward")
    ap.add_argument("--repeat", type=int, default=31, help="timed forwards per edit (median reported)")
    ap.add_argument("--gen-repeat", type=int, default=41, help="timed generations per edit (median reported)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/steering.json"), help="JSON output")
    ap.add_argument("--md", type=Path, default=Path("docs/results/steering.md"), help="markdown output")
    ap.add_argument("--part", choices=("all", "overhead", "selection"), default="all",
                    help="overhead: rerun only the overhead part, on the selections saved in --out; "
                         "selection: only the code-aware selection section (bench/_steering_select.py), "
                         "replacing its part of --md and its key of --out")
    ap.add_argument("--sizes", type=int, nargs="+", default=_steering_select.SIZES,
                    help="selection: experts switched off (each value a row per selection)")
    ap.add_argument("--budget", type=float, default=1.03, help="selection: the greedy's code perplexity budget")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="selection: calibration tokens per side")
    args = ap.parse_args()
    console = Console()
    if args.part == "overhead":
        return _overhead_only(args, console)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    corpus = default_corpus()
    view = open_model(str(default_model(args.model)))

    nb = train_domain_classifier(corpus, tokens=32768, window=64)
    test_texts, test_labels = domain_windows(corpus, "test", 64, 4096)
    classifier = {"test_accuracy": nb.accuracy([t.numpy() for t in test_texts], test_labels),
                  "test_windows": len(test_texts), "train_tokens_per_domain": 32768}
    pos, neg = gather_pair(view, corpus, corpus, positive_label="drama", negative_label="code",
                           tokens=args.detect_tokens, seq_len=256, progress=False)
    det = rank_risk_difference(pos, neg)
    markers = nb.indicative_tokens("drama", "code", args.markers)
    rice = rank_npmi(concat_routed([pos, neg]), torch.tensor(markers).numpy())

    streams = encode_split(corpus, "test", max_tokens=args.eval_tokens)
    base = _perplexity(view, streams)
    selection = _steering_select.run(view, corpus, pos, neg, det, streams, base, _perplexity, args, console)
    code_test = encode_split(corpus, "test", max_tokens=args.prompts * 64)["code"]
    prompts = [code_test[i * 64:i * 64 + 32].tolist() for i in range(args.prompts)]
    code_off = rank_risk_difference(neg, pos).select(10, "off", per_layer=True)  # code-linked experts
    tokenizer = load_tokenizer(default_model(args.model))
    selection["generation"] = _generation_rates(view, nb, tokenizer, prompts, {
        "no edit": (None, None), **_steering_select.last_layer_conditions(view, det, code_off, _push)}, args.new_tokens)
    for r in selection["generation"]:
        r["selected"] = {str(k): v for k, v in r["selected"].items()} if r["selected"] else None
    if args.part == "selection":
        _steering_select.write_part(args, selection, _run_meta(args, _SELECTION_ARGS)["command"],
                                    Path(view.config._name_or_path).name)
        return
    rows = [{"selection": "none", "experts": 0, "edit": "none", "perplexity": base}]
    layers = len(view.blocks)
    for n in args.top:
        sd = det.select(n, "off")
        sr = rice.select(math.ceil(n / layers), "off", per_layer=True)
        for name, sel in (("risk diff", sd), ("RICE nPMI", sr)):
            count = sum(len(v) for v in sel.values())
            rows.append({"selection": name, "experts": count, "edit": "off", "selected": sel,
                         "perplexity": _perplexity(view, streams, lambda sel=sel: experts_off(view, sel))})
        rows.append({"selection": "risk diff", "experts": sum(len(v) for v in sd.values()), "edit": "soft-off 0.01",
                     "selected": sd, "perplexity": _perplexity(view, streams, lambda sd=sd: switch_experts(view, off=sd))})
    cognitive = rice.select(2, "scale", per_layer=True)
    factors = {layer: dict.fromkeys(e, RICE_FACTOR) for layer, e in cognitive.items()}
    rows.append({"selection": "RICE nPMI top-2/layer", "experts": sum(len(v) for v in cognitive.values()),
                 "edit": f"scale x{RICE_FACTOR:g}", "selected": cognitive,
                 "perplexity": _perplexity(view, streams, lambda: scale_weights(view, factors))})
    for r in rows:
        r["ratio"] = {d: r["perplexity"][d] / base[d] for d in base}

    on_rd = det.select(args.on, "on")
    on_rice = rice.select(math.ceil(args.on / layers), "on", per_layer=True)
    top_k = view.blocks[0].top_k
    all_rd, few_rd = det.select(top_k, "on", per_layer=True), det.select(5, "on", per_layer=True)
    all_rice = rice.select(top_k, "on", per_layer=True)
    generation = _generation_rates(view, nb, tokenizer, prompts, {
        "no edit": (None, None),
        "risk diff, on": (on_rd, lambda: experts_on(view, on_rd)),
        "RICE nPMI, on": (on_rice, lambda: experts_on(view, on_rice)),
        f"risk diff, soft-on {top_k}/layer, delta 16": (all_rd, lambda: switch_experts(view, on=all_rd, strength=16.0)),
        f"risk diff, on {top_k}/layer + code-linked 10/layer off": (all_rd, _push(view, all_rd, 1.0, code_off)),
        f"risk diff, on {top_k}/layer x2 + code off": (all_rd, _push(view, all_rd, 2.0, code_off)),
        f"risk diff, on {top_k}/layer x4 + code off": (all_rd, _push(view, all_rd, 4.0, code_off)),
        "risk diff, on 5/layer x8 + code off": (few_rd, _push(view, few_rd, 8.0, code_off)),
        f"RICE nPMI, on {top_k}/layer x2 + code off": (all_rice, _push(view, all_rice, 2.0, code_off)),
    }, args.new_tokens)
    for r in generation:
        console.print(f"{r['condition']}: judged drama {r['rates']['drama']:.0%} "
                      f"(without blank tokens {r['drama_no_blank']:.0%}), alone ppl {r['ppl_alone']:.1f}")
        if r["selected"]:
            r["selected"] = {str(k): v for k, v in r["selected"].items()}

    overhead_rows, gen_overhead = overhead.measure(view, tokenizer, det.select(args.top[0], "off"), factors, args)
    console.print(_rows_table(rows, f"{Path(view.config._name_or_path).name}: drama-linked experts off",
                              args.eval_tokens))
    _print_overhead(console, overhead_rows, gen_overhead, args)
    console.print(f"naive Bayes held-out accuracy {classifier['test_accuracy']:.1%}")
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    result = {
        **_run_meta(args),
        "args": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "model": Path(view.config._name_or_path).name},
        "classifier": classifier, "markers": markers,
        "tokens": {"detect_per_side": {"drama": pos.num_tokens, "code": neg.num_tokens},
                   "eval_per_domain": {d: int(s.numel()) for d, s in streams.items()}},
        "perplexity": rows, "generation": generation, "selection": selection, "overhead": overhead_rows, "generation_overhead": gen_overhead, "experts_per_layer": [b.num_experts for b in view.blocks],
        "ranking": [r.to_dict() for r in det.rows[:40]], "rice_ranking": [r.to_dict() for r in rice.rows[:40]],
        "wall_s": wall, "cpu_s": cpu,
    }
    for r in rows:  # JSON keys must be strings
        if "selected" in r:
            r["selected"] = {str(k): v for k, v in r["selected"].items()}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.md, _markdown(result))
    console.print(f"wrote {args.out} and {args.md} ({wall:.0f} s wall, {cpu:.0f} s CPU)")


if __name__ == "__main__":
    main()
