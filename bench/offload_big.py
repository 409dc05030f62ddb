"""Offloading and out-of-core analysis on a generated multi-GB checkpoint (random weights, not committed).

    nice -n 10 python bench/offload_big.py             # ~10 min on 2 CPU cores, ~4 GB of disk
    python bench/offload_big.py --scale 0.1 --decode-tokens 4   # a quick look (~1 min)

1. **Checkpoint.** A stock Qwen3-MoE (8 layers, 64 experts, top-8, float32; hidden 1024, expert
   width 544: 3.42 GB of experts, as in the issue) with random weights, written tensor by tensor with
   :class:`moelab.models.writer.SafetensorsWriter` (one decoder layer in memory at a time) in the
   per-expert layout ``save_pretrained`` writes, into a temporary folder under ``--dir`` (removed at
   the end), with the shipped corpus' tokenizer.
2. **Read bandwidth** of that file at expert granularity: ``ExpertStore.read`` of random experts
   after dropping the file's pages (``os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``, checked to
   work here: the pages of a read file are gone afterwards, as ``fincore`` shows).
3. **Decode** (greedy, KV cache, one token at a time after a ``--prompt-tokens`` prompt) with
   ``offload_model`` at 10/25/50/100 % of the experts' bytes, LRU, each in a fresh process:
   *cold* drops the file's pages before every token (so every miss is a disk read, as when the
   experts exceed memory), *warm* leaves them in the page cache (the runtime's own overhead).
   Tokens/s against the fully resident model (moelab's experts backend, the same kernels) and
   against the I/O bound (measured bandwidth / bytes read per token); peak RSS (``VmHWM``) against
   non-expert weights + budget + margin.
4. **Commands**: ``moelab inspect``, ``moelab trace`` (``--trace-tokens`` tokens) and
   ``moelab prune --method frequency --ratio 0.5`` (``--calib-tokens`` calibration tokens), with
   ``--expert-budget`` of a quarter of the experts and without, each in a fresh process (peak RSS:
   its ``VmHWM`` at exit; wall time), and the same commands of an older checkout (``--before SRC``)
   for the "before" column.

The margin: the runtime (Python, torch, transformers, moelab imported: measured in a process that
imports the CLI and builds the model on the meta device), plus two MoE layers' experts (one forward's
experts are concatenated for the kernels beside the cache, and a forward needing more experts than the
budget holds keeps the rows it was handed), plus 256 MiB of activations.

Writes ``bench/results/offload_big.json`` and ``docs/results/offload_big.md`` (``--out`` / ``--md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (0.10, 0.25, 0.50, 1.00)
MiB, GB = 2**20, 1e9


# ---------------------------------------------------------------- the checkpoint

def big_config(scale: float = 1.0):
    """The issue's checkpoint: Qwen3-MoE, 8 layers, 64 experts, top-8; ``scale`` shrinks the expert width."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048,
                          moe_intermediate_size=max(8, int(544 * scale)), num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
                          num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                          tie_word_embeddings=False, dtype="float32", bos_token_id=None, eos_token_id=None,
                          pad_token_id=None)


def write_checkpoint(path: Path, scale: float, seed: int = 0) -> dict:
    """Random weights (normal, std 0.02; norms 1) written one decoder layer at a time."""
    import warnings

    from transformers import AutoModelForCausalLM

    from moelab.data import default_corpus
    from moelab.models.writer import (
        SafetensorsWriter,
        layer_chunks,
        savable_state,
        save_config_files,
        saved_layout,
    )

    path.mkdir(parents=True)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(big_config(scale))
    state = savable_state(model)
    gen = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path / "model.safetensors", saved_layout(model)) as w:
        for keys in layer_chunks(list(state)):
            chunk = {}
            for k in keys:
                t = state[k]
                chunk[k] = (torch.ones(t.shape) if "norm" in k else
                            torch.empty(t.shape).normal_(0, 0.02, generator=gen)).to(t.dtype)
            w.write_model_chunk(model, chunk)
    save_config_files(model, path)
    shutil.copyfile(Path(default_corpus()) / "tokenizer.json", path / "tokenizer.json")
    n = sum(t.numel() * t.element_size() for k, t in state.items() if ".experts." in k)
    return {"expert_bytes": n, "non_expert_bytes": sum(t.numel() * t.element_size() for t in state.values()) - n,
            "file_bytes": (path / "model.safetensors").stat().st_size}


# ---------------------------------------------------------------- measurements in a child process

def drop_pages(path: Path) -> None:
    """Drop the page cache of every safetensors file of ``path`` (POSIX_FADV_DONTNEED)."""
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def vm_hwm() -> int:
    """Peak resident set size of this process, bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_bandwidth(path: Path, n: int) -> dict:
    from moelab.models.checkpoint import load_meta_model
    from moelab.models.open import view_model
    from moelab.offload.store import ExpertStore

    model = load_meta_model(path)
    store = ExpertStore(path, model, view_model(model))
    rng = random.Random(0)
    keys = [(rng.choice(store.layers), rng.randrange(64)) for _ in range(n)]
    drop_pages(path)
    t0 = time.perf_counter()
    for k in keys:
        store.read(*k)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    for k in keys:  # now from the page cache
        store.read(*k)
    warm = time.perf_counter() - t1
    store.close()
    return {"bytes": store.bytes_read // 2, "cold_s": dt, "warm_s": warm,
            "cold_gbps": store.bytes_read / 2 / dt / GB, "warm_gbps": store.bytes_read / 2 / warm / GB}


@torch.no_grad()
def child_decode(path: Path, budget: str, prompt: int, tokens: int, cold: bool) -> dict:
    from moelab.models import open_model
    from moelab.offload import offload_model

    t0 = time.perf_counter()
    if budget == "resident":
        model, experts = open_model(path, experts_implementation="moelab").model, None
    else:
        model, experts = offload_model(path, budget=float(budget))
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, 4096, (1, prompt), generator=torch.Generator().manual_seed(0))
    if cold:
        drop_pages(path)
    out = model(ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    before = experts.stats() if experts else None
    dt = 0.0
    for _ in range(tokens):
        if cold:
            drop_pages(path)
        t = time.perf_counter()
        out = model(nxt, past_key_values=past, use_cache=True)
        dt += time.perf_counter() - t
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    res = {"budget": budget, "cold": cold, "load_s": load_s, "decode_s": dt, "tokens_per_s": tokens / dt,
           "peak_rss": vm_hwm()}
    if experts is not None:
        s = experts.stats()
        res.update(bytes_per_token=(s.bytes_read - before.bytes_read) / tokens,
                   hit_rate=(s.hits - before.hits) / max(1, s.hits + s.misses - before.hits - before.misses),
                   budget_bytes=s.budget_bytes, peak_resident_bytes=s.peak_resident_bytes)
        experts.close()
    return res


def child_runtime(path: Path) -> dict:
    """RSS of the runtime alone: the CLI and transformers imported, the model built on meta."""
    import moelab.cli  # noqa: F401
    from moelab.models.checkpoint import load_meta_model

    load_meta_model(path)
    return {"peak_rss": vm_hwm()}


def run_child(args: list[str]) -> dict:
    """Run this script as ``--child ...`` in a fresh process; its JSON result."""
    cmd = [sys.executable, __file__, "--child", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# runs `python -m moelab ...` and writes the process's VmHWM to $HWM_FILE at exit (click exits via SystemExit)
_WRAPPER = """
import atexit, os, runpy, sys
def _hwm():
    with open(os.environ["HWM_FILE"], "w") as f:
        f.write(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
atexit.register(_hwm)
sys.argv = ["moelab", *sys.argv[1:]]
runpy.run_module("moelab", run_name="__main__")
"""


def run_command(argv: list[str], src: Path) -> dict:
    """Peak RSS (the child's own ``VmHWM``: ``ru_maxrss`` of a spawned child also counts the parent's
    pages at exec) and wall time of ``python -m moelab ARGV`` with ``src`` on the path."""
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as hwm:
        env = {**os.environ, "PYTHONPATH": str(src), "HWM_FILE": hwm.name,
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, check=False)
        dt = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"moelab {' '.join(argv)} (PYTHONPATH={src}) failed:\n{res.stderr[-3000:]}")
        return {"peak_rss": int(Path(hwm.name).read_text()) * 1024, "seconds": dt}


# ---------------------------------------------------------------- the run

def measure(args: argparse.Namespace, ckpt: Path, work: Path, sizes: dict) -> dict:
    from moelab.data import default_corpus

    out: dict = {"bandwidth": run_child(["bandwidth", str(ckpt), str(args.bandwidth_reads)])}
    out["runtime_rss"] = run_child(["runtime", str(ckpt)])["peak_rss"]
    out["decode"] = [run_child(["decode", str(ckpt), "resident", str(args.prompt_tokens), str(args.decode_tokens), "0"])]
    for b in BUDGETS:
        for cold in (True, False):
            out["decode"].append(run_child(["decode", str(ckpt), str(b), str(args.prompt_tokens),
                                            str(args.decode_tokens), str(int(cold))]))
            print(f"decode {b:.0%} {'cold' if cold else 'warm'}: {out['decode'][-1]['tokens_per_s']:.2f} tok/s",
                  flush=True)
    quarter = str(sizes["expert_bytes"] // 4)
    corpus = str(default_corpus())
    commands = {
        "inspect": lambda o: ["inspect", str(ckpt)],
        "trace": lambda o: ["trace", str(ckpt), "--corpus", corpus, "--out", str(work / o), "--max-tokens",
                            str(args.trace_tokens), "--no-progress"],
        "prune": lambda o: ["prune", str(ckpt), "--method", "frequency", "--ratio", "0.5", "--calib-tokens",
                            str(args.calib_tokens), "--out", str(work / o), "--no-progress"],
    }
    rows = []
    for name, argv in commands.items():
        runs = [("this branch", ROOT / "src", [])]
        if name != "inspect":
            runs.append(("this branch, --expert-budget 1/4", ROOT / "src", ["--expert-budget", quarter]))
        if args.before is not None:
            runs.insert(0, ("before", args.before, []))
        for i, (label, src, extra) in enumerate(runs):
            r = run_command(argv(f"{name}-{i}") + extra, src)
            rows.append({"command": name, "run": label, **r})
            print(f"{name} ({label}): peak RSS {r['peak_rss'] / GB:.2f} GB, {r['seconds']:.1f} s", flush=True)
            shutil.rmtree(work / f"{name}-{i}", ignore_errors=True)
    out["commands"] = rows
    return out


def margin_bytes(sizes: dict, runtime_rss: int) -> int:
    layer = sizes["expert_bytes"] // 8
    return runtime_rss + 2 * layer + 256 * MiB


def tables(res: dict) -> tuple[list[str], list[str]]:
    """Markdown rows of the decode table and of the commands table."""
    sizes, bw = res["sizes"], res["bandwidth"]["cold_gbps"]
    margin = margin_bytes(sizes, res["runtime_rss"])
    resident = next(d for d in res["decode"] if d["budget"] == "resident")
    dec = ["| budget | pages | tokens/s | vs resident | bytes read / token | I/O bound tokens/s | of the bound | "
           "hit rate | peak RSS | non-expert + budget + margin |", "|---|---|---|---|---|---|---|---|---|---|",
           f"| resident (moelab backend) | - | {resident['tokens_per_s']:.2f} | 1.00 | - | - | - | - | "
           f"{resident['peak_rss'] / GB:.2f} GB | - |"]
    for d in res["decode"]:
        if d["budget"] == "resident":
            continue
        bound = bw * GB / d["bytes_per_token"] if d["bytes_per_token"] else float("inf")
        limit = sizes["non_expert_bytes"] + d["budget_bytes"] + margin
        ok = "ok" if d["peak_rss"] <= limit else "OVER"
        dec.append(f"| {float(d['budget']):.0%} | {'cold' if d['cold'] else 'warm'} | {d['tokens_per_s']:.2f} | "
                   f"{d['tokens_per_s'] / resident['tokens_per_s']:.2f} | {d['bytes_per_token'] / MiB:.0f} MiB | "
                   + (f"{bound:.2f} | {d['tokens_per_s'] / bound:.0%} |" if d["cold"] else "- | - |")
                   + f" {d['hit_rate']:.3f} | {d['peak_rss'] / GB:.2f} GB | {limit / GB:.2f} GB ({ok}) |")
    cmd = ["| command | run | peak RSS | time | goal |", "|---|---|---|---|---|"]
    limit = sizes["non_expert_bytes"] + sizes["expert_bytes"] // 4 + margin
    for r in res["commands"]:
        goal = ("< 0.50 GB" if r["command"] == "inspect" else
                f"<= {limit / GB:.2f} GB" if "budget" in r["run"] else "-")
        met = ""
        if goal != "-":
            met = " (met)" if r["peak_rss"] < (0.5 * GB if r["command"] == "inspect" else limit) else " (missed)"
        cmd.append(f"| {r['command']} | {r['run']} | {r['peak_rss'] / GB:.2f} GB | {r['seconds']:.1f} s | {goal}{met} |")
    return dec, cmd


def write_markdown(res: dict, md: Path) -> None:
    from moelab.data.atomic import atomic_write_text

    m, s = res["meta"], res["sizes"]
    dec, cmd = tables(res)
    bw = res["bandwidth"]
    lines = [
        "# Offloading and out-of-core analysis on a multi-GB checkpoint", "",
        f"Generated by `{m['command']}` on {m['machine']}, {m['date']} ({m['seconds']:.0f} s).", "",
        f"Checkpoint: {m['model']}, random weights, written by the script (not committed): experts "
        f"{s['expert_bytes'] / GB:.2f} GB, non-expert weights {s['non_expert_bytes'] / GB:.3f} GB. "
        f"Read bandwidth of that file at expert granularity (random experts, pages dropped first): "
        f"{bw['cold_gbps']:.2f} GB/s cold, {bw['warm_gbps']:.2f} GB/s from the page cache.", "",
        f"## Decode ({m['decode_tokens']} tokens after a {m['prompt_tokens']}-token prompt, greedy, LRU)", "",
        "*cold*: the file's pages are dropped (`posix_fadvise(POSIX_FADV_DONTNEED)`) before every token, "
        "so every miss reads the disk; *warm*: they stay in the page cache. I/O bound = cold bandwidth / "
        f"bytes read per token. Margin = runtime ({res['runtime_rss'] / GB:.2f} GB: Python, torch, "
        "transformers, moelab, the meta model) + 2 MoE layers' experts + 256 MiB activations.", "", *dec, "",
        f"## Commands (trace: {m['trace_tokens']} tokens; prune: frequency, ratio 0.5, {m['calib_tokens']} "
        "calibration tokens)", "",
        "Peak RSS of the whole process (its `VmHWM` at exit), wall time. *before*: "
        + (f"`{m['before']}`" if m.get("before") else "not measured")
        + "; the issue's numbers on main before this work: inspect 6.9, trace 7.2, prune 9.6 GB.", "", *cmd, "",
    ]
    atomic_write_text(md, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/root"), help="where the temporary checkpoint goes")
    ap.add_argument("--scale", type=float, default=1.0, help="expert width factor (1: the issue's 3.4 GB)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--trace-tokens", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--bandwidth-reads", type=int, default=96, help="random experts read to measure bandwidth")
    ap.add_argument("--before", type=Path, default=None, help="src folder of an older checkout to compare")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/offload_big.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs/results/offload_big.md")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path, *rest = args.child
        fn = {"bandwidth": lambda: child_bandwidth(Path(path), int(rest[0])),
              "runtime": lambda: child_runtime(Path(path)),
              "decode": lambda: child_decode(Path(path), rest[0], int(rest[1]), int(rest[2]), rest[3] == "1")}[kind]
        print(json.dumps(fn()))
        return
    from moelab.data.atomic import atomic_write_text

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="moelab-offload-big-", dir=args.dir))
    try:
        ckpt = tmp / "qwen3moe-8x64"
        sizes = write_checkpoint(ckpt, args.scale)
        print(f"wrote {ckpt}: experts {sizes['expert_bytes'] / GB:.2f} GB in {time.perf_counter() - t0:.0f} s",
              flush=True)
        res = measure(args, ckpt, tmp, sizes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    argv = " ".join(sys.argv[1:])
    res["sizes"] = sizes
    res["meta"] = {
        "command": f"nice -n 10 python bench/offload_big.py {argv}".strip(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seconds": time.perf_counter() - t0,
        "model": "Qwen3-MoE, 8 layers, 64 experts, top-8, hidden 1024, expert width "
                 f"{big_config(args.scale).moe_intermediate_size}, float32",
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
        "trace_tokens": args.trace_tokens, "calib_tokens": args.calib_tokens,
        "before": str(args.before) if args.before else None,
    }
    atomic_write_text(args.out, json.dumps(res, indent=2))
    write_markdown(res, args.md)
    dec, cmd = tables(res)
    print("\n".join([*dec, "", *cmd, "", f"{res['meta']['command']} | {res['meta']['machine']} | "
                                       f"{res['meta']['date']}"]))


if __name__ == "__main__":
    main()
