"""Benchmark: moelab's experts backend on a transformers block against moelab's own paths, interleaved.

    python bench/experts_backend.py                 # -> bench/results/experts_backend.json
    python bench/experts_backend.py --threads 2 --case mixtral

Three implementations of the same experts (weights copied from one ``moelab.nn.Experts``; blocks built
by ``bench/moe_layer.py``'s ``Block``):
- ``moelab``: ``moelab.nn.Experts`` on its own contiguous weights;
- ``moelab from_view``: today's moelab path on a transformers block (``experts_from_view``);
- ``hf moelab``: the transformers block's experts module with ``experts_implementation="moelab"``
  (the experts backend, weights from the model's own fused parameters).
Each repetition runs the three one after the other, so a drift of the machine's load reaches all three
alike (``bench/moe_layer.py`` times each implementation's runs back to back, which on a shared machine
moves ratios by 10-15 %). Reported: median seconds per implementation and ``hf moelab vs fastest
moelab`` = min(moelab, from_view) / hf moelab (>= 1: the backend is at least as fast).
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

sys.path.insert(0, str(Path(__file__).parent))
import moe_layer  # noqa: E402  (the blocks and weights of the layer benchmark)

NAMES = ("moelab", "moelab from_view", "hf moelab")
MODES = (("forward+backward", 4096, True, 5), ("forward", 4096, False, 7), ("forward", 16, False, 21),
         ("forward", 1, False, 21))


def _once(block, fns, name: str, backward: bool) -> float:
    x = block.x.detach().requires_grad_(backward)
    if backward:
        for p in block.params(name):
            p.grad = None
        t0 = time.perf_counter()
        fns[name](x).sum().backward()
        return time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        fns[name](x)
        return time.perf_counter() - t0


def measure(block, tokens: int, backward: bool, reps: int) -> dict:
    fns = block.functions(tokens)
    for name in NAMES:  # warm-up
        _once(block, fns, name, backward)
    times: dict[str, list[float]] = {n: [] for n in NAMES}
    for _ in range(reps):
        for name in NAMES:
            times[name].append(_once(block, fns, name, backward))
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"tokens": tokens, "reps": reps, "median_s": med,
            "hf moelab vs fastest moelab": min(med["moelab"], med["moelab from_view"]) / med["hf moelab"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=sorted(moe_layer.CASES), default="fine-grained")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "experts_backend.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    block = moe_layer.Block(moe_layer.CASES[args.case])
    load_before = os.getloadavg()[0]
    rows = []
    print(f"{'mode':18s} {'tokens':>6s} " + " ".join(f"{n:>17s}" for n in NAMES) + "  hf moelab vs fastest")
    for mode, tokens, backward, reps in MODES:
        r = measure(block, tokens, backward, reps)
        r["mode"] = mode
        rows.append(r)
        ms = " ".join(f"{1000 * r['median_s'][n]:14.1f} ms" for n in NAMES)
        print(f"{mode:18s} {tokens:6d} {ms}  {r['hf moelab vs fastest moelab']:.2f}x")
    out = {"command": "python bench/experts_backend.py " + " ".join(sys.argv[1:]),
           "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "torch": torch.__version__, "threads": args.threads, "case": args.case,
           "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
