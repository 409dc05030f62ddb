"""Micro-benchmark (issue 15): how fast can plain PyTorch read the active experts' weights at decode?

    nice -n 10 python bench/decode_gemv.py --threads 1            # one token, ~1 minute
    nice -n 10 python bench/decode_gemv.py --threads 1 --tokens 4 # the per-token paths at T=4
    nice -n 10 python bench/decode_gemv.py --quick                # small sizes: checks that it runs
    nice -n 10 python bench/decode_gemv.py --rotate 48 --reps 61  # 48 blocks in turn, no flush
    THP_MEM_ALLOC_ENABLE=1 nice -n 10 python bench/decode_gemv.py --rotate 48 --reps 61  # huge pages

T tokens (default 1) through the experts of the fine-grained block (H1024 I256 E64 k8, float32,
SwiGLU): each candidate computes ``y_t = sum_k w_tk down_e(silu(gate_e x_t) * up_e x_t)``, reading
the active experts' 3*H*I*4 bytes each from DRAM (a 1 GiB buffer is written before every run, as
in bench/moe_layer.py). Reported: weight GB/s = active weight bytes / median time, and that over
the copy bandwidth measured in the same run (read + write bytes of ``dst.copy_(src)``, 1 GiB, the
best over the thread counts timed), which is bench/moe_layer.py's "memory bound" ratio.
Candidates (none copies expert weights):

- ``run_experts``: ``Experts``' forward as dispatched (at one token: moelab.nn._native's C kernel,
  where a C compiler built it; at a few rows, float32: ``grouped_mm``);
- ``grouped_mm``: one ``grouped_mm`` per projection, called directly;
- ``loop mm``: the per-expert loop (``F.linear`` / ``mm`` on each expert's ``[n, H]`` rows);
- ``plan mv``: ``torch.mv`` for each single-row expert of the dispatch plan, the loop's ``mm``
  for the others (what a decode path in the experts' forward would run);

and, at T=1 only, hand-written one-token forwards:

- ``mv``: per expert ``torch.mv`` on the contiguous ``[out, in]`` slice (reduction along
  contiguous memory), the combine weight folded into the activation, ``addmv_`` into ``y``;
- ``matmul wT``: per expert ``x_H @ w.T`` (``torch.matmul`` of a vector with the transposed slice);
- ``mv fused gate_up``: ``mv`` on a ``[E, 2I, H]`` fused gate/up tensor (transformers' layout:
  one product instead of two; the fused copy is made once at setup, not per call);
- ``kernel``: ``moelab.nn._native.one_token`` called directly (the gate/up rows and the down rows
  of all K experts in one OpenMP parallel region: ``run_experts`` less the module's own checks);
- ``decode_forward``: moelab's one-token path on a dispatch plan (transformers blocks, offloading:
  the same kernel);
- ``read only``: ``w.sum()`` of each active slice (a pure streaming read: what the CPU reaches
  reading these slices without any product; not a forward);
- ``read packed per expert`` / ``read contiguous``: the same bytes read as one ``[3, I, H]`` block
  per expert (gate, up, down transposed) / as one contiguous tensor: what other layouts would allow.

At each of ``--threads`` (default 1,2; ``torch.set_num_threads``). Median of ``--reps`` after warm-up;
candidates interleaved within each repetition so load drift hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from moe_layer import (  # bench/moe_layer.py: the script's folder is on sys.path
    flush_caches,
    measure_bandwidth,
)

from moelab.nn import Experts, ExpertsConfig

CASE = {"H": 1024, "I": 256, "E": 64, "k": 8}
QUICK_CASE = {"H": 256, "I": 64, "E": 64, "k": 8}


def mv_forward(x_H, ids, w_K, gate_EIH, up_EIH, down_EHI):
    """``y_H`` by ``torch.mv`` on each expert's contiguous ``[out, in]`` slices."""
    y_H = x_H.new_zeros(down_EHI.shape[1])
    for e, w in zip(ids, w_K, strict=True):
        a_I = F.silu(torch.mv(gate_EIH[e], x_H)).mul_(torch.mv(up_EIH[e], x_H)).mul_(w)
        y_H.addmv_(down_EHI[e], a_I)
    return y_H


def matmul_forward(x_H, ids, w_K, gate_EIH, up_EIH, down_EHI):
    """``y_H`` by ``x_H @ w.T`` per expert slice."""
    y_H = x_H.new_zeros(down_EHI.shape[1])
    for e, w in zip(ids, w_K, strict=True):
        a_I = F.silu(x_H @ gate_EIH[e].T).mul_(x_H @ up_EIH[e].T).mul_(w)
        y_H += a_I @ down_EHI[e].T
    return y_H


def mv_fused_forward(x_H, ids, w_K, gate_up_E2IH, down_EHI):
    """``y_H`` by one ``torch.mv`` on each expert's fused ``[2I, H]`` gate/up slice."""
    i = down_EHI.shape[2]
    y_H = x_H.new_zeros(down_EHI.shape[1])
    for e, w in zip(ids, w_K, strict=True):
        h_2I = torch.mv(gate_up_E2IH[e], x_H)
        y_H.addmv_(down_EHI[e], F.silu(h_2I[:i]).mul_(h_2I[i:]).mul_(w))
    return y_H


def plan_mv_forward(x_TH, w_TK, plan, gate_EIH, up_EIH, down_EHI, act):
    """``experts_forward`` on a dispatch plan with each single-row expert by ``torch.mv`` (the
    ``mv`` candidate as the experts' forward would run it; commit 89308d1 had it there), experts
    of more rows by the loop's ``mm``; ``[T, H]``."""
    from moelab.nn import _dispatch

    w_R = _dispatch.slot_weights(w_TK, plan, x_TH.dtype)
    y_TH = x_TH.new_zeros(plan.T, down_EHI.shape[1])
    # Python lists and row views made once: per-slot tensor indexing costs as much as an op
    tok_R, w_list, x_rows, y_rows = plan.tok_R.tolist(), w_R.tolist(), x_TH.unbind(), y_TH.unbind()
    for e, s, n in _dispatch._rows(plan):
        if n == 1:
            x_H = x_rows[tok_R[s]]
            a_I = act(torch.mv(gate_EIH[e], x_H), torch.mv(up_EIH[e], x_H)).mul_(w_list[s])
            y_rows[tok_R[s]].addmv_(down_EHI[e], a_I)
            continue
        tok_e = plan.tok_R[s : s + n]
        h_gate, h_up = _dispatch.project_in(x_TH.index_select(0, tok_e), e, gate_EIH, up_EIH,
                                            None, None)
        y_TH.index_add_(0, tok_e, _dispatch.weighted_out(act, h_gate, h_up, w_R[s : s + n, None],
                                                         down_EHI[e], None))
    return y_TH


def read_only(ids, gate_EIH, up_EIH, down_EHI):
    """Streaming read of the active slices (no product): the CPU's read rate on them."""
    return sum(float(t[e].sum()) for e in ids for t in (gate_EIH, up_EIH, down_EHI))


def read_ceilings(ids, gate_EIH, up_EIH, down_EHI) -> dict:
    """Reads of the same bytes in other layouts (no product; made once, not per run): one contiguous
    tensor, and per expert one ``[3, I, H]`` block (gate, up and down transposed, packed)."""
    packed_E3IH = torch.stack([gate_EIH, up_EIH, down_EHI.transpose(1, 2)], dim=1).contiguous()
    flat = torch.cat([packed_E3IH[e].reshape(-1) for e in ids])
    return {"read contiguous": lambda: float(flat.sum()),
            "read packed per expert": lambda: sum(float(packed_E3IH[e].sum()) for e in ids)}


def candidates(ex: Experts, x_TH, ids_TK, w_TK, gate_up_E2IH, ceilings: bool = True):
    """name -> zero-argument function computing the forward (or the read) of the tokens; the
    hand-written one-token candidates only at T=1 (without ``gate_up_E2IH`` no fused candidate,
    without ``ceilings`` no reads in other layouts, which copy the weights)."""
    from moelab.nn import _dispatch, _native
    from moelab.nn.experts import _grouped_mm_forward

    g, u, d = ex.gate.detach(), ex.up.detach(), ex.down.detach()
    plan = _dispatch.make_plan(ids_TK, None, ex.num_experts)
    weights = (g, u, d, None, None, None)
    fns = {
        "run_experts": lambda: ex(x_TH, ids_TK, w_TK),
        "grouped_mm": lambda: _grouped_mm_forward(x_TH, w_TK, plan, weights, ex.act),
        "loop mm": lambda: _dispatch.experts_forward(x_TH, w_TK, plan, *weights, ex.act),
        "plan mv": lambda: plan_mv_forward(x_TH, w_TK, plan, g, u, d, ex.act),
    }
    if x_TH.shape[0] > 1:
        return fns
    ids, w_K, x_H = ids_TK[0].tolist(), w_TK[0].tolist(), x_TH[0]
    fns |= {
        "mv": lambda: mv_forward(x_H, ids, w_K, g, u, d),
        "matmul wT": lambda: matmul_forward(x_H, ids, w_K, g, u, d),
    }
    if gate_up_E2IH is not None:
        fns["mv fused gate_up"] = lambda: mv_fused_forward(x_H, ids, w_K, gate_up_E2IH, d)
    rows_K = sorted(ids)
    w_rows = [w_K[ids.index(e)] for e in rows_K]
    if _native.library() is not None:
        fns["kernel"] = lambda: _native.one_token(x_TH, rows_K, w_rows, *weights, ex.act)
        fns["decode_forward"] = lambda: _dispatch.decode_forward(x_TH, w_TK, plan, *weights, ex.act)
    fns["read only"] = lambda: read_only(ids, g, u, d)
    return fns | read_ceilings(ids, g, u, d) if ceilings else fns


def check_agree(fns: dict, ref) -> None:
    """Every forward candidate gives the reference's output (float32, loose tolerance)."""
    with torch.no_grad():
        for n, fn in fns.items():
            if not n.startswith("read "):
                y = fn().reshape(ref.shape)
                torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5, msg=n)


def time_all(fns: dict, threads: list[int], reps: int, flush_mib: int) -> dict[str, list[float]]:
    """Seconds per run of each (candidate, thread count), interleaved per repetition."""
    times: dict[str, list[float]] = {f"{n} @{t}t": [] for t in threads for n in fns}
    with torch.no_grad():
        for t in threads:  # warm-up
            torch.set_num_threads(t)
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for t in threads:
                torch.set_num_threads(t)
                for n, fn in fns.items():
                    flush_caches(flush_mib)
                    t0 = time.perf_counter()
                    fn()
                    times[f"{n} @{t}t"].append(time.perf_counter() - t0)
    return times


def flushed_times(case: dict, T: int, threads: list[int], reps: int, flush_mib: int):
    """``(seconds per candidate, active weight bytes)``: the candidates on one block, the caches
    flushed before each run, checked against the reference first."""
    H, inner, E, k = case["H"], case["I"], case["E"], case["k"]
    torch.manual_seed(0)
    ex = Experts(ExpertsConfig(num_experts=E, hidden_size=H, inner_size=inner))
    gate_up_E2IH = torch.cat([ex.gate.detach(), ex.up.detach()], dim=1).contiguous()
    x_TH = torch.randn(T, H)
    ids_TK = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w_TK = torch.softmax(torch.randn(T, k), -1)
    fns = candidates(ex, x_TH, ids_TK, w_TK, gate_up_E2IH)
    with torch.no_grad():
        check_agree(fns, ex.reference(x_TH, ids_TK, w_TK))
    times = time_all(fns, threads, reps, flush_mib)
    return times, int(torch.unique(ids_TK).numel()) * 3 * H * inner * 4


def rotated_times(case: dict, n_layers: int, threads: list[int], reps: int):
    """The same for one token through ``n_layers`` blocks in turn (bench/_decode_rotate.py), the
    forward candidates checked against each other on the first draw."""
    import _decode_rotate

    all_draws = _decode_rotate.draws(_decode_rotate.layers(case, n_layers), case["k"])
    with torch.no_grad():
        first = {n: fn() for n, fn in all_draws[0].items() if not n.startswith("read ")}
        ref = first.pop("run_experts").reshape(-1)
        check_agree({n: (lambda y=y: y) for n, y in first.items()}, ref)
    times = _decode_rotate.time_rotated(all_draws, threads, reps)
    return times, case["k"] * 3 * case["H"] * case["I"] * 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts to time, comma-separated")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per forward (T)")
    ap.add_argument("--rotate", type=int, default=0, metavar="N",
                    help="one token through N blocks in turn instead of flushing (bench/_decode_rotate.py)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    case = QUICK_CASE if args.quick else CASE
    reps, flush_mib = (3, 64) if args.quick else (args.reps, 1024)
    T = args.tokens
    if args.rotate and T != 1:
        raise SystemExit("--rotate: one token only (--tokens 1)")
    threads = [int(t) for t in args.threads.split(",")]
    load_before = os.getloadavg()[0]
    bws = {}
    for t in threads:  # the bound at each thread count (a loaded core slows a 2-thread copy)
        torch.set_num_threads(t)
        bws[t] = measure_bandwidth(reps, flush_mib)
    bw = max(bws.values())
    if args.rotate:
        times, weight_bytes = rotated_times(case, args.rotate, threads, reps)
    else:
        times, weight_bytes = flushed_times(case, T, threads, reps, flush_mib)
    rows = {n: {"median_s": statistics.median(ts), "runs_s": ts,
                "weight_gbytes_per_s": weight_bytes / statistics.median(ts) / 1e9,
                "vs_memory_bound": weight_bytes / bw / statistics.median(ts)}
            for n, ts in times.items()}
    report = {"command": "nice -n 10 python bench/decode_gemv.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "case": case, "tokens": T,
              "reps": reps, "rotate_layers": args.rotate,
              # PyTorch puts CPU tensors of >= 2 MB on transparent huge pages when this is 1
              "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
              "active_weight_bytes": weight_bytes, "copy_bandwidth_gbytes_per_s": bw / 1e9,
              "copy_bandwidth_gbytes_per_s_by_threads": {t: b / 1e9 for t, b in bws.items()},
              "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
              "candidates": rows}
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (best of threads "
          + ", ".join(f"{t}: {b / 1e9:.1f}" for t, b in bws.items())
          + f"); {weight_bytes / 1e6:.1f} MB active weights; median of {reps}")
    print(f"{'candidate':<26}{'ms':>8}{'GB/s':>8}{'of bound':>10}")
    for n, r in rows.items():
        print(f"{n:<26}{1e3 * r['median_s']:8.3f}{r['weight_gbytes_per_s']:8.2f}"
              f"{100 * r['vs_memory_bound']:9.0f} %")
    print(f"load average (1 min) before {load_before:.2f}, after {report['load_average_after']:.2f}")
    out = args.out or (Path("/tmp/decode_gemv_quick.json") if args.quick
                       else Path(__file__).parent / "results"
                       / f"decode_gemv_T{T}{f'_rotate{args.rotate}' if args.rotate else ''}"
                         f"{'_thp' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else ''}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
