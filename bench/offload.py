"""Benchmark of moelab.offload on the shipped default model and the test split of the shipped corpus.

    python bench/offload.py                                  # ~3-4 min on 2 CPU cores
    python bench/offload.py --max-tokens 2048 --decode-tokens 128   # quick look

1. **Replay.** The routing of the default model (fine-grained DeepSeek-V3, 3 MoE layers of 32
   experts, top-7) over ``--max-tokens`` tokens of the corpus' test split (the three domains
   interleaved document by document), recorded with ``moelab.trace.record``, is replayed as one
   stream, token by token and layer by layer (one cache step = one token's distinct experts in one
   layer), through one cache shared by all layers holding 1x-4x the active experts per layer
   (``m * top-k * layers`` experts), with each policy of ``moelab.analysis.cache_policy``: LRU,
   LFU, LRFU and MoE-Infinity's activation-aware policy (online; a request is one 512-token
   sequence of the trace), LRC (the SCH segment oracle, 16 tokens) and Belady (the bound). The cache starts
   empty (cold misses count), as at run time.
2. **Runtime.** ``moelab.offload.offload_model`` at 2x, decoding ``--decode-tokens`` tokens of the
   test split one at a time (teacher-forced, with the KV cache) for each online policy, with and without
   prefetch: measured hits, misses, bytes read per token, peak resident expert bytes and tokens/s
   against the fully resident model (same loop, moelab's experts backend), and the replay of the
   routing that same run made (recorded by routing hooks): the measured hit rate must equal it.
   Expert reads come from the page cache here (a 9 MB checkpoint): the tokens/s measure the
   runtime's overhead, not disk I/O.

3. **ExpertFlow** (``bench/_offload_predictor.py``; ``--part predictor`` runs only it and replaces
   only its key of the JSON and its marked section of the Markdown): the expert predictor's
   precision/recall, the predictive cache's hit rates, its runtime at 2x and token scheduling.

Writes ``bench/results/offload.json`` and ``docs/results/offload.md`` (``--out`` / ``--md``).
Not measured here: the issue's multi-GB generated checkpoints (decode speed at 10-100 % budgets,
peak RSS of inspect/trace/prune); this benchmark stays on the shipped model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import _offload_predictor  # bench/_offload_predictor.py: the script's folder is on sys.path
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from moelab.analysis.cache_policy import ONLINE, ORACLES, replay
from moelab.data import default_corpus, default_model
from moelab.data.atomic import atomic_write_text
from moelab.data.corpus import read_split
from moelab.data.sources import DOMAINS
from moelab.models import open_model
from moelab.offload import min_budget_bytes, offload_model
from moelab.offload.cache import LRFU_HALF_LIFE_TOKENS

ROOT = Path(__file__).resolve().parent.parent
MULTIPLES = (1, 2, 3, 4)
POLICIES = (*ONLINE, *ORACLES)


def test_documents() -> list:
    """The test split's documents, the domains interleaved one document at a time."""
    by_domain = [read_split(default_corpus(), d, "test") for d in DOMAINS]
    out = []
    for i in range(max(len(d) for d in by_domain)):
        out.extend(d[i] for d in by_domain if i < len(d))
    return out


def trace_steps(path: Path, max_tokens: int, progress: bool) -> tuple[list[list], dict]:
    """One cache step per (token, MoE layer), in token order: the token's distinct experts."""
    from moelab.trace import record

    with tempfile.TemporaryDirectory() as tmp:
        docs = test_documents()
        trace = record(path, [d.text for d in docs], Path(tmp) / "trace", seq_len=512,
                       labels=[d.domain for d in docs], max_tokens=max_tokens, progress=progress)
        ids = {layer: trace.ids(layer) for layer in trace.layers}
        n, seq = trace.num_tokens, np.asarray(trace.seq_ids)
    layers = sorted(ids)
    steps = [[(layer, int(e)) for e in np.unique(ids[layer][t]) if e >= 0]
             for t in range(n) for layer in layers]
    starts = [len(layers) * t for t in range(n) if t == 0 or seq[t] != seq[t - 1]]  # a request a sequence
    return steps, {"tokens": n, "layers": layers, "request_starts": starts}


def replay_table(steps: list[list], top_k: int, num_layers: int, starts: list[int]) -> list[dict]:
    rows = []
    for m in MULTIPLES:
        capacity = m * top_k * num_layers
        row = {"multiple": m, "capacity_experts": capacity}
        for policy in POLICIES:
            row[policy] = replay(steps, capacity, policy, seg_len=16, request_starts=starts,
                                 half_life=LRFU_HALF_LIFE_TOKENS * num_layers).hit_rate
        rows.append(row)
    return rows


def decode_inputs(max_tokens: int) -> torch.Tensor:
    """``[1, max_tokens]`` token ids of the test split (the first documents, concatenated)."""
    from moelab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model())
    ids: list[int] = []
    for doc in test_documents():
        ids.extend(tok.encode(doc.text).ids)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens]).unsqueeze(0)


def decode(model: torch.nn.Module, ids: torch.Tensor, steps: list | None = None, view=None) -> float:
    """Teacher-forced decode of ``ids`` one token at a time; returns tokens/s. With ``steps``,
    records each forward's distinct experts per MoE block (routing hooks only observe)."""
    from transformers import DynamicCache

    handles = []
    if steps is not None:
        def hook(event):
            steps.append([(event.block.layer, int(e)) for e in event.ids_TK.unique().tolist()])
        handles = [b.register_routing_hook(hook) for b in view.blocks]
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
    dt = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return ids.shape[1] / dt


def runtime_rows(path: Path, ids: torch.Tensor, reps: int) -> tuple[list[dict], dict]:
    resident = open_model(path, experts_implementation="moelab").model
    _, probe = offload_model(path, budget=1.0)
    size, view = probe.store.expert_bytes, probe.view
    budget = 2 * min_budget_bytes(probe.store, view) * len(view.blocks)
    probe.close()
    base = statistics.median(decode(resident, ids) for _ in range(reps))
    rows = []
    for policy in ONLINE:
        for prefetch in (False, True):
            speeds = []
            for _ in range(reps):  # a fresh, cold cache each time; the last run is reported
                model, experts = offload_model(path, budget=budget, policy=policy, prefetch=prefetch)
                steps: list = []
                speeds.append(decode(model, ids, steps, experts.view))
                s = experts.stats()
                q = experts.prefetcher.quality if prefetch else None
                experts.close()
            sim = replay(steps, budget, policy, size=lambda k: size(k[0]),
                         half_life=LRFU_HALF_LIFE_TOKENS * len(view.blocks))
            rows.append({
                "policy": policy, "prefetch": prefetch, "hit_rate": s.hit_rate,
                "replayed_hit_rate": None if prefetch else sim.hit_rate,
                "bytes_read_per_token": s.bytes_read / ids.shape[1],
                "peak_resident_bytes": s.peak_resident_bytes, "budget_bytes": budget,
                "tokens_per_s": statistics.median(speeds), "resident_tokens_per_s": base,
                "prefetch_precision": q.precision if q else None,
                "prefetch_recall": q.recall if q else None,
            })
            if not prefetch and s.hits != sim.hits:
                raise SystemExit(f"measured hits {s.hits} != replayed {sim.hits} ({policy})")
    return rows, {"budget_bytes": budget, "expert_bytes": size(view.blocks[0].layer),
                  "resident_tokens_per_s": base}


def _f3(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_tables(replayed: list[dict], runtime: list[dict], console: Console) -> None:
    t = Table(title="Hit rate of one cache for all MoE layers, replayed on the test split")
    for col in ("cache", "experts", *POLICIES):
        t.add_column(col, justify="right")
    for r in replayed:
        t.add_row(f"{r['multiple']}x", str(r["capacity_experts"]), *(f"{r[p]:.3f}" for p in POLICIES))
    console.print(t)
    t = Table(title="offload_model at 2x, decoding token by token")
    for col in ("policy", "prefetch", "hit rate", "replayed", "KiB read/token", "peak resident",
                "tokens/s", "resident tokens/s", "pred. precision", "pred. recall"):
        t.add_column(col, justify="right")
    for r in runtime:
        t.add_row(r["policy"], "on" if r["prefetch"] else "off", f"{r['hit_rate']:.3f}",
                  _f3(r["replayed_hit_rate"]), f"{r['bytes_read_per_token'] / 1024:.1f}",
                  f"{r['peak_resident_bytes'] / 2**20:.2f} MiB", f"{r['tokens_per_s']:.1f}",
                  f"{r['resident_tokens_per_s']:.1f}", _f3(r["prefetch_precision"]), _f3(r["prefetch_recall"]))
    console.print(t)


def write_markdown(result: dict, out: Path) -> None:
    rep, run, meta = result["replay"], result["runtime"], result["meta"]
    lines = [
        "# Offloading: expert-cache hit rates and runtime on the default model",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']} (moelab's `bench/offload.py`).",
        "",
        f"Model: the shipped default ({meta['model']}), {meta['top_k']} of {meta['num_experts']} experts "
        f"in each of {meta['num_moe_layers']} MoE layers. Routing of {meta['tokens']} tokens of the "
        "corpus' test split (domains interleaved), replayed as one stream through one cache shared by "
        "all MoE layers, cold start; a step is one token's experts in one layer.",
        "",
        "| cache (x active experts per layer) | experts | " + " | ".join(POLICIES) + " |",
        "|---|---|" + "---|" * len(POLICIES),
    ]
    for r in rep:
        lines.append(f"| {r['multiple']}x | {r['capacity_experts']} | "
                     + " | ".join(f"{r[p]:.3f}" for p in POLICIES) + " |")
    best = max(ONLINE, key=lambda p: rep[1][p])
    lines += ["", f"At 2x the best online policy ({best}) is {100 * (rep[1]['belady'] - rep[1][best]):.1f} "
              "points below Belady (the issue's goal: within 5). LRC is the segment oracle of SCH "
              f"(16 tokens); LRFU's half-life is {LRFU_HALF_LIFE_TOKENS} tokens, picked from "
              "{2, 4, 8, 16, 32} on the first 4096 of these tokens (4-16 are within a point of each "
              "other). Activation-aware (MoE-Infinity): a request is one 512-token sequence; in the "
              "runtime rows below all tokens are one request.", "",
              f"`offload_model(budget=2x = {run[0]['budget_bytes'] / 2**20:.2f} MiB)`, "
              f"{meta['decode_tokens']} tokens decoded one at a time (teacher-forced, KV cache):", "",
              "| policy | prefetch | hit rate | replayed | KiB read/token | peak resident MiB | tokens/s "
              "| resident tokens/s | prediction precision | recall |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in run:
        lines.append(f"| {r['policy']} | {'on' if r['prefetch'] else 'off'} | {r['hit_rate']:.3f} | "
                     f"{_f3(r['replayed_hit_rate'])} | {r['bytes_read_per_token'] / 1024:.1f} | "
                     f"{r['peak_resident_bytes'] / 2**20:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['resident_tokens_per_s']:.1f} | {_f3(r['prefetch_precision'])} | {_f3(r['prefetch_recall'])} |")
    lines += ["", "Replayed = the same policy replayed on the routing that run made; the measured "
              "hit rate equals it (checked by the script). Reads come from the page cache (a 9 MB "
              "checkpoint), so tokens/s show the runtime's overhead, not disk speed; they are medians of "
              f"{meta['reps']} runs on a machine shared with other jobs, so expect noise (rows faster than "
              "the resident model show it: only the hit rates and bytes are stable). Not measured "
              "here: the issue's multi-GB generated checkpoints.", ""]
    atomic_write_text(out, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=8192, help="tokens of the test split to replay")
    ap.add_argument("--decode-tokens", type=int, default=300, help="tokens decoded at run time")
    ap.add_argument("--reps", type=int, default=3, help="decode runs per setting (median tokens/s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/offload.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs/results/offload.md")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--part", choices=("all", "predictor"), default="all",
                    help="predictor: only the ExpertFlow section (bench/_offload_predictor.py)")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = default_model()
    if args.part == "predictor":
        return predictor_part(path, args)
    view = open_model(path)
    b = view.blocks[0]
    t0 = time.perf_counter()
    steps, info = trace_steps(path, args.max_tokens, not args.no_progress)
    replayed = replay_table(steps, b.top_k, len(view.blocks), info["request_starts"])
    t1 = time.perf_counter()
    runtime, rt_info = runtime_rows(path, decode_inputs(args.decode_tokens), args.reps)
    t2 = time.perf_counter()
    meta = {
        "command": "python bench/offload.py" + (f" --max-tokens {args.max_tokens}" if args.max_tokens != 8192 else "")
        + (f" --decode-tokens {args.decode_tokens}" if args.decode_tokens != 300 else ""),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"{view.family}, {Path(path).name}", "top_k": b.top_k, "num_experts": b.num_experts,
        "num_moe_layers": len(view.blocks), "tokens": info["tokens"], "decode_tokens": args.decode_tokens,
        "requests": len(info["request_starts"]), "reps": args.reps,
        "seconds": {"replay": round(t1 - t0, 1), "runtime": round(t2 - t1, 1)}, **rt_info,
    }
    result = {"meta": meta, "replay": replayed, "runtime": runtime,
              "predictor": _offload_predictor.run(path, args.max_tokens, args.decode_tokens)}
    console = Console(width=160)
    print_tables(replayed, runtime, console)
    console.print(f"{meta['command']} | {meta['machine']} | {meta['date']} | replay {meta['seconds']['replay']} s, "
                  f"runtime {meta['seconds']['runtime']} s")
    atomic_write_text(args.out, json.dumps(result, indent=2))
    write_markdown(result, args.md)
    _offload_predictor.write_section(args.md, result["predictor"], meta)


def _meta(args: argparse.Namespace) -> dict:
    return {"command": "python bench/offload.py" + (f" --max-tokens {args.max_tokens}" if args.max_tokens != 8192 else "")
            + (f" --decode-tokens {args.decode_tokens}" if args.decode_tokens != 300 else ""),
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def predictor_part(path: Path, args: argparse.Namespace) -> None:
    """Only the ExpertFlow section: its key of the JSON and its part of the Markdown are replaced."""
    meta = _meta(args)
    pred = _offload_predictor.run(path, args.max_tokens, args.decode_tokens)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["predictor"] = {**pred, "meta": meta}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    _offload_predictor.write_section(args.md, pred, meta)
    Console(width=160).print(_offload_predictor.markdown(pred, meta))


if __name__ == "__main__":
    main()
