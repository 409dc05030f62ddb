"""``bench/decode_gemv.py --rotate N``: one token through N layers' experts in turn, as when decoding
a model, instead of flushing the caches before each run.

Why: the flush (a 1 GiB write) also evicts the interpreter's and the dispatcher's own code and data,
which a real decode step keeps hot, so it overstates each op's cost. Here every call goes to the
next of ``N`` independent expert blocks (201 MB each) with freshly drawn top-k ids (``4 N`` draws,
reused in turn), so between two uses of a block ``N - 1`` others read ~25 MB each. With ``N`` = 48
(9.6 GB of weights, a 48-layer model) that is ~1.2 GB, several times the last-level cache (260 MB
here), and the weights come from DRAM while the code stays cached; with 12 blocks some weights
are still cached (measured faster). With ``THP_MEM_ALLOC_ENABLE=1`` PyTorch allocates the blocks
on transparent huge pages (fewer TLB misses over gigabytes of weights).
"""

from __future__ import annotations

import time

import torch

from moelab.nn import Experts, ExpertsConfig


def layers(case: dict, n: int) -> list[Experts]:
    """``n`` independent expert blocks of the case's shape (seeded 100, 101, ...)."""
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        out.append(Experts(ExpertsConfig(num_experts=case["E"], hidden_size=case["H"], inner_size=case["I"])))
    return out


# the candidates of bench/decode_gemv.py timed in rotation
NAMES = ("run_experts", "kernel", "decode_forward", "mv", "read only")


def draws(blocks: list[Experts], k: int) -> list[dict]:
    """Per draw (block ``d % N``, its own ids, weights and token): name -> zero-argument function,
    bench/decode_gemv.py's candidates of :data:`NAMES`."""
    from decode_gemv import candidates

    out, g = [], torch.Generator().manual_seed(7)
    for d in range(4 * len(blocks)):
        ex = blocks[d % len(blocks)]
        x_TH = torch.randn(1, ex.up.shape[2], generator=g)
        ids_TK = torch.randperm(ex.num_experts, generator=g)[:k][None]
        w_TK = torch.softmax(torch.randn(1, k, generator=g), -1)
        fns = candidates(ex, x_TH, ids_TK, w_TK, None, ceilings=False)
        out.append({n: fns[n] for n in NAMES if n in fns})
    return out


def time_rotated(all_draws: list[dict], threads: list[int], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each (candidate, thread count): every call takes the next draw in turn
    (the candidates interleaved, so each call's weights were last read ~4 N calls before)."""
    names = list(all_draws[0])
    times: dict[str, list[float]] = {f"{n} @{t}t": [] for t in threads for n in names}
    turn = 0
    with torch.no_grad():
        for t in threads:
            torch.set_num_threads(t)
            for _ in range(len(all_draws)):  # warm-up: one pass over every draw
                all_draws[turn % len(all_draws)][names[turn % len(names)]]()
                turn += 1
            for _ in range(reps):
                for n in names:
                    fn = all_draws[turn % len(all_draws)][n]
                    turn += 1
                    t0 = time.perf_counter()
                    fn()
                    times[f"{n} @{t}t"].append(time.perf_counter() - t0)
    return times


__all__ = ["draws", "layers", "time_rotated"]
