"""The ExpertFlow part of ``bench/offload.py``: the expert predictor, the predictive cache and token
scheduling on the shipped default model (``python bench/offload.py --part predictor`` runs only it).

1. **Predictor.** Heads of :mod:`moelab.offload.predictor` (from every MoE layer to every later layer
   and to the next token's layers up to it; linear, and an MLP of width 256) trained on 16,384
   tokens of the corpus' train split (256-token sequences), scored on ``--max-tokens`` tokens of the
   test split (domains interleaved, in order): precision and recall per (source, target) against
   the next router on the source hidden state (speculative routing), the target layer's most
   frequent experts and the same expert ids. Two MLP predictors give scored hints
   (``hint="scores"``, every step of the next 4 tokens, ``tokens_ahead=4``): one trained on the same
   16,384 tokens, one on 196,608 (600 Adam steps a head).
2. **Predictive cache.** The test stream replayed as in the main table (one cache for all MoE
   layers, a step = one token's experts in one layer, cold start) with LRU, LRFU, the predictive
   policy fed by each predictor's hints before every step (top-k, top-2k per target, or scores) and
   Belady. The scored hints' discount and CRF weight are picked at 2x on ``--max-tokens`` tokens of
   the val split (same order), never on the test stream; the picks are printed with the grid.
3. **Runtime.** ``offload_model(policy="predictive", predictor=...)`` at 2x decoding the test split
   (the scored predictor on 196,608 tokens); the measured hits must equal the replay of that run's
   routing with the hints it gave.
4. **Token scheduling.** The test stream cut into 64-token requests: the first 32 tokens (the
   prompt) give each request's activation vector, the last 32 are decoded in batches; distinct
   experts per step and the hit rate of one cache of half of all experts (LRFU), arrival order vs
   :func:`moelab.offload.schedule.schedule_batches`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from _docs import replace_between  # bench/_docs.py: the script's folder is on sys.path

from moelab.analysis.cache_policy import CRF_WEIGHT, replay
from moelab.compress.calib import calibration_batches
from moelab.data import default_corpus
from moelab.data.atomic import atomic_write_text
from moelab.models import open_model
from moelab.offload import min_budget_bytes, offload_model
from moelab.offload.cache import LRFU_HALF_LIFE_TOKENS
from moelab.offload.predictor import (
    PredictorConfig,
    cache_hint,
    collect_routes,
    route_hints,
    route_steps,
    score_predictor,
    train_predictor,
)
from moelab.offload.runtime import decode_stream, split_texts, stream_ids
from moelab.offload.schedule import (
    activation_vectors,
    arrival_batches,
    batch_steps,
    schedule_batches,
)

MULTIPLES = (1, 2, 3, 4)
BEGIN, END = "<!-- predictor: bench/offload.py --part predictor -->", "<!-- /predictor -->"


def _routes(view, corpus, tokens: int, seq_len: int, shuffle: bool):
    return collect_routes(view, calibration_batches(view, corpus, tokens=tokens, seq_len=seq_len, shuffle=shuffle))


TRAIN_TOKENS, BIG_TRAIN_TOKENS = 16384, 196608
SCORED = "mlp, scores, 192k"  # the predictor the val grid tunes and the runtime rows use
DISCOUNTS, CRF_WEIGHTS = (0.5, 0.7, 0.8), (0.01, 0.03, 0.06, 0.1)


def _configs(L: int, K: int) -> dict[str, tuple[PredictorConfig, int]]:
    """name -> (config, training tokens)."""
    base = dict(horizon=L, next_token=True)
    mlp = dict(hidden=256, weight_decay=1e-4)
    scored = dict(base, **mlp, hint="scores", tokens_ahead=4, score_discount=0.7)
    return {"linear": (PredictorConfig(**base), TRAIN_TOKENS),
            "linear, 2k hints": (PredictorConfig(**base, hint_extra=K), TRAIN_TOKENS),
            "mlp, 2k hints": (PredictorConfig(**base, hint_extra=K, **mlp), TRAIN_TOKENS),
            "mlp, scores": (PredictorConfig(**scored), TRAIN_TOKENS),
            SCORED: (PredictorConfig(**scored, steps=600), BIG_TRAIN_TOKENS)}


def tune_scores(predictor, val, cap: int, half: float) -> tuple[list[dict], float, float]:
    """Hit rates on the val stream at capacity ``cap`` over the grid of discounts and CRF weights;
    the grid, the picked discount and CRF weight (the predictor is left with that discount)."""
    steps, grid = route_steps(val), []
    for d in DISCOUNTS:
        predictor.config = dataclasses.replace(predictor.config, score_discount=d)
        hints = route_hints(predictor, val)
        grid += [{"discount": d, "crf_weight": w,
                  "hit_rate": replay(steps, cap, "predictive", half_life=half, hints=hints, crf_weight=w).hit_rate}
                 for w in CRF_WEIGHTS]
    best = max(grid, key=lambda g: g["hit_rate"])
    predictor.config = dataclasses.replace(predictor.config, score_discount=best["discount"])
    return grid, best["discount"], best["crf_weight"]


def predictor_rows(path: Path, max_tokens: int) -> dict:
    view = open_model(path)
    L, K = len(view.blocks), view.blocks[0].top_k
    train = {n: _routes(view, default_corpus(), n, 256, True) for n in (TRAIN_TOKENS, BIG_TRAIN_TOKENS)}
    test = _routes(view, split_texts(default_corpus()), max_tokens, 256, False)
    val = _routes(view, split_texts(default_corpus(), "val"), max_tokens, 256, False)
    trained = {name: train_predictor(train[n], cfg) for name, (cfg, n) in _configs(L, K).items()}
    small = train[TRAIN_TOKENS]
    scores = [{"head": name, "src": s.src, "target": list(s.target), "method": s.method,
               "precision": s.precision, "recall": s.recall}
              for name in ("linear", "mlp, 2k hints", SCORED)
              for s in score_predictor(trained[name], test, small, view)
              if name == "linear" or (s.method == "predictor" and (name != SCORED or s.src == view.blocks[-1].layer))]
    steps, half = route_steps(test), LRFU_HALF_LIFE_TOKENS * L
    grid, disc, w = tune_scores(trained[SCORED], val, 2 * K * L, half)
    trained["mlp, scores"].config = dataclasses.replace(trained["mlp, scores"].config, score_discount=disc)
    hints = {name: route_hints(p, test) for name, p in trained.items()}
    rows = []
    for m in MULTIPLES:
        cap = m * K * L
        row = {"multiple": m, "capacity_experts": cap,
               **{pol: replay(steps, cap, pol, half_life=half).hit_rate for pol in ("lru", "lrfu", "belady")}}
        for name, h in hints.items():
            row[f"predictive ({name})"] = replay(steps, cap, "predictive", half_life=half, hints=h,
                                                 crf_weight=w).hit_rate
        rows.append(row)
    return {"scores": scores, "replay": rows, "tokens": test.num_tokens, "train_tokens": small.num_tokens,
            "big_train_tokens": train[BIG_TRAIN_TOKENS].num_tokens, "val_tokens": val.num_tokens,
            "grid": grid, "picked": {"discount": disc, "crf_weight": w}, "predictor": trained[SCORED]}


def runtime_rows(path: Path, predictor, decode_tokens: int) -> list[dict]:
    ids = stream_ids(path, split_texts(default_corpus()), decode_tokens)
    _, probe = offload_model(path, budget=1.0)
    size, blocks = probe.store.expert_bytes, probe.view.blocks
    budget = 2 * min_budget_bytes(probe.store, probe.view) * len(blocks)
    probe.close()
    rows = []
    for policy, prefetch in (("lrfu", True), ("predictive", False), ("predictive", True)):
        model, ex = offload_model(path, budget=budget, policy=policy, prefetch=prefetch, predictor=predictor)
        steps, hints = [], []

        def hook(ev, steps=steps, hints=hints):
            steps.append([(ev.block.layer, int(e)) for e in ev.ids_TK.unique().tolist()])
            hints.append(cache_hint(predictor, ev.block.layer, ev.hidden_TH))

        handles = [b.register_routing_hook(hook) for b in ex.view.blocks]
        speed = decode_stream(model, ids)
        for h in handles:
            h.remove()
        s, q = ex.stats(), ex.prefetcher.quality if prefetch else None
        ex.close()
        sim = None
        if not prefetch:
            sim = replay(steps, budget, policy, size=lambda k: size(k[0]), hints=hints,
                         half_life=LRFU_HALF_LIFE_TOKENS * len(blocks))
            if (sim.hits, sim.misses) != (s.hits, s.misses):
                raise SystemExit(f"measured hits {s.hits} != replayed {sim.hits} ({policy})")
        rows.append({"policy": policy, "prefetch": "predictor" if prefetch else "off", "hit_rate": s.hit_rate,
                     "replayed_hit_rate": sim.hit_rate if sim else None,
                     "bytes_read_per_token": s.bytes_read / ids.shape[1], "tokens_per_s": speed,
                     "prefetch_precision": q.precision if q else None, "prefetch_recall": q.recall if q else None})
    return rows


def schedule_rows(path: Path, max_tokens: int) -> list[dict]:
    view = open_model(path)
    L, E = len(view.blocks), view.blocks[0].num_experts
    routes = _routes(view, split_texts(default_corpus()), max_tokens, 64, False)
    p_SLE = activation_vectors(routes, slice(0, 32))  # the prompt's routing
    S, cap = routes.num_tokens // 64, L * E // 2
    rows = []
    for B in (4, 8, 16):
        for order, batches in (("arrival", arrival_batches(S, B)), ("scheduled", schedule_batches(p_SLE, B))):
            steps = batch_steps(routes, batches, range(32, 64))
            rows.append({"batch_size": B, "order": order, "requests": S,
                         "distinct_per_step": sum(map(len, steps)) / len(steps),
                         "lrfu_hit_rate": replay(steps, cap, "lrfu", half_life=LRFU_HALF_LIFE_TOKENS * L).hit_rate,
                         "capacity_experts": cap})
    return rows


def run(path: Path, max_tokens: int, decode_tokens: int) -> dict:
    t0 = time.perf_counter()
    pred = predictor_rows(path, max_tokens)
    runtime = runtime_rows(path, pred.pop("predictor"), decode_tokens)
    sched = schedule_rows(path, max_tokens)
    return {**pred, "runtime": runtime, "schedule": sched, "seconds": round(time.perf_counter() - t0, 1)}


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(r: dict, meta: dict) -> str:
    pol = [k for k in r["replay"][0] if k not in ("multiple", "capacity_experts")]
    lines = ["## ExpertFlow: expert predictor, predictive cache, token scheduling", "",
             f"`{meta['command']} --part predictor` on {meta['machine']}, {meta['date']}. Predictors trained on "
             f"{r['train_tokens']} tokens of the train split ({SCORED}: {r['big_train_tokens']}), scored on "
             f"{r['tokens']} tokens of the test split (256-token sequences in corpus order); {SCORED}: only "
             "its heads from the last MoE layer, tokens +1 to +4.", "",
             "| head | from MoE layer | target (layer, token +) | method | precision | recall |", "|---|---|---|---|---|---|"]
    for s in r["scores"]:
        lines.append(f"| {s['head']} | {s['src']} | {tuple(s['target'])} | {s['method']} | {s['precision']:.3f} | {s['recall']:.3f} |")
    pk = r["picked"]
    lines += ["", f"Scored hints ({SCORED}) on {r['val_tokens']} tokens of the val split at 2x, predictive's "
              f"hit rate by score discount and CRF weight; picked: {pk['discount']}, {pk['crf_weight']} "
              f"(the library's CRF_WEIGHT: {CRF_WEIGHT}):", "",
              "| discount | " + " | ".join(f"CRF weight {w}" for w in CRF_WEIGHTS) + " |",
              "|---|" + "---|" * len(CRF_WEIGHTS)]
    for d in DISCOUNTS:
        lines.append(f"| {d} | " + " | ".join(f"{g['hit_rate']:.3f}" for g in r["grid"] if g["discount"] == d) + " |")
    lines += ["", "Replay of the test stream (one cache for all MoE layers, cold start; scored hints with the "
              "picked discount and CRF weight):", "",
              "| cache | experts | " + " | ".join(pol) + " |", "|---|---|" + "---|" * len(pol)]
    for row in r["replay"]:
        lines.append(f"| {row['multiple']}x | {row['capacity_experts']} | " + " | ".join(f"{row[p]:.3f}" for p in pol) + " |")
    two = r["replay"][1]
    best = max((p for p in pol if p != "belady"), key=lambda p: two[p])
    gap = 100 * (two["belady"] - two[best])
    lines += ["", f"At 2x the best online policy here, {best}, is {gap:.1f} points below Belady "
              f"(LRFU: {100 * (two['belady'] - two['lrfu']):.1f}; the hint sets of mlp, 2k hints: "
              f"{100 * (two['belady'] - two['predictive (mlp, 2k hints)']):.1f}); the goal of 5 points is "
              f"{'reached' if gap <= 5 else 'not reached'}.",
              "", f"Runtime at 2x ({SCORED}); the measured hit rate equals the replay with the hints "
              "the run gave:", "", "| policy | prefetch | hit rate | replayed | KiB read/token | tokens/s | "
              "prefetch precision | recall |", "|---|---|---|---|---|---|---|---|"]
    for row in r["runtime"]:
        lines.append(f"| {row['policy']} | {row['prefetch']} | {row['hit_rate']:.3f} | {_f(row['replayed_hit_rate'])} | "
                     f"{row['bytes_read_per_token'] / 1024:.1f} | {row['tokens_per_s']:.1f} | "
                     f"{_f(row['prefetch_precision'])} | {_f(row['prefetch_recall'])} |")
    lines += ["", f"Token scheduling: {r['schedule'][0]['requests']} requests of 64 tokens (prompt 32, decoded 32), "
              f"a cache of {r['schedule'][0]['capacity_experts']} experts (half of all), LRFU:", "",
              "| batch | order | distinct experts per step (one layer) | hit rate |", "|---|---|---|---|"]
    for row in r["schedule"]:
        lines.append(f"| {row['batch_size']} | {row['order']} | {row['distinct_per_step']:.2f} | {row['lrfu_hit_rate']:.3f} |")
    return "\n".join(lines)


def write_section(md: Path, r: dict, meta: dict) -> None:
    """Put the section between its markers in ``md`` (appended with them when absent)."""
    body = markdown(r, meta)
    old = md.read_text() if md.exists() else ""
    new = replace_between(old, BEGIN, END, body)
    atomic_write_text(md, new if new is not None else old.rstrip("\n") + f"\n\n{BEGIN}\n{body}\n{END}\n")
