"""Benchmark: moelab's `Experts` / `MoELayer` against transformers' experts and two physical bounds.

    python bench/moe_layer.py                  # full sizes (minutes; run on an otherwise idle machine)
    python bench/moe_layer.py --quick          # small sizes, seconds: checks that everything runs

CPU, float32, ``--threads`` (default 2). Two blocks: a Mixtral-like one (H=1024, I=2816, E=8, k=2)
and a fine-grained one (H=1024, I=256, E=64, k=8). Modes: forward and forward+backward at 4096
tokens, forward at 1 and 16 tokens. All implementations get the same weights and the same routing
(a top-k softmax router over random hidden states):

- ``moelab``: ``moelab.nn.Experts`` (sorted dispatch, per-expert GEMMs, hand-written backward);
- ``moelab layer``: the whole ``MoELayer`` (router + experts), to show the router's cost;
- ``hf eager`` / ``hf grouped_mm``: transformers' ``MixtralExperts`` (Mixtral block) or
  ``Qwen3MoeExperts`` (fine-grained block) with that experts implementation;
- ``hf moelab``: the experts of a one-layer transformers model of that family opened with
  ``open_model(model, experts_implementation="moelab")`` (moelab's dispatch on the model's own
  fused ``gate_up_proj``, through ``ExpertsInterface``, default weights provider);
- ``moelab from_view``: today's moelab path on a transformers block, ``experts_from_view`` over
  the same model's storage (what ``moelab.nn.patch`` runs);
- ``dense bound``: one SwiGLU MLP (H -> I -> H) over tokens*k rows: the same FLOPs as the experts,
  as three plain GEMMs;
- ``memory bound``: bytes of the active experts' weights (3*H*I*4 per expert hit) over the copy
  bandwidth measured in the same run (``dst.copy_(src)`` of 1 GiB, read + write bytes / time; for
  the 1- and 16-token modes the best of the run's first measurement and two taken right after the
  mode's timings).
  The machine's last-level cache can hold a whole block (480 MiB here), so the 1- and 16-token
  runs first write a 1 GiB buffer: the weights come from DRAM, as when decoding a whole model.

Each timing is the median of ``--reps`` runs (``--decode-reps`` in the 1- and 16-token modes, whose
runs take milliseconds and move by 10-20 % on a shared machine) after one warm-up; the implementations are interleaved
within every repetition so that load drifting on a shared machine hits them alike. FLOPs: forward
6*R*H*I, forward+backward 18*R*H*I with R = tokens*k routed rows. Ratios are times measured in this
run: ``vs best hf`` = t(best transformers) / t(moelab), ``vs bound`` = t(bound) / t(moelab);
``hf moelab vs moelab`` = t(fastest of moelab, moelab from_view) / t(hf moelab) (>= 1: the
backend is not slower than today's fastest moelab path).
Where a goal of issue 3 is missed, the JSON carries the top operators of a torch.profiler run of
moelab's layer in that mode (``why``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from moelab.nn import DenseMLP, Experts, ExpertsConfig, MoELayer, TopKConfig, TopKRouter

CASES = {
    "mixtral": {"family": "Mixtral", "H": 1024, "I": 2816, "E": 8, "k": 2},
    "fine-grained": {"family": "Qwen3-MoE", "H": 1024, "I": 256, "E": 64, "k": 8},
}
QUICK_CASES = {
    "mixtral": {"family": "Mixtral", "H": 256, "I": 704, "E": 8, "k": 2},
    "fine-grained": {"family": "Qwen3-MoE", "H": 256, "I": 64, "E": 64, "k": 8},
}
MODES = [("forward", 4096), ("forward+backward", 4096), ("forward", 16), ("forward", 1)]
QUICK_MODES = [("forward", 256), ("forward+backward", 256), ("forward", 16), ("forward", 1)]
# issue 3's goals: (mode, tokens, reference, minimum ratio); --quick checks them at its own sizes.
# The issue states them with figures for the fine-grained block; both blocks are checked here.
GOALS = [
    ("training step >= 80 % of dense bound", "forward+backward", 4096, "dense bound", 0.80),
    ("training step >= 1.3x best transformers", "forward+backward", 4096, "best hf", 1.30),
    ("forward at 4096 tokens >= 95 % of dense bound", "forward", 4096, "dense bound", 0.95),
    ("forward at 1 token >= 70 % of memory bound", "forward", 1, "memory bound", 0.70),
]


def hf_experts(case: dict, impl: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """transformers' experts module of the block's family, holding copies of the given weights."""
    H, inner, E, k = case["H"], case["I"], case["E"], case["k"]
    if case["family"] == "Mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        cfg = MixtralConfig(hidden_size=H, intermediate_size=inner, num_local_experts=E,
                            num_experts_per_tok=k, experts_implementation=impl)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=inner, num_experts=E,
                             num_experts_per_tok=k, experts_implementation=impl)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mod = cls(cfg)
    mod.gate_up_proj = torch.nn.Parameter(torch.cat([gate, up], dim=1).contiguous())
    mod.down_proj = torch.nn.Parameter(down.detach().clone())
    return mod


def hf_moelab(case: dict, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """The experts of a one-layer transformers model of the block's family holding copies of the
    given weights, run by moelab's experts backend; and ``experts_from_view`` over that storage."""
    import warnings

    import transformers

    from moelab.models import open_model
    from moelab.models.tiny import TINY_CONFIGS
    from moelab.nn import experts_from_view

    H, inner, E, k = case["H"], case["I"], case["E"], case["k"]
    cfg_name, lm_name, _ = TINY_CONFIGS[case["family"]]
    sizes = dict(intermediate_size=inner, num_local_experts=E) if case["family"] == "Mixtral" else \
        dict(moe_intermediate_size=inner, num_experts=E, intermediate_size=inner)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=32, hidden_size=H, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, num_experts_per_tok=k, experts_implementation="eager", **sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, lm_name)(cfg).eval()
    view = open_model(model, experts_implementation="moelab")
    ex = view.blocks[0].experts_module
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
        ex.down_proj.copy_(down)
    return ex, experts_from_view(view.blocks[0])


_FLUSH: list[torch.Tensor] = []


def flush_caches(mib: int) -> None:
    """Write a buffer larger than the last-level cache, so the next run reads weights from DRAM
    (as decoding a model whose layers do not all fit in cache does)."""
    if not _FLUSH or _FLUSH[0].numel() != mib * 2**20 // 4:
        _FLUSH[:] = [torch.empty(mib * 2**20 // 4)]
    _FLUSH[0].fill_(1.0)


def measure_bandwidth(reps: int, mib: int = 1024) -> float:
    """Copy bandwidth in bytes/s: (read + write bytes) / time of ``dst.copy_(src)``, median.
    The buffers (2 x ``mib``) exceed the last-level cache, so this is DRAM bandwidth."""
    n = mib * 2**20 // 4
    src, dst = torch.rand(n), torch.empty(n)
    dst.copy_(src)
    times = []
    for _ in range(max(reps, 3)):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times)


class Block:
    """One benchmark block: weights, routing inputs and every implementation, built once."""

    def __init__(self, case: dict, seed: int = 0) -> None:
        torch.manual_seed(seed)
        H, inner, E, k = case["H"], case["I"], case["E"], case["k"]
        self.case = case
        self.experts = Experts(ExpertsConfig(num_experts=E, hidden_size=H, inner_size=inner))
        self.router = TopKRouter(TopKConfig(num_experts=E, hidden_size=H, top_k=k))
        self.layer = MoELayer(self.router, self.experts)
        w = [p.detach() for p in (self.experts.gate, self.experts.up, self.experts.down)]
        self.hf = {impl: hf_experts(case, impl, *w) for impl in ("eager", "grouped_mm")}
        self.hf["moelab"], self.from_view = hf_moelab(case, *w)
        self.dense = DenseMLP(H, inner)

    def inputs(self, tokens: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(tokens, self.case["H"], generator=g)
        with torch.no_grad():
            r = self.router(x)
        return x, r.ids_TK, r.weights_TK

    def functions(self, tokens: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        x, ids, w = self.inputs(tokens)
        rows = tokens * self.case["k"]
        xd = torch.randn(rows, self.case["H"], generator=torch.Generator().manual_seed(2))
        fns = {
            "moelab": lambda x_: self.experts(x_, ids, w),
            "moelab layer": lambda x_: self.layer(x_).y,
            "hf eager": lambda x_: self.hf["eager"](x_, ids, w),
            "hf grouped_mm": lambda x_: self.hf["grouped_mm"](x_, ids, w),
            "hf moelab": lambda x_: self.hf["moelab"](x_, ids, w),
            "moelab from_view": lambda x_: self.from_view(x_, ids, w),
            "dense bound": lambda x_: self.dense(x_),
        }
        self.x, self.xd, self.ids = x, xd, ids
        return fns

    def params(self, name: str) -> list[torch.nn.Parameter]:
        mod = {"moelab": self.experts, "moelab layer": self.layer, "dense bound": self.dense,
               "hf eager": self.hf["eager"], "hf grouped_mm": self.hf["grouped_mm"],
               "hf moelab": self.hf["moelab"], "moelab from_view": self.from_view}[name]
        return list(mod.parameters())


def run_once(block: Block, name: str, fn, backward: bool, flush_mib: int = 0) -> float:
    """Seconds for one forward (no_grad) or one forward+backward (input and weights need grads);
    ``flush_mib`` > 0 evicts the caches first (decoding modes: weights come from DRAM)."""
    x = block.xd if name == "dense bound" else block.x
    if flush_mib:
        flush_caches(flush_mib)
    if not backward:
        with torch.no_grad():
            t0 = time.perf_counter()
            fn(x)
            return time.perf_counter() - t0
    for p in block.params(name):
        p.grad = None
    x = x.detach().requires_grad_()
    dy = block.dy_dense if name == "dense bound" else block.dy
    t0 = time.perf_counter()
    # NOTE: a random dy, not y.sum(): grouped_mm's fp32 backward fails on a zero-stride gradient
    fn(x).backward(dy)
    return time.perf_counter() - t0


def bench_mode(block: Block, mode: str, tokens: int, reps: int, bandwidth: float,
               flush_mib: int, decode_reps: int | None = None) -> dict:
    backward = mode == "forward+backward"
    flush_mib = flush_mib if tokens <= 16 else 0  # compute-bound modes: caches do not matter
    reps = decode_reps if flush_mib and decode_reps else reps
    fns = block.functions(tokens)
    g = torch.Generator().manual_seed(3)
    block.dy = torch.randn(block.x.shape, generator=g)
    block.dy_dense = torch.randn(block.xd.shape, generator=g)
    for p in (*block.experts.parameters(), *block.router.parameters(), *block.dense.parameters(),
              *block.hf["eager"].parameters(), *block.hf["grouped_mm"].parameters(),
              *block.hf["moelab"].parameters(), *block.from_view.parameters()):
        p.requires_grad_(backward)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for n, fn in fns.items():  # warm-up
        run_once(block, n, fn, backward)
    for _ in range(reps):
        for n, fn in fns.items():
            times[n].append(run_once(block, n, fn, backward, flush_mib))
    H, inner = block.case["H"], block.case["I"]
    rows = tokens * block.case["k"]
    flops = (18 if backward else 6) * rows * H * inner
    active = int(torch.unique(block.ids).numel())
    weight_bytes = active * 3 * H * inner * 4
    out: dict = {"mode": mode, "tokens": tokens, "rows": rows, "flops": flops, "reps": reps,
                 "caches_flushed_before_each_run": bool(flush_mib),
                 "active_experts": active, "active_weight_bytes": weight_bytes, "impl": {}}
    for n, ts in times.items():
        med = statistics.median(ts)
        out["impl"][n] = {"median_s": med, "runs_s": ts, "gflops": flops / med / 1e9,
                          "weight_gbytes_per_s": weight_bytes / med / 1e9}
    if flush_mib:  # the bound from the best copy bandwidth seen around these runs (a slow spell of
        # the shared machine during one measurement would otherwise flatter the ratio)
        bandwidth = max(bandwidth, *(measure_bandwidth(reps, flush_mib) for _ in range(2)))
    out["bandwidth_gbytes_per_s"] = bandwidth / 1e9
    out["memory_bound_s"] = weight_bytes / bandwidth
    t_ours = out["impl"]["moelab"]["median_s"]
    best_hf = min(("hf eager", "hf grouped_mm"), key=lambda n: out["impl"][n]["median_s"])
    out["best_hf"] = best_hf
    out["ratios"] = {
        "vs best hf": out["impl"][best_hf]["median_s"] / t_ours,
        "vs dense bound": out["impl"]["dense bound"]["median_s"] / t_ours,
        "vs memory bound": out["memory_bound_s"] / t_ours,
        "layer vs best hf": out["impl"][best_hf]["median_s"] / out["impl"]["moelab layer"]["median_s"],
        "hf moelab vs best hf": out["impl"][best_hf]["median_s"] / out["impl"]["hf moelab"]["median_s"],
        "hf moelab vs moelab": min(t_ours, out["impl"]["moelab from_view"]["median_s"])
        / out["impl"]["hf moelab"]["median_s"],
    }
    return out


def profile_top(block: Block, mode: str, tokens: int, top: int = 8) -> list[dict]:
    """The ``top`` operators by self CPU time of one run of moelab's experts in this mode."""
    from torch.profiler import ProfilerActivity, profile

    backward = mode == "forward+backward"
    fn = block.functions(tokens)["moelab"]
    block.dy = torch.randn(block.x.shape)
    run_once(block, "moelab", fn, backward)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_once(block, "moelab", fn, backward)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


def check_goals(case_res: dict, block: Block, quick: bool) -> list[dict]:
    goals = []
    for name, mode, tokens, ref, target in GOALS:
        if quick and tokens == 4096:
            tokens = QUICK_MODES[0][1]
        r = next(m for m in case_res["modes"] if m["mode"] == mode and m["tokens"] == tokens)
        key = {"dense bound": "vs dense bound", "best hf": "vs best hf",
               "memory bound": "vs memory bound"}[ref]
        value = r["ratios"][key]
        g = {"goal": name, "target": target, "value": value, "met": value >= target}
        if not g["met"]:
            note = NOTES.get((mode, tokens), "")
            if ref == "best hf":
                hf_vs_bound = r["impl"]["dense bound"]["median_s"] / r["impl"][r["best_hf"]]["median_s"]
                note = (f"{r['best_hf']} runs at {100 * hf_vs_bound:.0f} % of the dense bound here, so "
                        f"{target}x it means {100 * target * hf_vs_bound:.0f} % of the bound; " + note)
            g["why"] = {"note": note, "profile": profile_top(block, mode, tokens)}
        goals.append(g)
    return goals


# What a missed goal's profile typically shows (the JSON adds the measured profile of this run).
NOTES: dict[tuple[str, int], str] = {
    ("forward+backward", 4096): (
        "beyond the dense MLP's GEMMs, the layer gathers each expert's rows of x and dy and "
        "scatter-adds its outputs and dx (passes over [tokens*k, H]), recomputes the activation "
        "and runs E smaller GEMMs per projection, which run below the large dense GEMMs' rate"),
    ("forward", 4096): (
        "the dense bound is three large GEMMs; the layer adds a gather of x rows and a scatter-add "
        "of outputs per expert and runs E GEMMs of ~tokens*k/E rows each, which reach a lower "
        "GFLOP/s than one GEMM over all rows"),
    ("forward", 1): (
        "reading the active experts' weights is the floor; moelab.nn._native's kernel reads them "
        "in one parallel region (without a C compiler: one torch.mv per slice); what remains is "
        "the call's Python, whose objects the flush leaves cold, and reads of scattered rows below "
        "the copy bandwidth (bench/decode_gemv.py)"),
}


def print_case(name: str, res: dict) -> None:
    c = res["case"]
    print(f"\n{name}: H={c['H']} I={c['I']} E={c['E']} k={c['k']}  (median of {res['reps']}, "
          f"{res['decode_reps']} at 1 and 16 tokens; "
          f"copy bandwidth {res['bandwidth_gbytes_per_s']:.1f} GB/s)")
    print(f"{'mode':<18}{'tokens':>7}{'impl':>18}{'ms':>10}{'GFLOP/s':>9}{'GB/s w':>8}")
    for m in res["modes"]:
        for n, r in m["impl"].items():
            print(f"{m['mode']:<18}{m['tokens']:>7}{n:>18}{1e3 * r['median_s']:10.2f}"
                  f"{r['gflops']:9.1f}{r['weight_gbytes_per_s']:8.1f}")
        q = m["ratios"]
        print(f"{'':<25}memory bound {1e3 * m['memory_bound_s']:.2f} ms; moelab: "
              f"{q['vs best hf']:.2f}x best hf ({m['best_hf']}), {100 * q['vs dense bound']:.0f} % of "
              f"dense bound, {100 * q['vs memory bound']:.0f} % of memory bound; hf moelab: "
              f"{q['hf moelab vs best hf']:.2f}x best hf, {q['hf moelab vs moelab']:.2f}x fastest moelab")
    for g in res["goals"]:
        print(f"  goal {'MET ' if g['met'] else 'MISSED'}  {g['goal']}: {g['value']:.2f} (target {g['target']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and token counts (seconds)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per implementation (median)")
    ap.add_argument("--decode-reps", type=int, default=21,
                    help="timed runs per implementation in the 1- and 16-token modes (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="only this block")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/moe_layer.json; --quick: a temporary file)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases, modes = (QUICK_CASES, QUICK_MODES) if args.quick else (CASES, MODES)
    reps = min(args.reps, 3) if args.quick else args.reps
    decode_reps = min(args.decode_reps, 3) if args.quick else args.decode_reps
    out_path = args.out or (Path(tempfile.gettempdir()) / "moe_layer_quick.json" if args.quick
                            else Path(__file__).parent / "results" / "moe_layer.json")
    import transformers

    flush_mib = 64 if args.quick else 1024
    bandwidth = measure_bandwidth(reps, flush_mib)
    report = {"command": "python bench/moe_layer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cpus": os.cpu_count(), "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": args.threads, "dtype": "float32",
              "bandwidth_gbytes_per_s": bandwidth / 1e9,
              "load_average_before": os.getloadavg()[0], "cases": {}}
    for name in args.case or list(cases):
        block = Block(cases[name])
        res = {"case": cases[name], "reps": reps, "bandwidth_gbytes_per_s": bandwidth / 1e9,
               "decode_reps": decode_reps,
               "modes": [bench_mode(block, m, t, reps, bandwidth, flush_mib, decode_reps)
                         for m, t in modes]}
        res["goals"] = check_goals(res, block, args.quick)
        print_case(name, res)
        report["cases"][name] = res
    report["load_average_after"] = os.getloadavg()[0]
    print(f"\nload average (1 min) before {report['load_average_before']:.2f}, "
          f"after {report['load_average_after']:.2f} on {os.cpu_count()} CPUs")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out_path)
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
