"""Benchmark of moelab.steer on the shipped model: switch drama-linked experts off, measure per-domain
test perplexity, and time a steering edit on a plain forward.

    python bench/steering.py                  # the default (fine-grained DeepSeek-V3) model
    python bench/steering.py --model coarse   # the coarse Qwen3-MoE model

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
5. the CPU time (``time.process_time``) of one forward (``--batch`` x 256 tokens, ``--repeat``
   rounds) and of a greedy generation (``--new-tokens`` tokens, ``--gen-repeat`` rounds) with no
   edit, the identity edit (the seam alone) and each steering edit, each round running them back
   to back in rotating order after a warm-up round; the overhead is the median of each round's
   ratio to the run without an edit; and the time spent inside each edit, timed by edits
   registered just before and after it in the same run.

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

import torch
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

GEN_PROMPT = "def read_config(path):\n    "


class _Edits:
    """Several edit handles removed as one."""

    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _push(view, on: dict, factor: float, off: dict | None):
    """Force ``on`` into every token's top-k, multiply their weights by ``factor`` and switch ``off``
    (the code-linked experts) off: the strongest push toward drama tried on this model."""
    def install():
        handles = [experts_off(view, off)] if off else []
        handles.append(experts_on(view, on))
        if factor != 1:
            handles.append(scale_weights(view, {layer: dict.fromkeys(e, factor) for layer, e in on.items()}))
        return _Edits(*handles)

    return install


def _perplexity(view, streams, edit=None) -> dict[str, float]:
    handle = edit() if edit is not None else None
    try:
        return evaluate_streams(view.model, streams, 256).perplexity
    finally:
        if handle is not None:
            handle.remove()


def _overhead(run, edits: dict, repeat: int) -> list[dict]:
    """CPU seconds (``time.process_time``: this process only) of ``run()`` with no edit and with each
    edit, in ``repeat`` rounds after a warm-up round, each round running them back to back in
    rotating order (no setting always runs first)."""
    runs: dict[str, list[float]] = {"no edit": [], **{k: [] for k in edits}}
    names = list(runs)

    def once(name: str) -> float:
        handle = edits[name]() if name in edits else None
        try:
            t0 = time.process_time()
            run()
            return time.process_time() - t0
        finally:
            if handle is not None:
                handle.remove()

    with torch.no_grad():
        for rep in range(repeat + 1):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                t = once(name)
                if rep:  # the first round is the warm-up
                    runs[name].append(t)
    plain = runs["no edit"]
    # the median of per-round ratios: each edit's run against the plain run of the same round, so a
    # slow stretch of a shared machine hits both sides of a ratio
    return [{"edit": k, "median_s": statistics.median(v), "min_s": min(v), "runs_s": v,
             "overhead": statistics.median(a / b for a, b in zip(v, plain, strict=True)) - 1,
             "overhead_min": min(v) / min(plain) - 1} for k, v in runs.items()]


def _op_counts(run, edits: dict) -> dict[str, int]:
    """Torch ops dispatched by ``run()`` with no edit and with each edit: a count no other job on the
    machine can disturb (on this small model a decode step's time is mostly per-op dispatch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    out = {}
    with torch.no_grad():
        for name, make in {"no edit": None, **edits}.items():
            handle = make() if make is not None else None
            run()  # the edit's constants are made on its first call
            with Count() as c:
                run()
            out[name] = c.n
            if handle is not None:
                handle.remove()
    return out


def _forward_run(view, batch: int, vocab: int):
    ids = torch.randint(0, vocab, (batch, 256), generator=torch.Generator().manual_seed(0))
    return lambda: view.model(input_ids=ids, use_cache=False)


def _generate_run(view, tokenizer, new_tokens: int):
    from moelab.run.generate import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    return lambda: generate(view.model, tokenizer, GEN_PROMPT, cfg)


def _edit_share(view, run, edits: dict, repeat: int) -> dict[str, float]:
    """Median share of ``run()`` (a forward, a generation) spent in each steering edit, timed inside
    the same run: a timer edit registered before the steering edit and one after it on every block
    (edits run in registration order), so a slow stretch of a shared machine slows both sides of the
    ratio."""
    spent = [0.0]

    def start(block, hidden, routing):
        spent.append(-time.perf_counter())
        return routing

    def stop(block, hidden, routing):
        spent.append(spent.pop() + time.perf_counter())
        return routing

    out = {}
    with torch.no_grad():
        for name, make in {"timers only": None, **edits}.items():
            handles = [b.register_routing_edit(start) for b in view.blocks]
            steer = make() if make is not None else None
            handles += [b.register_routing_edit(stop) for b in view.blocks]
            shares, inside, whole = [], [], []
            for i in range(repeat + 1):
                spent[:] = [0.0]
                t0 = time.perf_counter()
                run()
                if i:  # the first is a warm-up
                    whole.append(time.perf_counter() - t0)
                    inside.append(sum(spent))
                    shares.append(inside[-1] / whole[-1])
            for h in handles + ([steer] if steer is not None else []):
                h.remove()
            out[name] = {"share_median": statistics.median(shares), "edit_s_min": min(inside),
                         "edit_s_median": statistics.median(inside), "forward_s_min": min(whole)}
    return out


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
              f"(prose {best['ratio']['prose']:.3f})."]
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
                  "high):", "",
                  "| condition | experts forced on | judged drama | no blank | judged code | judged prose | ppl alone |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in g:
            n = sum(len(v) for v in r["selected"].values()) if r["selected"] else 0
            lines.append(f"| {r['condition']} | {n} | {r['rates']['drama']:.0%} | {r['drama_no_blank']:.0%} | "
                         f"{r['rates']['code']:.0%} | {r['rates']['prose']:.0%} | {r['ppl_alone']:.1f} |")
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
    lines += ["", f"Overhead of a steering edit, in CPU seconds (`time.process_time` of this process, median of "
              f"{a['gen_repeat']} (generation) and {a['repeat']} (forward) rounds after a warm-up round, each round running every setting back to back in "
              "rotating order; overhead: the median of each round's ratio to the run without an edit). "
              f"Greedy generation of {a['new_tokens']} new tokens from `{GEN_PROMPT!r}` with the KV cache:", "",
              "| edit | CPU s | tokens/s | overhead | min s | overhead (min) | in edit ms (min) | edit / generation "
              "| torch ops | more ops |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gen_ops = result["generation_overhead"][0]["ops"]
    for r in result["generation_overhead"]:
        lines.append(f"| {r['edit']} | {r['median_s']:.4f} | {r['tokens_per_s']:.1f} | {r['overhead']:+.1%} | "
                     f"{r['min_s']:.4f} | {r['overhead_min']:+.1%} | {1e3 * r['edit_s_min']:.2f} | {r['share_min']:.2%} "
                     f"| {r['ops']:,} | {r['ops'] / gen_ops - 1:+.1%} |")
    lines += ["", f"One forward ({a['batch']} x 256 tokens):", "",
              "| edit | median s | overhead | min s | overhead (min) | in edit ms (min) | edit / forward | torch ops |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["overhead"]:
        lines.append(f"| {r['edit']} | {r['median_s']:.4f} | {r['overhead']:+.1%} | {r['min_s']:.4f} | "
                     f"{r['overhead_min']:+.1%} | {1e3 * r['edit_s_min']:.2f} | {r['share_min']:.2%} | {r['ops']:,} |")
    load = result["machine"]["load_average"]
    off = next(r for r in result["generation_overhead"] if r["edit"].startswith("off"))
    lines += ["", f"Goal of issue 14: a steering edit costs at most 3 %. Measured on generation, `experts_off` of "
              f"{a['top'][0]} experts: {off['overhead']:+.1%} CPU time (median of the paired rounds), "
              f"{off['share_min']:.1%} of the run spent inside the edit, {off['ops'] / gen_ops - 1:+.1%} torch ops. "
              f"Load average during the run: {load[0]:.1f} "
              f"(1 min) on {result['machine']['cpus']} CPUs, so timings vary by a few per cent between runs. The "
              "\"in edit\" columns time the edit itself inside the same forward (edits registered just before and "
              "after it; \"no edit\": those timers alone) over the least time of a plain run; \"torch ops\" counts "
              "the ops dispatched (a count no other job disturbs). The routing seam "
              "costs two torch hooks and a `Routing` per MoE layer call; `experts_off` adds a 3-op check and, on "
              "the steps where a token chose a switched-off expert, one re-selection by the family's rule (about "
              "15 small ops), which on this 128-wide model's decode step is a visible share."]
    lines += ["", "Top of the risk-difference ranking:", "",
              "| layer | expert | rate drama | rate code | risk diff | z |", "|---:|---:|---:|---:|---:|---:|"]
    for r in result["ranking"][:10]:
        lines.append(f"| {r['layer']} | {r['expert']} | {r['rate_pos']:.3f} | {r['rate_neg']:.3f} | "
                     f"{r['score']:+.3f} | {r['z']:+.1f} |")
    return "\n".join(lines) + "\n"


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
    args = ap.parse_args()
    console = Console()
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

    code_test = encode_split(corpus, "test", max_tokens=args.prompts * 64)["code"]
    prompts = [code_test[i * 64:i * 64 + 32].tolist() for i in range(args.prompts)]
    on_rd = det.select(args.on, "on")
    on_rice = rice.select(math.ceil(args.on / layers), "on", per_layer=True)
    top_k = view.blocks[0].top_k
    all_rd, few_rd = det.select(top_k, "on", per_layer=True), det.select(5, "on", per_layer=True)
    all_rice = rice.select(top_k, "on", per_layer=True)
    code_off = rank_risk_difference(neg, pos).select(10, "off", per_layer=True)  # code-linked experts
    tokenizer = load_tokenizer(default_model(args.model))
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

    sel = det.select(args.top[0], "off")
    timed = {"identity (seam only)": lambda: _Edits(*[b.register_routing_edit(lambda b, h, r: r) for b in view.blocks]),
             f"off ({args.top[0]} experts)": lambda: experts_off(view, sel),
             f"soft-off ({args.top[0]} experts)": lambda: switch_experts(view, off=sel),
             "scale (RICE)": lambda: scale_weights(view, factors)}
    forward, gen = _forward_run(view, args.batch, view.model.config.vocab_size), _generate_run(view, tokenizer, args.new_tokens)
    overhead, gen_overhead = _overhead(forward, timed, args.repeat), _overhead(gen, timed, args.gen_repeat)
    for r in gen_overhead:
        r["tokens_per_s"] = args.new_tokens / r["median_s"]
    for rows_, run, n in ((overhead, forward, args.repeat), (gen_overhead, gen, args.gen_repeat)):
        ops = _op_counts(run, timed)
        for r in rows_:
            r["ops"] = ops[r["edit"]]
        share = _edit_share(view, run, timed, n)
        plain_min = min(r["min_s"] for r in rows_ if r["edit"] == "no edit")
        for r in rows_:
            r.update(share["timers only" if r["edit"] == "no edit" else r["edit"]])
            r["share_min"] = r["edit_s_min"] / plain_min  # the edit's least time over the plain run's

    console.print(_rows_table(rows, f"{Path(view.config._name_or_path).name}: drama-linked experts off",
                              args.eval_tokens))
    ot = Table(title=f"one forward, {args.batch} x 256 tokens (median of {args.repeat})")
    for col in ("edit", "median s", "overhead", "min s", "overhead (min)", "in edit ms (min)", "edit/forward"):
        ot.add_column(col, justify="left" if col == "edit" else "right")
    for r in overhead:
        ot.add_row(r["edit"], f"{r['median_s']:.4f}", f"{r['overhead']:+.1%}", f"{r['min_s']:.4f}",
                   f"{r['overhead_min']:+.1%}", f"{1e3 * r['edit_s_min']:.2f}", f"{r['share_min']:.2%}")
    console.print(ot)
    gt = Table(title=f"greedy generation, {args.new_tokens} new tokens (median of {args.repeat})")
    for col in ("edit", "CPU s", "tokens/s", "overhead"):
        gt.add_column(col, justify="left" if col == "edit" else "right")
    for r in gen_overhead:
        gt.add_row(r["edit"], f"{r['median_s']:.4f}", f"{r['tokens_per_s']:.1f}", f"{r['overhead']:+.1%}")
    console.print(gt)
    console.print(f"naive Bayes held-out accuracy {classifier['test_accuracy']:.1%}")
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    argv = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items() if v is not None and k not in ("out", "md"))
    result = {
        "command": f"python bench/steering.py {argv}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average": list(os.getloadavg())},
        "args": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "model": Path(view.config._name_or_path).name},
        "classifier": classifier, "markers": markers,
        "tokens": {"detect_per_side": {"drama": pos.num_tokens, "code": neg.num_tokens},
                   "eval_per_domain": {d: int(s.numel()) for d, s in streams.items()}},
        "perplexity": rows, "generation": generation, "overhead": overhead, "generation_overhead": gen_overhead, "experts_per_layer": [b.num_experts for b in view.blocks],
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
