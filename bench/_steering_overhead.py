"""The overhead part of ``bench/steering.py``: what a steering edit costs on a plain forward and on a
greedy generation (``python bench/steering.py --part overhead`` reruns only this part, on the
selections of the last full run saved in ``bench/results/steering.json``).

Per setting (no edit, the identity edit, each steering edit): the CPU time (``time.process_time``)
of ``--repeat`` forwards / ``--gen-repeat`` generations after a warm-up round, each round running
every setting back to back in rotating order; the overhead is the median of each round's ratio to
the run without an edit. Beside it, two counts no other job on the machine can disturb: the torch
ops dispatched, and the routing time: the CPU time spent in the MoE blocks' routers and routing seam
(timed by torch hooks around the router call and the experts' pre-hooks), so ``routing - routing
without an edit`` is what the edit itself costs, whichever path it takes (the router's selection
stood in for, or a re-selection after it).
"""

from __future__ import annotations

import random
import statistics
import time

import torch

GEN_PROMPT = "def read_config(path):\n    "


class Edits:
    """Several edit handles removed as one."""

    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def timed_settings(view, sel: dict, factors: dict, top: int) -> dict:
    """The settings timed: name -> ``install() -> handle``. "off, re-selection" is ``experts_off``
    behind an identity edit, so it is not the block's first edit and takes the general path (the
    family's selection, then the rule's again on the edited logits): the path before selection edits."""
    from moelab.steer import experts_off, scale_weights, switch_experts

    def identity():
        return Edits(*[b.register_routing_edit(lambda b, h, r: r) for b in view.blocks])

    return {"identity (seam only)": identity,
            f"off ({top} experts)": lambda: experts_off(view, sel),
            f"off ({top}), re-selection": lambda: Edits(identity(), experts_off(view, sel)),
            f"soft-off ({top} experts)": lambda: switch_experts(view, off=sel),
            "scale (RICE)": lambda: scale_weights(view, factors)}


def ratio_ci(runs: list[float], plain: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval (percentile method, rounds resampled with replacement) of the median
    of the per-round ratios ``runs[i] / plain[i]``, minus 1: how far the overhead column can move
    on this machine's noise."""
    ratios = [a / b for a, b in zip(runs, plain, strict=True)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return meds[int(0.025 * resamples)] - 1, meds[int(0.975 * resamples) - 1] - 1


def _ci(row: dict, plain: dict) -> str:
    lo, hi = ratio_ci(row["runs_s"], plain["runs_s"])
    return f"{lo:+.1%} .. {hi:+.1%}"


def overhead(run, edits: dict, repeat: int) -> list[dict]:
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


def op_counts(run, edits: dict) -> dict[str, int]:
    """Torch ops dispatched by ``run()`` with no edit and with each edit (on this small model a
    decode step's time is mostly per-op dispatch)."""
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


def _routing_timers(view, spent: list[float]) -> list:
    """Torch hooks adding to ``spent[0]`` the CPU time of every block's router call and of the
    experts' pre-hooks (where the routing seam runs): outermost, so they time whatever is installed."""
    handles = []

    def start(*_args, **_kw):
        spent[1] = time.thread_time()

    def stop(*_args, **_kw):
        spent[0] += time.thread_time() - spent[1]

    for b in view.blocks:
        handles += [b.router_module.register_forward_pre_hook(start, prepend=True),
                    b.router_module.register_forward_hook(stop),
                    b.experts_module.register_forward_pre_hook(start, prepend=True),
                    b.experts_module.register_forward_pre_hook(stop)]
    return handles


def routing_time(view, run, edits: dict, repeat: int) -> dict[str, dict]:
    """Per setting: the median and least CPU time of ``run()`` spent routing (router calls and the
    routing seam, :func:`_routing_timers`), over ``repeat`` runs after a warm-up run."""
    spent = [0.0, 0.0]
    out = {}
    with torch.no_grad():
        for name, make in {"no edit": None, **edits}.items():
            handle = make() if make is not None else None
            timers = _routing_timers(view, spent)  # after the edit: the seam's hooks are inside
            times = []
            for i in range(repeat + 1):
                spent[0] = 0.0
                run()
                if i:
                    times.append(spent[0])
            for h in timers:
                h.remove()
            if handle is not None:
                handle.remove()
            out[name] = {"routing_s_median": statistics.median(times), "routing_s_min": min(times)}
    return out


def forward_run(view, batch: int, vocab: int):
    ids = torch.randint(0, vocab, (batch, 256), generator=torch.Generator().manual_seed(0))
    return lambda: view.model(input_ids=ids, use_cache=False)


def generate_run(view, tokenizer, new_tokens: int):
    from moelab.run.generate import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    return lambda: generate(view.model, tokenizer, GEN_PROMPT, cfg)


def measure(view, tokenizer, sel: dict, factors: dict, args) -> tuple[list[dict], list[dict]]:
    """``(forward rows, generation rows)``: timings, op counts and routing time per setting."""
    timed = timed_settings(view, sel, factors, args.top[0])
    forward = forward_run(view, args.batch, view.model.config.vocab_size)
    gen = generate_run(view, tokenizer, args.new_tokens)
    rows, gen_rows = overhead(forward, timed, args.repeat), overhead(gen, timed, args.gen_repeat)
    for r in gen_rows:
        r["tokens_per_s"] = args.new_tokens / r["median_s"]
    for rows_, run, n in ((rows, forward, args.repeat), (gen_rows, gen, args.gen_repeat)):
        ops = op_counts(run, timed)
        routing = routing_time(view, run, timed, n)
        plain_min = min(r["min_s"] for r in rows_ if r["edit"] == "no edit")
        base = routing["no edit"]["routing_s_median"]
        for r in rows_:
            r["ops"] = ops[r["edit"]]
            r.update(routing[r["edit"]])
            # the edit's own cost: routing time over the plain run's, minus routing without an edit
            r["edit_share"] = (r["routing_s_median"] - base) / plain_min
    return rows, gen_rows


def markdown(result: dict) -> list[str]:
    """The overhead section of ``docs/results/steering.md``."""
    a, run = result["args"], result.get("overhead_run") or result
    m = run["machine"]
    gen_rows, rows = result["generation_overhead"], result["overhead"]
    lines = ["", "## Overhead of a steering edit", "",
             f"Command: `{run['command']}`. Machine: {m['platform']}, {m['cpus']} CPUs (shared with other "
             f"jobs), {m['threads']} torch thread(s), nice {m.get('nice', '?')}, load average {m['load_average'][0]:.2f} "
             f"(1 min) at the end. Date: {run['date']}.", "",
             f"CPU seconds (`time.process_time` of this process), median of {a['gen_repeat']} (generation) "
             f"and {a['repeat']} (forward) rounds after a warm-up round, each round running every setting back "
             "to back in rotating order; overhead: the median of each round's ratio to the run without an "
             "edit. \"routing ms\": CPU time inside the MoE blocks' routers and routing seam (median); "
             "\"edit / run\": that time minus the routing time without an edit, over the least time of a plain "
             "run, i.e. the edit's own cost whichever path it takes; \"torch ops\": ops dispatched. Both are "
             "undisturbed by other jobs, unlike the wall-clock ratios. \"off, re-selection\": `experts_off` "
             "behind an identity edit, so it takes the general path (the family's selection, then the rule's "
             "again), as every edit did before selection edits. Greedy generation of "
             f"{a['new_tokens']} new tokens from `{GEN_PROMPT!r}` with the KV cache:", "",
             *_table(gen_rows, "CPU s", tokens_per_s=True),
             "", f"One forward ({a['batch']} x 256 tokens):", "", *_table(rows, "median s", tokens_per_s=False)]
    return lines + ["", goal_sentence(result)]


def _table(rows: list[dict], time_col: str, tokens_per_s: bool) -> list[str]:
    """One markdown table of overhead rows (the first is the run without an edit)."""
    rate = " tokens/s |" if tokens_per_s else ""
    lines = [f"| edit | {time_col} |{rate} overhead | 95 % CI | min s | overhead (min) | routing ms | edit / run "
             "| torch ops | more ops |", "|---|" + "---:|" * (10 if tokens_per_s else 9)]
    plain = rows[0]
    for r in rows:
        rate = f" {r['tokens_per_s']:.1f} |" if tokens_per_s else ""
        lines.append(f"| {r['edit']} | {r['median_s']:.4f} |{rate} {r['overhead']:+.1%} | {_ci(r, plain)} | "
                     f"{r['min_s']:.4f} | {r['overhead_min']:+.1%} | {1e3 * r['routing_s_median']:.2f} | "
                     f"{r['edit_share']:+.2%} | {r['ops']:,} | {r['ops'] / plain['ops'] - 1:+.1%} |")
    return lines


def goal_sentence(result: dict) -> str:
    """The goal of issue 14's overhead line, from the measured rows."""
    top = result["args"]["top"][0]
    pick = {k: {r["edit"]: r for r in result[k]} for k in ("overhead", "generation_overhead")}
    off, soft, scale = f"off ({top} experts)", f"soft-off ({top} experts)", "scale (RICE)"
    fwd, gen = pick["overhead"], pick["generation_overhead"]
    edits = [e for e in (off, soft, scale) if e in fwd]
    worst = max(max(fwd[e]["overhead"], gen[e]["overhead"]) for e in edits)
    cost = max(max(fwd[e]["edit_share"], gen[e]["edit_share"]) for e in edits)
    met = "met" if worst <= 0.03 and cost <= 0.03 else "not met"
    measured = "; ".join(f"{e} {fwd[e]['overhead']:+.1%} on the forward and {gen[e]['overhead']:+.1%} on "
                         f"generation (95 % interval {_ci(gen[e], gen['no edit'])})" for e in edits)
    return (f"Goal of issue 14: a steering edit costs at most 3 % of a forward and of generation. Measured "
            f"({met}): {measured} (median paired ratios; on this shared machine they move by a few per "
            f"cent between runs, and the identity edit, which does nothing, reads "
            f"{fwd['identity (seam only)']['overhead']:+.1%} / {gen['identity (seam only)']['overhead']:+.1%}, "
            f"interval {_ci(gen['identity (seam only)'], gen['no edit'])}); the edit's own routing time is at "
            f"most {cost:+.2%} of a run, and `experts_off` dispatches "
            f"{fwd[off]['ops'] / fwd['no edit']['ops'] - 1:+.1%} / {gen[off]['ops'] / gen['no edit']['ops'] - 1:+.1%} "
            "torch ops (forward / generation). `experts_off`, SteerMoE's off-only switch and RICE's "
            "`scale_weights` are selection edits: as a block's first edit, the router's own selection is "
            "replaced by the family's rule on the edited logits (`moelab.models.edits`; the scale edit "
            "scales the weights there), so a call selects once instead of twice and the experts get no "
            "edited routing to hand over; the general path (\"re-selection\" row) costs "
            f"{fwd[f'off ({top}), re-selection']['edit_share']:+.2%} of a forward.")
