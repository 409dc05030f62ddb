"""Benchmark of moelab.analysis on a synthetic routing trace: seconds per measurement.

    python bench/analysis.py                      # 2**20 tokens x 8 layers x top-8 of 64 experts
    python bench/analysis.py --tokens 65536 --repeat 1   # quick look

Every measurement runs over all layers; the time is the median of ``--repeat`` runs after a warm-up
on a small trace. A second table times each fast path against its slow reference on a small trace
(and checks they agree). Writes ``bench/results/analysis.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from moelab.analysis import cache, coactivation, consistency, load, multitask, npmi, specialisation
from moelab.analysis import super_experts as se
from moelab.analysis.headline import ArrayTrace
from moelab.analysis.synthetic import SyntheticConfig, synthetic_trace


def _per_layer(fn: Callable[[ArrayTrace, int], object]) -> Callable[[ArrayTrace], None]:
    return lambda tr: [fn(tr, layer) for layer in tr.layers]


def measurements(cache_stride: int) -> dict[str, Callable[[ArrayTrace], object]]:
    """Name -> function running the measurement over every layer of a trace."""
    def e(tr: ArrayTrace) -> int:
        return tr.num_experts

    def transitions(tr: ArrayTrace) -> None:
        for a, b in zip(tr.layers, tr.layers[1:], strict=False):
            coactivation.layer_transitions(tr.ids(a), tr.ids(b), e(tr))

    def super_experts(tr: ArrayTrace) -> None:
        maxima = np.stack([se.expert_act_max(tr.ids(x), tr.act_out_max(x), e(tr)) for x in tr.layers])
        se.super_experts(maxima)

    def router_entropy(tr: ArrayTrace) -> None:
        for layer in tr.layers:
            load.router_entropy(tr.logits(layer))

    def curve(policy: str) -> Callable[[ArrayTrace], None]:
        return _per_layer(lambda tr, x: cache.cache_hit_curve(tr.ids(x), e(tr), policy, 16, tr.seq_ids, cache_stride))

    return {
        "load + balance": _per_layer(lambda tr, x: load.expert_load(tr.ids(x), tr.weights(x), e(tr))),
        "load by label": _per_layer(lambda tr, x: load.load_by_label(tr.ids(x), tr.labels, e(tr))),
        "router entropy (logits)": router_entropy,
        "co-activation": _per_layer(lambda tr, x: coactivation.coactivation(tr.ids(x), e(tr))),
        "layer transitions": transitions,
        "stable partners": _per_layer(lambda tr, x: coactivation.stable_partners(tr.ids(x), e(tr))),
        "SRP m=4,16,64,256": _per_layer(lambda tr, x: consistency.segment_routing(tr.ids(x), e(tr), (4, 16, 64, 256), tr.seq_ids)),
        f"SCH m=16 (1/{cache_stride} seqs)": curve("lrc"),
        f"LRU curve (1/{cache_stride} seqs)": curve("lru"),
        f"Belady curve (1/{cache_stride} seqs)": curve("belady"),
        "domain specialisation": _per_layer(lambda tr, x: specialisation.domain_specialisation(tr.ids(x), tr.labels, e(tr))),
        "vocabulary specialisation": _per_layer(lambda tr, x: specialisation.vocabulary_specialisation(tr.ids(x), tr.token_ids, e(tr))),
        "nPMI expert x label": _per_layer(lambda tr, x: npmi.npmi(tr.ids(x), tr.labels, e(tr))),
        "super experts": super_experts,
    }


def _with_logits(tr: ArrayTrace, seed: int) -> ArrayTrace:
    # one float16 [N, E] logits array shared by every layer: the work per layer is the same
    logits = np.random.default_rng(seed).standard_normal((tr.num_tokens, tr.num_experts), dtype=np.float32)
    tr.logits_by_layer = dict.fromkeys(tr.layers, logits.astype(np.float16))
    return tr


def _home_inputs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, t, e = 16_384, 4, 16  # 8 shared experts + 2 per task
    hidden = np.maximum(rng.standard_normal((n, e, 64), dtype=np.float32), 0)
    out = rng.standard_normal((n, e, 32), dtype=np.float32)
    gates = rng.dirichlet(np.ones(e), size=(t, n))
    owner = np.array([-1] * 8 + [0, 0, 1, 1, 2, 2, 3, 3])
    return hidden, out, gates, owner


def _home(inputs: tuple) -> None:
    hidden, out, gates, owner = inputs
    multitask.expert_collapse(hidden, out)
    multitask.shared_expert_degradation(gates, owner == -1)
    multitask.task_underfitting(gates, owner)


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, list[float]]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs


def reference_ratios(repeat: int) -> list[dict]:
    """Fast path vs slow reference on a small trace (512 tokens, E=16, top-4), checked equal."""
    cfg = SyntheticConfig(num_tokens=512, num_layers=2, num_experts=16, top_k=4, seq_len=128, vocab_size=64)
    tr = synthetic_trace(cfg)
    ids, ids2, seq, lab = tr.ids(0), tr.ids(1), tr.seq_ids, tr.labels
    e = cfg.num_experts
    pairs = {
        "load + balance": (lambda: load.expert_load(ids, tr.weights(0), e).tokens_E,
                           lambda: load.expert_load_reference(ids, tr.weights(0), e).tokens_E),
        "co-activation": (lambda: coactivation.coactivation(ids, e), lambda: coactivation.coactivation_reference(ids, e)),
        "layer transitions": (lambda: coactivation.layer_transitions(ids, ids2, e),
                              lambda: coactivation.layer_transitions_reference(ids, ids2, e)),
        "SRP m=16": (lambda: consistency.segment_routing(ids, e, (16,), seq)[0].f1_M,
                     lambda: consistency.segment_routing_reference(ids, e, 16, seq).f1_M),
        "SCH m=16": (lambda: cache.cache_hit_curve(ids, e, "lrc", 16, seq).hit_rate_C,
                     lambda: cache.cache_hit_curve_reference(ids, e, "lrc", 16, seq)),
        "Belady curve": (lambda: cache.cache_hit_curve(ids, e, "belady", 16, seq).hit_rate_C,
                         lambda: cache.cache_hit_curve_reference(ids, e, "belady", 16, seq)),
        "domain specialisation": (lambda: specialisation.domain_specialisation(ids, lab, e).kl_E,
                                  lambda: specialisation.domain_specialisation_reference(ids, lab, e, 4)[0]),
    }
    rows = []
    for name, (fast, ref) in pairs.items():
        np.testing.assert_allclose(fast(), ref(), rtol=1e-9, err_msg=name)
        t_fast, _ = _time(fast, repeat)
        t_ref, _ = _time(ref, max(1, repeat // 2))
        rows.append({"measurement": name, "fast_s": t_fast, "reference_s": t_ref, "speedup": t_ref / t_fast})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1 << 20, help="tokens in the synthetic trace")
    ap.add_argument("--layers", type=int, default=8, help="MoE layers")
    ap.add_argument("--experts", type=int, default=64, help="experts per layer (E)")
    ap.add_argument("--top-k", type=int, default=8, help="experts per token (K)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--cache-stride", type=int, default=16, help="replay every n-th sequence in cache curves (moe-lrc: 16)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/analysis.json"), help="JSON output")
    args = ap.parse_args()

    console = Console()
    load_before = os.getloadavg()
    cfg = SyntheticConfig(num_tokens=args.tokens, num_layers=args.layers, num_experts=args.experts,
                          top_k=args.top_k, seq_len=args.seq_len)
    t0 = time.perf_counter()
    trace = _with_logits(synthetic_trace(cfg), 1)
    gen_s = time.perf_counter() - t0
    small = _with_logits(synthetic_trace(SyntheticConfig(num_tokens=8 * args.seq_len, num_layers=2,
                                                         num_experts=args.experts, top_k=args.top_k,
                                                         seq_len=args.seq_len)), 2)
    rows = []
    for name, fn in measurements(args.cache_stride).items():
        fn(small)  # warm-up
        med, runs = _time(lambda fn=fn: fn(trace), args.repeat)
        rows.append({"measurement": name, "median_s": med, "runs_s": runs})
    home_in = _home_inputs(3)
    med, runs = _time(lambda: _home(home_in), args.repeat)
    home_row = {"measurement": "HoME multi-task health (16k samples, E=16, 4 tasks)", "median_s": med, "runs_s": runs}
    ratios = reference_ratios(args.repeat)
    load_after = os.getloadavg()

    table = Table(title=f"moelab.analysis on {args.tokens:,} tokens x {args.layers} layers x top-{args.top_k} of {args.experts}")
    table.add_column("measurement (all layers)")
    table.add_column("median s", justify="right")
    for r in rows + [home_row]:
        table.add_row(r["measurement"], f"{r['median_s']:.2f}")
    total = sum(r["median_s"] for r in rows)
    table.add_row("[bold]total (trace measurements)", f"[bold]{total:.1f}")
    console.print(table)
    rt = Table(title="fast path vs slow reference (512 tokens, E=16, top-4; results checked equal)")
    for col in ("measurement", "fast s", "reference s", "speed-up"):
        rt.add_column(col, justify="left" if col == "measurement" else "right")
    for r in ratios:
        rt.add_row(r["measurement"], f"{r['fast_s']:.4f}", f"{r['reference_s']:.3f}", f"{r['speedup']:.0f}x")
    console.print(rt)
    console.print(f"trace generation {gen_s:.1f} s (not timed above); load average {load_before} -> {load_after}")

    result = {
        "command": "python bench/analysis.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_average_before": load_before, "load_average_after": load_after},
        "trace": vars(cfg) | {"super_experts": [list(x) for x in cfg.super_experts]},
        "measurements": rows, "home": home_row, "total_s": total, "reference_ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
