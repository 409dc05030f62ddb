"""Benchmark: training steps of the shipped presets on transformers' experts kernel vs moelab's backend.

    python bench/train_speed.py                      # -> bench/results/train_speed.json
    python bench/train_speed.py --presets fine --steps 12 --threads 2

For each MoE preset (``fine``, ``coarse``), two models from one seed — the stock transformers model
(its default experts kernel, ``grouped_mm`` on CPU) and the same model with ``moelab train
--experts-implementation moelab`` (moelab's experts backend on the model's own weights) — take
optimizer steps on the same batches, alternating A B A B so a drift of the machine's load reaches
both alike. Reported: median seconds per step after ``--warmup`` steps, tokens/s, and
``moelab vs transformers`` = median(transformers) / median(moelab) (> 1: moelab's backend is faster).
The two models' first-step losses must agree (the same maths), which the script checks.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import moelab
from moelab.data.atomic import atomic_write_text
from moelab.data.streams import encode_split
from moelab.data.tokenizer import eos_id, load_tokenizer
from moelab.train.config import make_config
from moelab.train.loop import build_model, make_optimizer, train_step, use_experts_backend
from moelab.train.routing import RoutingRecorder

IMPLEMENTATIONS = ("transformers", "moelab")


def _runner(preset: str, implementation: str, corpus: Path, threads: int):
    cfg = make_config(preset, corpus=corpus, threads=threads, experts_implementation=implementation)
    tok = load_tokenizer(corpus)
    model = build_model(cfg, tok.get_vocab_size(), eos_id(tok))
    use_experts_backend(cfg, model)
    model.train()
    opt = make_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(cfg.seed)
    recorder = RoutingRecorder(model) if cfg.arch == "deepseek_v3" else None
    return cfg, model, opt, gen, recorder


def measure(preset: str, corpus: Path, steps: int, warmup: int, threads: int) -> dict:
    streams = encode_split(corpus, "train")
    runs = {name: _runner(preset, name, corpus, threads) for name in IMPLEMENTATIONS}
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    first_loss: dict[str, float] = {}
    for step in range(warmup + steps):
        for name in IMPLEMENTATIONS:
            cfg, model, opt, gen, recorder = runs[name]
            t0 = time.perf_counter()
            losses = train_step(cfg, model, opt, streams, gen, step, recorder)
            elapsed = time.perf_counter() - t0
            if step == 0:
                first_loss[name] = float(losses.ce.detach())
            if step >= warmup:
                times[name].append(elapsed)
    a, b = first_loss.values()
    if abs(a - b) > 1e-4 * abs(a):
        raise SystemExit(f"{preset}: first-step losses differ ({first_loss}); the two paths are not the same maths")
    cfg = runs["moelab"][0]
    tokens = cfg.batch_size * cfg.seq_len
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"preset": preset, "tokens_per_step": tokens, "steps": steps, "warmup": warmup,
            "first_step_ce": first_loss, "median_s": median,
            "tok_s": {name: tokens / s for name, s in median.items()},
            "moelab vs transformers": median["transformers"] / median["moelab"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["fine", "coarse"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = moelab.default_corpus()
    results = [measure(p, corpus, args.steps, args.warmup, args.threads) for p in args.presets]
    print(f"training step, {args.threads} thread(s), median of {args.steps} after {args.warmup} warm-up, interleaved")
    print(f"{'preset':8} {'tok/step':>8} {'transformers s':>15} {'moelab s':>9} {'moelab vs transformers':>23}")
    for r in results:
        m = r["median_s"]
        print(f"{r['preset']:8} {r['tokens_per_step']:8d} {m['transformers']:15.3f} {m['moelab']:9.3f} "
              f"{r['moelab vs transformers']:23.2f}x")
    doc = {"command": "python bench/train_speed.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k != "out"),
           "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "torch": torch.__version__, "threads": args.threads, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
