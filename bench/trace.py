"""Benchmark: the cost of ``moelab.trace.record`` over a plain forward of the same model and batches.

    python bench/trace.py                       # tiny random Qwen3-MoE, and the default model if built
    python bench/trace.py --model tiny --reps 5 --out bench/results/trace.json

For each set of recorded fields (ids + weights alone, then each optional field, then all), three
timings of the same token batches, interleaved per repetition, median of ``--reps`` runs after a
warm-up:
- ``plain``: the decoder stack's forward (``model.base_model``, what ``record`` runs), no hooks;
- ``hooks``: the same forward with the routing hooks collecting the fields into numpy;
- ``record``: the whole ``moelab.trace.record`` call into a fresh directory (fingerprinting, packing,
  Parquet shards, sha256, manifest).
Overhead = time / plain - 1. Store size: bytes per token per MoE layer of each column group, from the
Parquet metadata of the shards (compressed), plus the per-token columns spread over the layers.
Overheads are medians of per-repetition ratios (each variant timed right after its plain run), which
resists the drift of a shared machine's load better than a ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import moelab
import moelab.trace
from moelab.models import open_model
from moelab.trace.collect import Collector

FIELD_SETS = {
    "ids+weights": {},
    "+logits": {"logits": True},
    "+expert_norms": {"expert_norms": True},
    "+act_max": {"act_max": True},
    "+hidden_norm": {"hidden_norm": True},
    "all": {"logits": True, "expert_norms": True, "act_max": True, "hidden_norm": True},
}


def tiny_qwen3_moe() -> torch.nn.Module:
    """A random Qwen3-MoE of realistic shape ratios: 4 layers, hidden 256, 16 experts top-4, vocab 4096."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=1024)
    return Qwen3MoeForCausalLM(cfg).eval()


def token_batches(model: torch.nn.Module, default: bool, n: int, batch: int, seq_len: int) -> torch.Tensor:
    """``[n * batch, seq_len]`` token ids: the default corpus' val split for the default model, else random."""
    if default:
        from moelab.data.texts import read_corpus
        from moelab.trace.corpus import TextTokenizer, pack

        docs = read_corpus(moelab.default_corpus())
        ids = TextTokenizer(moelab.default_model()).encode([d.text for d in docs])
        p = pack(ids, [d.label for d in docs], seq_len, n * batch * seq_len)
        full = [p.tokens_N[p.starts_S1[s]:p.starts_S1[s + 1]] for s in range(p.num_sequences)]
        full = [s for s in full if len(s) == seq_len][: n * batch]
        return torch.from_numpy(np.stack(full).astype(np.int64))
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (n * batch, seq_len), generator=g)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _plain(model, ids, batch):
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            model.base_model(input_ids=ids[i:i + batch], use_cache=False)


def _hooks(view, ids, batch, fields):
    collector = Collector(view, tuple(k for k in fields), "float32")
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                view.model.base_model(input_ids=ids[i:i + batch], use_cache=False)
                collector.take(ids[i:i + batch].numel())
    finally:
        collector.remove()


def _record(view, ids, batch, fields, tmp: Path, tag: str) -> Path:
    out = tmp / tag
    moelab.trace.record(view, ids, out, seq_len=ids.shape[1], batch_size=batch, progress=False,
                        overwrite=True, resume=False, **fields)  # time a full run, never a resume
    return out


def store_bytes(out: Path, num_tokens: int, num_layers: int) -> dict[str, float]:
    """Compressed bytes per token per layer, by column group (per-token columns spread over layers)."""
    sizes: dict[str, int] = {}
    for shard in sorted(out.glob("shard-*.parquet")):
        meta = pq.ParquetFile(shard).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                name = col.path_in_schema.split(".")[0]
                group = name.rsplit("_l", 1)[0] if "_l" in name else "per-token"
                sizes[group] = sizes.get(group, 0) + col.total_compressed_size
    total_file = sum(p.stat().st_size for p in out.glob("shard-*.parquet"))
    out_d = {k: v / num_tokens / num_layers for k, v in sorted(sizes.items())}
    out_d["file total"] = total_file / num_tokens / num_layers
    return out_d


def bench_model(name: str, model, ids, batch: int, reps: int) -> dict:
    view = open_model(model)
    num_layers = len(view.blocks)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fields in FIELD_SETS.values():  # warm-up
            _plain(model, ids[:batch], batch)
            _hooks(view, ids[:batch], batch, fields)
        runs = {tag: {"plain": [], "hooks": [], "record": []} for tag in FIELD_SETS}
        for _ in range(reps):  # paired: each variant right after its own plain run
            for tag, fields in FIELD_SETS.items():
                runs[tag]["plain"].append(_time(lambda: _plain(model, ids, batch)))
                runs[tag]["hooks"].append(_time(lambda f=fields: _hooks(view, ids, batch, f)))
                runs[tag]["record"].append(_time(lambda t=tag, f=fields: _record(view, ids, batch, f, tmp, t)))
        for tag in FIELD_SETS:
            r = runs[tag]
            results[tag] = {
                "plain_s": statistics.median(r["plain"]), "hooks_s": statistics.median(r["hooks"]),
                "record_s": statistics.median(r["record"]),
                # median over repetitions of the per-pair ratio: robust to load drifting between pairs
                "hooks_overhead": statistics.median(h / p for h, p in zip(r["hooks"], r["plain"], strict=True)) - 1,
                "record_overhead": statistics.median(x / p for x, p in zip(r["record"], r["plain"], strict=True)) - 1,
                "plain_tok_per_s": ids.numel() / statistics.median(r["plain"]),
                "bytes_per_token_per_layer": store_bytes(tmp / tag, ids.numel(), num_layers),
            }
    cfg = model.config
    return {"model": name, "architecture": type(model).__name__, "layers": num_layers,
            "experts": view.blocks[0].num_experts, "top_k": view.blocks[0].top_k,
            "hidden": cfg.hidden_size, "tokens": ids.numel(), "batch": batch, "seq_len": ids.shape[1],
            "reps": reps, "fields": results}


def print_table(res: dict) -> None:
    print(f"\n{res['model']} ({res['architecture']}, {res['layers']} MoE layers, E={res['experts']}, "
          f"K={res['top_k']}, H={res['hidden']}); {res['tokens']} tokens as {res['tokens'] // res['seq_len']} "
          f"x {res['seq_len']}, batch {res['batch']}, median of {res['reps']}")
    print(f"{'fields':<14}{'plain s':>9}{'hooks s':>9}{'hooks +%':>10}{'record s':>10}{'record +%':>11}"
          f"{'B/tok/layer':>13}")
    for tag, r in res["fields"].items():
        print(f"{tag:<14}{r['plain_s']:9.3f}{r['hooks_s']:9.3f}{100 * r['hooks_overhead']:9.1f}%"
              f"{r['record_s']:10.3f}{100 * r['record_overhead']:10.1f}%"
              f"{r['bytes_per_token_per_layer']['file total']:13.1f}")
    sizes = res["fields"]["all"]["bytes_per_token_per_layer"]
    print("store bytes/token/layer by column group (all fields): "
          + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "default", "both"], default="both")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trace.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = []
    if args.model in ("tiny", "both"):
        models.append(("tiny random Qwen3-MoE", tiny_qwen3_moe(), False))
    if args.model in ("default", "both"):
        try:
            path = moelab.default_model()
        except Exception as err:  # noqa: BLE001 - report and go on with the tiny model
            print(f"default model not available ({err}); skipped", file=sys.stderr)
        else:
            models.append((f"default model ({path.name})", open_model(str(path)).model.eval(), True))
    report = {"command": "python bench/trace.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "threads": args.threads, "results": []}
    for name, model, default in models:
        ids = token_batches(model, default, args.batches, args.batch_size, args.seq_len)
        res = bench_model(name, model, ids, args.batch_size, args.reps)
        print_table(res)
        report["results"].append(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
